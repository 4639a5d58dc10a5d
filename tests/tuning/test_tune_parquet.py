"""dpsel.tuning.tune_parquet: every method learns, outputs reload to the same logits, weights, seeding, bad input."""
import json

import pandas as pd
import pytest
import torch

import peft_train.training as train_module
from dpsel.errors import DpselInputError
from dpsel.tuning import tune_parquet
from peft_train.adapters import METHODS, needs_4bit
from peft_train.models import load_model

FAST = dict(steps=30, batch_size=4, max_length=64, device="cpu", progress=False, max_new_tokens=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        task = "add" if i % 2 else "double"
        instruction = f"Add {i} and {i + 3}." if task == "add" else f"Double {i}."
        output = str(2 * i + 3) if task == "add" else str(2 * i)
        rows.append({"instruction": instruction, "output": output, "task": task})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune-data")
    train = pd.DataFrame(_rows(32))
    train["dpsel_weight"] = [1.0 if i % 4 else 0.0 for i in range(32)]
    train.to_parquet(folder / "train.parquet")
    train[train["dpsel_weight"] > 0].drop(columns="dpsel_weight").to_parquet(folder / "kept.parquet")
    pd.DataFrame(_rows(6, offset=100)).to_parquet(folder / "eval.parquet")
    return folder


@pytest.fixture
def captured_model(monkeypatch):
    """The model object tune_parquet trains (it is trained in place), to compare with what it saved."""
    seen = {}
    real_train = train_module.train

    def spy(model, *args, **kwargs):
        seen["model"] = model
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    return seen


def _logits(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Add 7 and 10."}], tokenize=False,
                                         add_generation_prompt=True) + "17"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reload(method: str, adapter_dir):
    if method == "full":
        return load_model(str(adapter_dir), device="cpu")[0]
    from peft import PeftModel

    from peft_train.surm import register_surm

    register_surm()  # SURM layers are not built into peft
    base, _ = load_model("tiny", quant="nf4" if needs_4bit(method) else None, device="cpu")
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_and_its_output_reloads(method, data, tmp_path, captured_model):
    rank = 2 if method.endswith("ldr") else 8  # LDR's cost grows with its displacement rank; keep the test fast
    metrics = tune_parquet(data / "train.parquet", tmp_path, method=method, r=rank, **FAST)

    assert metrics["train_loss"] < metrics["initial_train_loss"] - 0.5
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("method", "trainable_params", "total_params", "train_loss", "peak_memory_bytes", "seconds"):
        assert on_disk[key] == metrics[key]
    assert metrics["method"] == method and metrics["steps"] == 30
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    assert (metrics["trainable_params"] == metrics["total_params"]) == (method == "full")
    assert metrics["peak_memory_bytes"] > 0 and metrics["seconds"] > 0

    if method != "full":
        adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == "tiny"
    trained = captured_model["model"]
    _, tokenizer = load_model("tiny", device="cpu")
    expected = _logits(trained, tokenizer)
    reloaded = _logits(_reload(method, tmp_path / "adapter"), tokenizer)
    assert torch.allclose(reloaded, expected, atol=1e-4), (reloaded - expected).abs().max()


def test_eval_reports_loss_exact_match_and_tasks(data, tmp_path):
    metrics = tune_parquet(data / "train.parquet", tmp_path, method="lora", eval_path=data / "eval.parquet",
                           **{**FAST, "steps": 3})
    assert metrics["eval_rows"] == 6
    assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_exact_match"] <= 1
    assert set(metrics["eval_per_task"]) == {"add", "double"}
    assert json.loads((tmp_path / "metrics.json").read_text())["eval_exact_match"] == metrics["eval_exact_match"]


def test_tuning_is_seeded(data, tmp_path):
    run = dict(method="lora", **{**FAST, "steps": 4})
    first = tune_parquet(data / "train.parquet", tmp_path / "a", seed=1, **run)
    again = tune_parquet(data / "train.parquet", tmp_path / "b", seed=1, **run)
    other = tune_parquet(data / "train.parquet", tmp_path / "c", seed=2, **run)
    assert first["losses"] == again["losses"]
    assert first["losses"] != other["losses"]
    same = (tmp_path / "a/adapter/adapter_model.safetensors").read_bytes()
    assert same == (tmp_path / "b/adapter/adapter_model.safetensors").read_bytes()


def test_zero_weights_train_like_leaving_the_rows_out(data, tmp_path):
    run = dict(method="lora", **{**FAST, "steps": 4})
    weighted = tune_parquet(data / "train.parquet", tmp_path / "w", weights_column="dpsel_weight", **run)
    subset = tune_parquet(data / "kept.parquet", tmp_path / "s", **run)
    assert (weighted["trained_rows"], weighted["skipped_rows"]) == (24, 8)
    assert weighted["losses"] == pytest.approx(subset["losses"], abs=1e-6)


def test_scaling_all_weights_changes_nothing(data, tmp_path):
    frame = pd.read_parquet(data / "train.parquet")
    frame["w"] = torch.rand(len(frame), generator=torch.Generator().manual_seed(0)).tolist()
    frame["w3"] = frame["w"] * 3
    frame.to_parquet(tmp_path / "weighted.parquet")
    run = dict(method="lora", **{**FAST, "steps": 3})
    once = tune_parquet(tmp_path / "weighted.parquet", tmp_path / "a", weights_column="w", **run)
    thrice = tune_parquet(tmp_path / "weighted.parquet", tmp_path / "b", weights_column="w3", **run)
    unweighted = tune_parquet(tmp_path / "weighted.parquet", tmp_path / "c", **run)
    assert once["losses"] == pytest.approx(thrice["losses"], rel=1e-5)
    assert once["losses"] != pytest.approx(unweighted["losses"], rel=1e-5)


@pytest.mark.parametrize("value, message", [(-0.5, "row 5"), (float("nan"), "row 5"), (float("inf"), "row 5")])
def test_bad_weight_names_the_row(data, tmp_path, value, message):
    frame = pd.read_parquet(data / "train.parquet")
    frame.loc[5, "dpsel_weight"] = value
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DpselInputError, match=message) as error:
        tune_parquet(tmp_path / "bad.parquet", tmp_path / "out", weights_column="dpsel_weight", **FAST)
    assert error.value.column == "dpsel_weight" and error.value.row == 5
    assert "bad.parquet" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_weights_column_problems(data, tmp_path):
    with pytest.raises(DpselInputError, match="weights column not found") as error:
        tune_parquet(data / "train.parquet", tmp_path, weights_column="nope", **FAST)
    assert error.value.column == "nope"
    with pytest.raises(DpselInputError, match="numbers"):
        tune_parquet(data / "train.parquet", tmp_path, weights_column="task", **FAST)
    frame = pd.read_parquet(data / "train.parquet").assign(dpsel_weight=0.0)
    frame.to_parquet(tmp_path / "zeros.parquet")
    with pytest.raises(DpselInputError, match="every weight is 0"):
        tune_parquet(tmp_path / "zeros.parquet", tmp_path, weights_column="dpsel_weight", **FAST)


