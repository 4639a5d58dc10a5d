"""peft_train.models: the tiny model, loading paths, 4-bit NF4 on CPU."""

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import peft_train.models as models_module
from peft_train.encode import IGNORE_INDEX, encode_messages
from peft_train.models import (
    TINY_CONFIG,
    build_tiny_model,
    disable_bnb_cpu_repack,
    load_model,
    resolve_device,
    save_model,
)
from peft_train.tokenizer import DEFAULT_CHAT_TEMPLATE, ByteTokenizer

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def nf4_tiny():
    model, _ = load_model("tiny", quant="nf4", device="cpu")
    return model


@pytest.fixture
def token_ids(byte_tokenizer):
    return torch.tensor([byte_tokenizer.encode("The quick brown fox jumps over the lazy dog.")])


def test_tiny_config_fits_bitsandbytes_and_the_tokenizer(byte_tokenizer):
    for key in ("vocab_size", "hidden_size", "intermediate_size"):
        assert TINY_CONFIG[key] % 64 == 0, key
    assert TINY_CONFIG["vocab_size"] >= len(byte_tokenizer)
    assert TINY_CONFIG["hidden_size"] % TINY_CONFIG["num_attention_heads"] == 0


def test_build_tiny_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = build_tiny_model(seed=3), build_tiny_model(seed=3), build_tiny_model(seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert build_tiny_model(num_hidden_layers=1).config.num_hidden_layers == 1


def test_tiny_forward_backward_reaches_every_parameter(token_ids):
    model = build_tiny_model().train()
    loss = model(input_ids=token_ids, labels=token_ids).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_load_tiny_gives_byte_tokenizer_in_fp32_on_cpu():
    model, tokenizer = load_model("tiny", device="cpu")
    assert isinstance(tokenizer, ByteTokenizer)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.device.type == "cpu"
    assert load_model("tiny", device="cpu", dtype="bfloat16")[0].dtype == torch.bfloat16


def test_saved_tiny_reloads_with_identical_logits(tmp_path, token_ids):
    model, tokenizer = load_model("tiny", device="cpu")
    save_model(model, tokenizer, tmp_path / "tiny")
    reloaded, reloaded_tokenizer = load_model(str(tmp_path / "tiny"), device="cpu")
    assert type(reloaded_tokenizer) is ByteTokenizer
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, reloaded(token_ids).logits)


def _wordlevel_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate("hello world what is up".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def test_other_local_dir_goes_through_auto_classes_and_gets_pad_and_template(tmp_path):
    save_model(build_tiny_model(), _wordlevel_tokenizer(), tmp_path)
    model, tokenizer = load_model(str(tmp_path), device="cpu")
    assert not isinstance(tokenizer, ByteTokenizer)
    assert tokenizer.pad_token == "<eos>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    chat = [{"role": "user", "content": "what is up"}, {"role": "assistant", "content": "hello world"}]
    example = encode_messages(chat, tokenizer, max_length=64)
    response = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(response).split()[-3:] == ["hello", "world", "<eos>"]


def test_trust_remote_code_is_passed_only_when_asked(monkeypatch):
    calls = []

    def record(kind):
        def fake_from_pretrained(name, **kwargs):
            calls.append((kind, kwargs.get("trust_remote_code", "absent")))
            return build_tiny_model() if kind == "model" else _wordlevel_tokenizer()

        return fake_from_pretrained

    monkeypatch.setattr(models_module.AutoModelForCausalLM, "from_pretrained", record("model"))
    monkeypatch.setattr(models_module.AutoTokenizer, "from_pretrained", record("tokenizer"))
    load_model("some-org/some-model", device="cpu")
    assert calls == [("tokenizer", "absent"), ("model", "absent")]
    calls.clear()
    load_model("some-org/some-model", device="cpu", trust_remote_code=True)
    assert calls == [("tokenizer", True), ("model", True)]


@pytest.mark.parametrize("kwargs", [{"quant": "int3"}, {"quant": "NF5"}, {"device": "tpu"}, {"dtype": "float7"}])
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="unknown"):
        load_model("tiny", **{"device": "cpu", **kwargs})


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_nf4_tiny_has_double_quantised_nf4_layers_and_plain_lm_head(nf4_tiny):
    quantised = {name: m for name, m in nf4_tiny.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantised) == len(PROJECTIONS) * TINY_CONFIG["num_hidden_layers"]
    assert {name.rsplit(".", 1)[-1] for name in quantised} == set(PROJECTIONS)
    for layer in quantised.values():
        assert layer.weight.quant_type == "nf4"
        assert layer.weight.compress_statistics and layer.weight.quant_state.nested  # double quantisation
        assert layer.compute_dtype == torch.float32
        assert layer.support_avx512bf16_for_cpu is False  # disable_bnb_cpu_repack ran
    assert type(nf4_tiny.lm_head) is torch.nn.Linear
    assert nf4_tiny.lm_head.weight.dtype == torch.float32
    assert disable_bnb_cpu_repack(nf4_tiny) == len(quantised)


