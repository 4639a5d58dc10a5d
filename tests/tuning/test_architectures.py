"""The architecture matrix: tiny random-weight checkpoints of real model families, built from transformers configs
with a BPE tokenizer trained by `tokenizers` at test time (no download), through `curate` and `tune` with every
kind of adapter. Each cell either trains the structure it claims — checked by layer class and parameter count
after a reload through `PeftModel.from_pretrained`, which must reproduce the eval loss — or is refused with a
DpselInputError (exit 2) naming the module. Fast subset: gpt2 (Conv1D), falcon (FalconLinear), llama; the other
families are `slow` and run on demand (DPSEL_SLOW=1).
"""
import json

import pandas as pd
import pytest
import torch

from dpsel.errors import DpselInputError
from dpsel.tuning import tune_parquet

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 320  # a multiple of 64, like every linear width here (bitsandbytes' CPU 4-bit kernels need it)
CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
          "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _config(family: str):
    import transformers as tf

    small = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=256, **small)
    return {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "phi3": lambda: tf.Phi3Config(**llama_like, pad_token_id=0),
        "gemma2": lambda: tf.Gemma2Config(**llama_like, head_dim=32),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=1, n_head=2, n_positions=256, **small),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=2, max_position_embeddings=256, **small),
        "falcon": lambda: tf.FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                          new_decoder_architecture=False, multi_query=True, **small),
    }[family]()


# like real base models: some with a chat template, some without; some without a pad token
CHAT_TEMPLATE = {"llama": CHATML, "qwen2": CHATML, "phi3": CHATML}
NO_PAD = {"gpt2", "falcon", "gpt_neox"}


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 2}.", "output": str(2 * i + 2)} for i in range(offset, offset + n)]