@pytest.mark.parametrize("bad", [dict(method="dora"), dict(steps=0), dict(lr=-1.0), dict(batch_size=0),
                                 dict(model="/no/such/model/dir")])
def test_bad_arguments(data, tmp_path, bad):
    with pytest.raises(DpselInputError):
        tune_parquet(data / "train.parquet", tmp_path, **{**FAST, **bad})


# ----------------------------------------------------------------------------- resume


class _Killed(Exception):
    pass


@pytest.fixture
def killed_after_checkpoint(monkeypatch):
    """tune_parquet's training dies right after it wrote checkpoint `step` (what a SIGKILL leaves behind)."""
    real_train = train_module.train

    def dying_train(*args, step, **kwargs):
        from transformers import TrainerCallback

        class Die(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                if state.global_step >= step:
                    raise _Killed(step)

        return real_train(*args, callbacks=[Die()], **kwargs)

    def kill_at(step):
        monkeypatch.setattr(train_module, "train", lambda *a, **k: dying_train(*a, step=step, **k))

    yield kill_at
    monkeypatch.setattr(train_module, "train", real_train)


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_a_killed_tune_resumes_from_its_last_checkpoint(data, tmp_path, killed_after_checkpoint, monkeypatch):
    run = dict(method="surm-circulant", weights_column="dpsel_weight", grad_accum=2, save_steps=2,
               **{**FAST, "steps": 6, "batch_size": 2})
    whole = tune_parquet(data / "train.parquet", tmp_path / "whole", **run)
    assert whole["resumed_from_step"] == 0 and not (tmp_path / "whole" / "checkpoints").exists()

    killed_after_checkpoint(4)
    with pytest.raises(_Killed):
        tune_parquet(data / "train.parquet", tmp_path / "again", **run)
    assert (tmp_path / "again" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "again" / "metrics.json").exists()
    monkeypatch.undo()

    resumed = tune_parquet(data / "train.parquet", tmp_path / "again", **run)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    expected, got = _adapter_tensors(tmp_path / "whole"), _adapter_tensors(tmp_path / "again")
    assert expected.keys() == got.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert not (tmp_path / "again" / "checkpoints").exists()  # a finished run leaves only its outputs


def test_checkpoints_of_other_settings_are_not_resumed(data, tmp_path, killed_after_checkpoint, monkeypatch):
    run = dict(method="lora", save_steps=1, **{**FAST, "steps": 3})
    killed_after_checkpoint(1)
    with pytest.raises(_Killed):
        tune_parquet(data / "train.parquet", tmp_path, **run)
    monkeypatch.undo()
    with pytest.raises(DpselInputError, match="other settings .*lr.*--no-resume"):
        tune_parquet(data / "train.parquet", tmp_path, **{**run, "lr": 0.5})
    fresh = tune_parquet(data / "train.parquet", tmp_path, resume=False, **{**run, "lr": 0.5})
    assert fresh["resumed_from_step"] == 0 and fresh["steps"] == 3


def test_epochs_and_accumulation_set_the_number_of_steps(data, tmp_path):
    metrics = tune_parquet(data / "kept.parquet", tmp_path, method="lora", epochs=1, grad_accum=3,
                           **{**FAST, "steps": None})
    assert metrics["steps"] == 2 and metrics["grad_accum"] == 3  # 24 rows / (4 × 3) per step
    assert metrics["tokenizer_defaults"] == {"pad_token": "own", "chat_template": "own"}


@pytest.mark.parametrize("bad", [dict(epochs=1.0), dict(steps=None, epochs=-1.0), dict(grad_accum=0),
                                 dict(report_to="carrier-pigeon"), dict(report_to="tensorboard")])
def test_bad_trainer_arguments(data, tmp_path, bad):
    if bad.get("report_to") == "tensorboard":
        from transformers.integrations import is_tensorboard_available

        if is_tensorboard_available():
            pytest.skip("tensorboard is installed here")
    with pytest.raises(DpselInputError):
        tune_parquet(data / "train.parquet", tmp_path, **{**FAST, **bad})
