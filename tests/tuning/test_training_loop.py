"""peft_train.training: the weighted loss, the training loop, evaluation, optimizer choice, memory accounting."""
import math

import pytest
import torch

from peft_train.encode import collate, encode_all, per_example_nll
from peft_train.memory import model_memory_bytes
from peft_train.models import build_tiny_model
from peft_train.training import (
    TrainConfig,
    choose_optimizer_name,
    evaluate,
    row_losses,
    train,
    weighted_loss,
)


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


pytestmark = pytest.mark.usefixtures("one_thread")


ROWS = [_conversation(f"What is {i} plus {i}?", str(2 * i)) for i in range(12)]


def _small_model():
    return build_tiny_model(seed=0, num_hidden_layers=1)


def _batch(tokenizer, rows=ROWS[:4]):
    encoded = encode_all(rows, tokenizer, max_length=64)
    return collate(encoded.examples, tokenizer.pad_token_id)


def _grads(model, batch, weights) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    weighted_loss(per_example_nll(logits, batch["labels"]), weights).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _perturb_labels(batch, row: int) -> dict:
    labels = batch["labels"].clone()
    response = labels[row] != -100
    labels[row, response] = (labels[row, response] + 7) % 256 + 3  # other bytes, still valid ids
    return {**batch, "labels": labels}


# ----------------------------------------------------------------------------- weighted loss


def test_weighted_loss_is_the_weighted_mean():
    nll = torch.tensor([1.0, 2.0, 4.0])
    assert weighted_loss(nll, torch.tensor([1.0, 0.0, 3.0])).item() == pytest.approx((1 + 12) / 4)


def test_unit_weights_equal_the_unweighted_loss_and_gradients(byte_tokenizer):
    model = _small_model()
    batch = _batch(byte_tokenizer)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = per_example_nll(logits, batch["labels"])
    assert torch.allclose(weighted_loss(nll, torch.ones(4)), weighted_loss(nll, None))
    for with_ones, plain in zip(_grads(model, batch, torch.ones(4)), _grads(model, batch, None)):
        assert torch.allclose(with_ones, plain, atol=1e-7)


def test_zero_weight_rows_contribute_nothing(byte_tokenizer):
    model = _small_model()
    batch = _batch(byte_tokenizer)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.0])
    reference = _grads(model, batch, weights)
    # perturbing a weight-0 row's labels changes no gradient ...
    for a, b in zip(reference, _grads(model, _perturb_labels(batch, 1), weights)):
        assert torch.equal(a, b)
    # ... while perturbing a weighted row's labels does (so the check above can fail)
    changed = _grads(model, _perturb_labels(batch, 0), weights)
    assert any(not torch.allclose(a, b) for a, b in zip(reference, changed))


def test_non_finite_loss_of_a_zero_weight_row_does_not_leak():
    nll = torch.tensor([1.0, float("nan"), float("inf")], requires_grad=True)
    loss = weighted_loss(nll, torch.tensor([2.0, 0.0, 0.0]))
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert nll.grad.tolist() == [1.0, 0.0, 0.0]


def test_all_zero_weights_give_zero_loss_and_gradient():
    nll = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = weighted_loss(nll, torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and nll.grad.abs().sum().item() == 0.0


def test_weights_must_match_the_batch():
    with pytest.raises(ValueError, match="shape"):
        weighted_loss(torch.ones(3), torch.ones(2))


# ----------------------------------------------------------------------------- training loop


def _train(weights=None, seed=0, steps=12, rows=ROWS):
    model = _small_model()
    config = TrainConfig(max_steps=steps, learning_rate=3e-3, per_device_train_batch_size=4, max_length=64, seed=seed,
                         use_cpu=True, warmup_steps=0.0)
    return model, train(model, _tokenizer(), rows, weights, config, progress=False)


def _tokenizer():
    from peft_train.tokenizer import ByteTokenizer

    return ByteTokenizer()


def test_training_lowers_the_loss_and_reports():
    model, result = _train(steps=15)
    assert result.steps == 15 and len(result.losses) == 15
    assert result.train_loss < result.losses[0] - 0.5
    assert result.seconds > 0 and result.optimizer == "adamw"
    assert result.memory_measure == "tensor_accounting"
    # weights + grads + two AdamW moments (fp32) at least, plus saved activations
    assert result.peak_memory_bytes > 4 * model_memory_bytes(model)
    assert not model.training


def test_training_is_seeded():
    _, first = _train(seed=3, steps=5)
    _, again = _train(seed=3, steps=5)
    _, other = _train(seed=4, steps=5)
    assert first.losses == again.losses
    assert first.losses != other.losses


def test_zero_weight_rows_are_left_out():
    weights = [1.0] * 6 + [0.0] * 6
    _, result = _train(weights=weights, steps=3)
    assert (result.n_rows, result.n_skipped) == (6, 6)


def test_zero_weight_rows_do_not_change_training():
    """Training on 6 rows equals training on those 6 plus 6 rows of weight 0 with garbage answers."""
    junk = [_conversation(q[0]["content"], "#$%^&*") for q in ROWS[6:]]
    _, only_kept = _train(rows=ROWS[:6], steps=4)
    _, with_zero = _train(rows=ROWS[:6] + junk, weights=[1.0] * 6 + [0.0] * 6, steps=4)
    assert only_kept.losses == with_zero.losses


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="row 2"):
        _train(weights=[1.0, 1.0, -1.0] + [1.0] * 9, steps=1)
    with pytest.raises(ValueError, match="12 conversations"):
        _train(weights=[1.0], steps=1)
    with pytest.raises(ValueError, match="no row to train on"):
        _train(weights=[0.0] * 12, steps=1)