def _tokenizer(family: str, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    specials = dict(bos_token="<s>", eos_token="</s>") | ({} if family in NO_PAD else dict(pad_token="<pad>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **specials)
    if family in CHAT_TEMPLATE:
        tokenizer.chat_template = CHAT_TEMPLATE[family]
    assert len(tokenizer) <= VOCAB
    return tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arch-data")
    pd.DataFrame(_rows(16)).to_parquet(folder / "train.parquet")
    pd.DataFrame(_rows(8, offset=50)).to_parquet(folder / "meta.parquet")
    pd.DataFrame(_rows(4, offset=100)).to_parquet(folder / "eval.parquet")
    return folder


_CHECKPOINTS: dict = {}


def checkpoint(family: str, tmp_path_factory) -> str:
    """A saved random-weight checkpoint of `family` (built once per session)."""
    if family not in _CHECKPOINTS:
        from transformers import AutoModelForCausalLM

        folder = tmp_path_factory.mktemp(f"ckpt-{family}")
        corpus = [f"{r['instruction']} {r['output']} <|user|> <|assistant|> <|system|>" for r in _rows(64)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(_config(family)).save_pretrained(folder)
        _tokenizer(family, corpus).save_pretrained(folder)
        _CHECKPOINTS[family] = str(folder)
    return _CHECKPOINTS[family]


# ----------------------------------------------------------------------------- what a cell must hold

METHOD_CELLS = ("lora", "qlora", "surm-circulant", "qsurm-toeplitz", "c3a", "lokr")
REFUSED = {("gpt2", "c3a"), ("gpt2", "lokr")}  # peft's C3A and LoKr wrap nn.Linear only; GPT-2 has Conv1D


def _dims(module) -> tuple[int, int]:
    base = module.get_base_layer()
    if type(base).__name__ == "Conv1D":
        d_in, d_out = base.weight.shape
        return int(d_in), int(d_out)
    return int(base.in_features), int(base.out_features)


def _expected_layer(method: str):
    from peft.tuners import c3a, lokr, lora

    from peft_train.surm import SurmLinear

    if method.startswith(("surm-", "qsurm-")):
        return SurmLinear, {"circulant": lambda i, o, r: 2 * max(i, o), "toeplitz": lambda i, o, r: i + o - 1}[
            method.split("-", 1)[1]]
    if method in ("lora", "qlora"):
        return lora.LoraLayer, lambda i, o, r: r * (i + o)
    return {"c3a": c3a.C3ALayer, "lokr": lokr.LoKrLayer}[method], None


def _check_structure(model, method: str, trainable: int, r: int) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peft_train.surm import SurmLinear

    layer_class, formula = _expected_layer(method)
    tuned = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert tuned and all(isinstance(m, layer_class) for m in tuned), {type(m).__name__ for m in tuned}
    if layer_class.__name__ == "LoraLayer":
        assert not any(isinstance(m, SurmLinear) for m in tuned)
    if method.startswith("q") or method == "qlora":
        import bitsandbytes as bnb

        assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in tuned)
    if formula is not None:
        assert trainable == sum(formula(*_dims(m), r) for m in tuned)


def _eval_loss(model, tokenizer, data) -> float:
    from dpsel.data import read_instruction_set
    from peft_train.training import evaluate

    eval_set = read_instruction_set(data / "eval.parquet")
    messages = eval_set.messages(eval_set.usable_mask())
    return evaluate(model, tokenizer, messages, exact_match=False, max_length=64)["eval_loss"]


def _run_cell(family: str, method: str, data, tmp_path, tmp_path_factory) -> None:
    from peft import PeftModel

    from peft_train.adapters import needs_4bit
    from peft_train.models import load_model
    from peft_train.surm import register_surm

    source = checkpoint(family, tmp_path_factory)
    run = dict(method=method, model=source, steps=2, batch_size=4, max_length=64, device="cpu", progress=False,
               max_new_tokens=2, r=4, eval_path=data / "eval.parquet")
    if (family, method) in REFUSED:
        with pytest.raises(DpselInputError, match=r"cannot wrap Conv1D layers .*module 'transformer\.h\.0\."):
            tune_parquet(data / "train.parquet", tmp_path, **run)
        assert not (tmp_path / "metrics.json").exists()
        return
    metrics = tune_parquet(data / "train.parquet", tmp_path, **run)
    assert metrics["method"] == method and metrics["steps"] == 2
    expected_pad = "eos" if family in NO_PAD else "own"
    assert metrics["tokenizer_defaults"]["pad_token"] == expected_pad
    assert (metrics["tokenizer_defaults"]["chat_template"] == "own") == (family in CHAT_TEMPLATE)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved.get("surm_structure") == (method.split("-", 1)[1] if "surm" in method else None)

    register_surm()
    base, tokenizer = load_model(source, quant="nf4" if needs_4bit(method) else None, device="cpu")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    _check_structure(reloaded, method, metrics["trainable_params"], r=4)
    assert _eval_loss(reloaded, tokenizer, data) == pytest.approx(metrics["eval_loss"], rel=1e-4)


FAST_FAMILIES = ("gpt2", "falcon", "llama")
SLOW_FAMILIES = ("qwen2", "gpt_neox", "phi3", "gemma2")


@pytest.mark.parametrize("method", METHOD_CELLS)
@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_architecture_matrix(family, method, data, tmp_path, tmp_path_factory):
    _run_cell(family, method, data, tmp_path, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.on_demand
@pytest.mark.parametrize("method", METHOD_CELLS)
@pytest.mark.parametrize("family", SLOW_FAMILIES)
def test_architecture_matrix_more_families(family, method, data, tmp_path, tmp_path_factory):
    _run_cell(family, method, data, tmp_path, tmp_path_factory)


def _curate(family: str, data, tmp_path, tmp_path_factory):
    from dpsel.curation import curate
    from dpsel.select.base import SelectConfig

    config = SelectConfig(model=checkpoint(family, tmp_path_factory), device="cpu", steps=2, batch_size=8,
                          max_length=64, extra={"ref_steps": 3, "ref_eval_every": 3})
    return curate(data / "train.parquet", data / "meta.parquet", tmp_path, method="loss", budget=0.5, config=config)


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_curate_runs_on_each_family(family, data, tmp_path, tmp_path_factory):
    _curate(family, data, tmp_path, tmp_path_factory)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input_rows"] == 16 == counts["kept_rows"] + counts["dropped_rows"]
    assert len(pd.read_parquet(tmp_path / "scores.parquet")) == 16


@pytest.mark.slow
@pytest.mark.on_demand
@pytest.mark.parametrize("family", SLOW_FAMILIES)
def test_curate_runs_on_more_families(family, data, tmp_path, tmp_path_factory):
    _curate(family, data, tmp_path, tmp_path_factory)
    assert (tmp_path / "manifest.json").is_file()


def _broken_checkpoints(tmp_path, tmp_path_factory) -> dict:
    import shutil

    source = checkpoint("llama", tmp_path_factory)
    broken = {}
    for name, drop in (("no-tokenizer", ("tokenizer.json", "tokenizer_config.json")),
                       ("no-weights", ("model.safetensors",))):
        shutil.copytree(source, tmp_path / name)
        for file in drop:
            (tmp_path / name / file).unlink()
        broken[name] = tmp_path / name
    remote = tmp_path / "remote-code"
    shutil.copytree(source, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    return {**broken, "remote-code": remote}


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("no-tokenizer", "has no tokenizer"), ("no-weights", "has no weights"),
    ("remote-code", "needs its own Python code"), ("hub-offline", "hub is offline"),
])
def test_unloadable_models_are_bad_input_for_curate_and_tune(case, message, data, tmp_path, tmp_path_factory):
    from dpsel.curation import curate
    from dpsel.select.base import SelectConfig

    broken = _broken_checkpoints(tmp_path, tmp_path_factory) if case not in ("missing", "hub-offline") else {}
    source = {"missing": str(tmp_path / "nowhere"), "hub-offline": "some-org/not-cached-model"}.get(case) or str(
        broken[case])
    with pytest.raises(DpselInputError, match=message):
        curate(data / "train.parquet", data / "meta.parquet", tmp_path / "c", method="loss",
               config=SelectConfig(model=source, device="cpu", steps=1))
    with pytest.raises(DpselInputError, match=message):
        tune_parquet(data / "train.parquet", tmp_path / "t", model=source, steps=1, device="cpu", progress=False)


def test_cli_exit_codes_for_unloadable_models_and_refused_methods(data, tmp_path, tmp_path_factory):
    from typer.testing import CliRunner

    from dpsel.cli import app

    runner = CliRunner()
    missing = str(tmp_path / "no-model-here")
    for command in (["curate", "--meta", str(data / "meta.parquet"), "--method", "loss"], ["tune", "--steps", "1"]):
        result = runner.invoke(app, [*command, "--data" if command[0] == "tune" else "--train",
                                     str(data / "train.parquet"), "--out", str(tmp_path / command[0]),
                                     "--model", missing, "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert f"model folder {missing} does not exist" in result.output
    result = runner.invoke(app, ["tune", "--data", str(data / "train.parquet"), "--out", str(tmp_path / "c3a"),
                                 "--model", checkpoint("gpt2", tmp_path_factory), "--method", "c3a", "--steps", "1",
                                 "--device", "cpu"])
    assert result.exit_code == 2 and "cannot wrap Conv1D" in result.output and "c_attn" in result.output
