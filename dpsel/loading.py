"""Loading a base model for curate, filter, tune and the flows: the one place that turns a model source that
cannot be loaded into a DpselInputError (CLI exit 2) naming the folder or hub id and what is wrong."""
from __future__ import annotations

from dpsel.errors import DpselInputError


def load_model(name_or_path: str, **options):
    """``peft_train.models.load_model`` with its failures reported as bad input, never as an internal error.

    Covered: a missing folder, a folder without config.json, tokenizer or weights, a model needing its own
    code, a hub id that cannot be fetched (offline), a tokenizer that cannot be built, a 4-bit load that left
    linear layers unquantised, and a bad device or dtype.
    """
    from peft_train.models import ModelLoadError
    from peft_train.models import load_model as load

    try:
        return load(name_or_path, **options)
    except ModelLoadError as error:
        raise DpselInputError(str(error), file=error.source if error.source != name_or_path else None) from None
    except (OSError, ValueError) as error:  # transformers' own errors for a checkpoint it cannot read
        raise DpselInputError(f"cannot load model {name_or_path!r}: {error}") from None