def test_frozen_model_is_rejected():
    model = _small_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        train(model, _tokenizer(), ROWS, config=TrainConfig(max_steps=1, use_cpu=True), progress=False)


@pytest.mark.parametrize("bad", [dict(max_steps=0), dict(per_device_train_batch_size=0), dict(learning_rate=-1.0),
                                 dict(warmup_steps=1.5), dict(optimizer="sgd")])
def test_config_is_checked(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_paged_adamw_only_for_a_4bit_base_on_cuda():
    auto = TrainConfig()
    assert choose_optimizer_name(auto, torch.device("cuda"), quantized_4bit=True) == "paged_adamw"
    assert choose_optimizer_name(auto, torch.device("cuda"), quantized_4bit=False) == "adamw"
    assert choose_optimizer_name(auto, torch.device("cpu"), quantized_4bit=True) == "adamw"
    with pytest.raises(ValueError, match="CUDA"):
        choose_optimizer_name(TrainConfig(optimizer="paged_adamw"), torch.device("cpu"), quantized_4bit=True)


def test_model_memory_counts_every_parameter_once():
    model = _small_model()
    tensors = list(model.parameters()) + list(model.buffers())
    assert model_memory_bytes(model) == sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_exact_match_and_per_task():
    """A model taught one fixed answer generates it for every prompt: exact match 1 there, 0 elsewhere."""
    rows = [_conversation(f"Say it, please ({i}).", "ok") for i in range(8)]
    model = _small_model()
    config = TrainConfig(max_steps=40, learning_rate=1e-2, per_device_train_batch_size=8, max_length=64, use_cpu=True,
                         warmup_steps=0.0)
    train(model, _tokenizer(), rows, config=config, progress=False)
    held_out = [_conversation("Say it, please (99).", "ok"), _conversation("Say it, please (98).", "no")]
    metrics = evaluate(model, _tokenizer(), held_out, max_new_tokens=8, tasks=["same", "other"])
    assert metrics["eval_exact_match"] == pytest.approx(0.5)
    assert metrics["per_task"]["same"]["eval_exact_match"] == 1.0
    assert metrics["per_task"]["other"]["eval_exact_match"] == 0.0
    assert metrics["per_task"]["same"]["eval_loss"] < metrics["per_task"]["other"]["eval_loss"]
    losses = row_losses(model, _tokenizer(), held_out)
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / 2)


def test_evaluate_loss_matches_the_training_loss_definition(byte_tokenizer):
    model = _small_model().eval()
    batch = _batch(byte_tokenizer)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = per_example_nll(logits, batch["labels"]).mean().item()
    metrics = evaluate(model, byte_tokenizer, ROWS[:4], exact_match=False)
    assert "eval_exact_match" not in metrics
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(metrics["eval_loss"])


def test_train_with_eval_messages_reports_eval():
    model = _small_model()
    config = TrainConfig(max_steps=4, per_device_train_batch_size=4, max_length=64, use_cpu=True, eval_strategy="steps",
                         eval_steps=2, max_new_tokens=4)
    result = train(model, _tokenizer(), ROWS, config=config, eval_messages=ROWS[:3], progress=False)
    assert set(result.eval) >= {"eval_loss", "eval_exact_match"}
    assert [entry["step"] for entry in result.eval_trace] == [2]


