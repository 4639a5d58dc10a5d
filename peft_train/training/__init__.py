"""Fine-tuning on transformers' ``Trainer``; only what Trainer lacks is ours.

Why ``Trainer`` and not TRL's ``SFTTrainer``: SFTTrainer is ``Trainer`` plus dataset preparation (chat
templating, packing, completion-only masks) that ``peft_train.encode`` already does with our own truncation
rules, and its loss has no per-row weights. Ours, one job per module: ``config`` (``TrainConfig``, a
``TrainingArguments`` with our defaults; the paged-optimizer choice), ``trainer`` (the weighted loss), ``data``
(weight-0 rows dropped, collation, the seeded length-grouped order), ``checkpoints`` (completeness), ``progress``,
``evaluate`` (eval loss and greedy exact match), ``run`` (``train``) and ``pretrain``.
"""

from peft_train.training.checkpoints import last_checkpoint
from peft_train.training.config import REPORT_TO, TrainConfig, choose_optimizer_name
from peft_train.training.evaluate import evaluate, greedy_answers, row_losses
from peft_train.training.pretrain import pretrain
from peft_train.training.run import TrainResult, train
from peft_train.training.trainer import weighted_loss

__all__ = [
    "REPORT_TO",
    "TrainConfig",
    "TrainResult",
    "choose_optimizer_name",
    "evaluate",
    "greedy_answers",
    "last_checkpoint",
    "pretrain",
    "row_losses",
    "train",
    "weighted_loss",
]