def test_nf4_logits_are_close_to_full_precision(nf4_tiny, token_ids):
    full = build_tiny_model()  # the same seed-0 weights load_model("tiny") quantised
    with torch.no_grad():
        exact, approx = full(token_ids).logits, nf4_tiny(token_ids).logits
    assert F.cosine_similarity(exact.flatten(), approx.flatten(), dim=0) > 0.95
    assert (exact - approx).abs().max() < 0.3 * exact.abs().max()
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() > 0.5


def _input_gradient(model, token_ids) -> torch.Tensor:
    model.train()
    embeds = model.get_input_embeddings()(token_ids).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=token_ids).loss.backward()
    return embeds.grad.flatten()


def test_nf4_backward_after_eval_forward_is_unchanged(nf4_tiny, token_ids):
    before = _input_gradient(nf4_tiny, token_ids)
    nf4_tiny.eval()
    with torch.no_grad():  # the pattern that triggers bitsandbytes' CPU weight repacking
        nf4_tiny(token_ids)
    after = _input_gradient(nf4_tiny, token_ids)
    nf4_tiny.zero_grad(set_to_none=True)
    assert before.abs().sum() > 0
    assert F.cosine_similarity(before, after, dim=0) > 0.99


# ----------------------------------------------------------------------------- 4-bit self-check


class _PlainSubclass(torch.nn.Linear):  # like Falcon's FalconLinear: nn.Linear's map, its own class
    def forward(self, x):
        return x @ self.weight.T


class _NotLinear(torch.nn.Linear):
    def forward(self, x):
        return torch.tanh(super().forward(x))


def test_nf4_quantises_plain_linear_subclasses_and_refuses_other_leftovers(token_ids):
    from peft_train.models import ModelLoadError, nf4_config, quantise_remaining_linear

    model, _ = load_model("tiny", quant="nf4", device="cpu")
    by_transformers = model.model.layers[0].mlp.down_proj  # the same weights, quantised by transformers
    layer = build_tiny_model().model.layers[0].mlp.down_proj
    plain = _PlainSubclass(layer.in_features, layer.out_features, bias=False)
    plain.weight.data.copy_(layer.weight.data)
    model.model.layers[0].mlp.down_proj = plain
    assert quantise_remaining_linear(model, nf4_config(torch.device("cpu"))) == ["model.layers.0.mlp.down_proj"]
    quantised = model.model.layers[0].mlp.down_proj
    assert isinstance(quantised, bnb.nn.Linear4bit) and quantised.source_cls is _PlainSubclass
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(quantised(x), by_transformers(x))  # the very same NF4 quantisation

    model.model.layers[0].mlp.up_proj = _NotLinear(128, 384, bias=False)
    with pytest.raises(ModelLoadError, match="left 1 in full precision.*_NotLinear.*up_proj"):
        quantise_remaining_linear(model, nf4_config(torch.device("cpu")))


def test_nf4_load_that_quantises_nothing_is_refused():
    from peft_train.models import ModelLoadError, nf4_config, quantise_remaining_linear

    model = build_tiny_model()
    for layer in model.model.layers:  # every projection becomes a type that is not a plain linear map
        for name in PROJECTIONS:
            parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            old = getattr(parent, name)
            setattr(parent, name, _NotLinear(old.in_features, old.out_features, bias=False))
    with pytest.raises(ModelLoadError, match="quantised 0 linear layer"):
        quantise_remaining_linear(model, nf4_config(torch.device("cpu")))


@pytest.mark.parametrize("name", ["./nowhere", "/no/such/folder", "a/b/c"])
def test_missing_model_folders_are_named(name):
    from peft_train.models import ModelLoadError

    with pytest.raises(ModelLoadError, match=f"model folder {name} does not exist") as error:
        load_model(name, device="cpu")
    assert error.value.source == name