def test_periodic_eval_loss_is_the_mean_row_loss():
    """Trainer's periodic eval (eval_strategy="steps") reports what `row_losses` gives for the model at that step."""
    from transformers import TrainerCallback

    seen = []

    class Check(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            losses = row_losses(model, _tokenizer(), ROWS[:5], max_length=64)
            seen.append((metrics["eval_loss"], sum(losses) / len(losses)))

    config = TrainConfig(max_steps=3, per_device_train_batch_size=4, max_length=64, use_cpu=True,
                         eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2)
    train(_small_model(), _tokenizer(), ROWS, config=config, eval_messages=ROWS[:5], progress=False,
          callbacks=[Check()])
    assert len(seen) == 2  # steps 1 and 2; the last step is evaluate()'s
    for trainer_loss, mean_row_loss in seen:
        assert trainer_loss == pytest.approx(mean_row_loss, rel=1e-5)


def test_progress_is_plain_lines_without_a_terminal(capsys):
    model = _small_model()
    config = TrainConfig(max_steps=2, per_device_train_batch_size=4, max_length=64, use_cpu=True, log_every=1)
    train(model, _tokenizer(), ROWS[:4], config=config, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training: step")]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"]


# ----------------------------------------------------------------------------- Trainer: accumulation, resume


def test_accumulated_micro_batches_add_up_to_the_steps_weighted_mean(byte_tokenizer):
    """Two micro-batches of one optimizer step: their losses sum to Σwℓ/Σw over all four rows."""
    from transformers import TrainingArguments

    from peft_train.memory import MemoryMeter
    from peft_train.training.trainer import WeightedTrainer

    model = _small_model()
    first, second = _batch(byte_tokenizer, ROWS[:2]), _batch(byte_tokenizer, ROWS[2:4])
    first["weights"], second["weights"] = torch.tensor([1.0, 3.0]), torch.tensor([0.5, 2.0])
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", gradient_accumulation_steps=2)
    trainer = WeightedTrainer(model=model, args=args, lengths=[1], meter=MemoryMeter(model, torch.device("cpu")))
    batches, total_weight = trainer.get_batch_samples(iter([dict(first), dict(second)]), 2, torch.device("cpu"))
    model.train()
    with torch.no_grad():
        summed = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=total_weight) for b in batches)
        whole = _batch(byte_tokenizer, ROWS[:4])
        logits = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
        expected = weighted_loss(per_example_nll(logits, whole["labels"]), torch.tensor([1.0, 3.0, 0.5, 2.0]))
    assert summed.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_accumulation_and_epochs_count_optimizer_steps():
    model = _small_model()
    config = TrainConfig(max_steps=-1, num_train_epochs=2, learning_rate=3e-3, per_device_train_batch_size=2,
                         gradient_accumulation_steps=3, max_length=64, use_cpu=True)
    result = train(model, _tokenizer(), ROWS, config=config, progress=False)
    assert result.steps == 4 and len(result.losses) == 4  # 12 rows / (2 × 3) = 2 steps per epoch


class _StopAt:
    """A TrainerCallback that ends training after `step` steps, as a kill after a checkpoint would."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True

        return Stop()


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    config = dict(max_steps=6, learning_rate=3e-3, per_device_train_batch_size=4, max_length=64, use_cpu=True,
                  save_steps=2)
    whole = _small_model()
    full_run = train(whole, _tokenizer(), ROWS, config=TrainConfig(**config), progress=False)

    interrupted = _small_model()
    train(interrupted, _tokenizer(), ROWS, config=TrainConfig(**config), progress=False,
          checkpoint_dir=tmp_path, callbacks=[_StopAt(4)])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = _small_model()  # a new process: fresh weights, everything else from the checkpoint
    result = train(resumed, _tokenizer(), ROWS, config=TrainConfig(**config), progress=False,
                   checkpoint_dir=tmp_path, resume=True)
    assert result.resumed_from_step == 4 and result.steps == 6
    assert result.losses == pytest.approx(full_run.losses, rel=1e-5)
    expected, got = _trainable(whole), _trainable(resumed)
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in expected)


# ----------------------------------------------------------------------------- padding


def test_one_pad_rule_pad_token_else_eos():
    from types import SimpleNamespace

    from peft_train.tokenizer import pad_token_id

    assert pad_token_id(_tokenizer()) == 0  # the byte tokenizer's own <pad>
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))
