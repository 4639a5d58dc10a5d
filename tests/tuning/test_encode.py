"""ByteTokenizer and peft_train.encode: round trips, chat template, label masking, truncation, batching, NLL."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_train.encode import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_all,
    encode_messages,
    length_grouped_batches,
    per_example_nll,
    sequence_nll,
)
from peft_train.models import build_tiny_model
from peft_train.tokenizer import ByteTokenizer

# ---------------------------------------------------------------- tokenizer


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_decode_encode_round_trips_any_text(byte_tokenizer, text):
    ids = byte_tokenizer.encode(text)
    assert byte_tokenizer.decode(ids) == text
    if not any(special in text for special in ("<pad>", "<s>", "</s>")):
        assert len(ids) == len(text.encode("utf-8"))  # one id per byte: nothing added implicitly


def test_special_token_text_maps_to_special_ids(byte_tokenizer):
    # Like hub tokenizers, a special token's text becomes its id (the chat template relies on that).
    assert byte_tokenizer.encode("a</s>") == [ord("a") + 3, 2]


def test_special_token_ids_and_vocab(byte_tokenizer):
    assert (byte_tokenizer.pad_token_id, byte_tokenizer.bos_token_id, byte_tokenizer.eos_token_id) == (0, 1, 2)
    assert byte_tokenizer.vocab_size == len(byte_tokenizer) == 259
    assert byte_tokenizer.encode("A") == [ord("A") + 3]
    assert byte_tokenizer.decode([1, ord("h") + 3, ord("i") + 3, 2], skip_special_tokens=True) == "hi"


def test_save_pretrained_round_trip(byte_tokenizer, tmp_path):
    byte_tokenizer.save_pretrained(tmp_path)
    loaded = ByteTokenizer.from_pretrained(tmp_path)
    text = "héllo </s> wörld 😀"
    assert type(loaded) is ByteTokenizer
    assert loaded.encode(text) == byte_tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.chat_template == byte_tokenizer.chat_template
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_chat_template_renders_roles_eos_and_generation_prompt(byte_tokenizer, chat):
    full = byte_tokenizer.apply_chat_template(chat, tokenize=False)
    prompt = byte_tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    assert full == "<s><|system|>\nYou are terse.\n<|user|>\nCapital of France?\n<|assistant|>\nParis.</s>"
    assert prompt == "<s><|system|>\nYou are terse.\n<|user|>\nCapital of France?\n<|assistant|>\n"
    assert full.startswith(prompt)


# ---------------------------------------------------------------- encode_messages


def test_labels_mask_the_prompt_and_keep_the_response(byte_tokenizer, chat):
    example = encode_messages(chat, byte_tokenizer, max_length=512)
    prompt_ids = byte_tokenizer.encode(
        byte_tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    )
    n_prompt = len(prompt_ids)
    assert not example.truncated
    assert example.input_ids[:n_prompt] == prompt_ids
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert byte_tokenizer.decode(example.labels[n_prompt:]) == "Paris.</s>"
    assert example.input_ids[-1] == byte_tokenizer.eos_token_id


def test_last_message_must_be_the_assistants(byte_tokenizer, chat):
    with pytest.raises(ValueError, match="assistant"):
        encode_messages(chat[:-1], byte_tokenizer, max_length=64)
    with pytest.raises(ValueError):
        encode_messages([], byte_tokenizer, max_length=64)


def test_long_prompt_is_cut_from_the_left_keeping_bos_and_the_whole_response(byte_tokenizer):
    chat = [{"role": "user", "content": "x" * 300 + "QUESTION?"}, {"role": "assistant", "content": "answer"}]
    example = encode_messages(chat, byte_tokenizer, max_length=64)
    assert example.truncated and len(example) == 64
    assert example.input_ids[0] == byte_tokenizer.bos_token_id
    text = byte_tokenizer.decode(example.input_ids)
    assert text.endswith("QUESTION?\n<|assistant|>\nanswer</s>")
    assert byte_tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == "answer</s>"


def test_long_response_keeps_a_prompt_tail_and_cuts_the_response_end(byte_tokenizer):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * 500}]
    example = encode_messages(chat, byte_tokenizer, max_length=64)
    n_prompt = example.labels.count(IGNORE_INDEX)
    assert example.truncated and len(example) == 64
    assert n_prompt == 16  # MIN_PROMPT_TAIL (64 // 4 = 16), bos included
    assert byte_tokenizer.decode(example.input_ids[:n_prompt]).endswith("<|assistant|>\n")
    assert set(example.input_ids[n_prompt:]) == {ord("y") + 3}


@settings(max_examples=60, deadline=None)
@given(prompt_len=st.integers(0, 200), response_len=st.integers(0, 200), max_length=st.integers(2, 160))
def test_truncation_invariants(byte_tokenizer, prompt_len, response_len, max_length):
    chat = [{"role": "user", "content": "p" * prompt_len}, {"role": "assistant", "content": "r" * response_len}]
    example = encode_messages(chat, byte_tokenizer, max_length=max_length)
    untruncated = encode_messages(chat, byte_tokenizer, max_length=10_000)
    n_prompt = example.labels.count(IGNORE_INDEX)
    assert len(example) == min(max_length, len(untruncated))
    assert example.truncated == (len(untruncated) > max_length)
    assert n_prompt >= 1 and len(example) - n_prompt >= 1  # context and at least one trained token
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # prompt first, then the response only
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    response = untruncated.input_ids[untruncated.labels.count(IGNORE_INDEX) :]
    assert example.input_ids[n_prompt:] == response[: len(example) - n_prompt]  # response start is kept


def test_encode_all_counts_truncated(byte_tokenizer, chat):
    long_chat = [{"role": "user", "content": "z" * 200}, {"role": "assistant", "content": "ok"}]
    encoded = encode_all([chat, long_chat, chat, long_chat, long_chat], byte_tokenizer, max_length=100)
    assert len(encoded) == 5
    assert encoded.n_truncated == 3
    assert [e.truncated for e in encoded.examples] == [False, True, False, True, True]
    assert encoded.lengths == [len(e) for e in encoded.examples]
    assert encode_all([chat], byte_tokenizer, max_length=100, progress=True).n_truncated == 0


# ---------------------------------------------------------------- collate and batching


def test_collate_right_pads():
    examples = [EncodedExample([5, 6, 7], [-100, 6, 7]), EncodedExample([8], [8])]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 500), max_size=300),
    batch_size=st.integers(1, 17),
    seed=st.integers(0, 2**16),
    shuffle=st.booleans(),
)
def test_batches_cover_every_index_once_and_are_deterministic(lengths, batch_size, seed, shuffle):
    batches = length_grouped_batches(lengths, batch_size, seed, shuffle=shuffle)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(batch) <= batch_size for batch in batches)
    assert batches == length_grouped_batches(lengths, batch_size, seed, shuffle=shuffle)
    if lengths:
        assert max(lengths) in [lengths[i] for i in batches[0]]


def test_batches_group_lengths_and_depend_on_seed():
    lengths = torch.randint(1, 1000, (2000,), generator=torch.Generator().manual_seed(1)).tolist()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = length_grouped_batches(lengths, 8, seed=0)
    in_order = [list(range(s, min(s + 8, 2000))) for s in range(0, 2000, 8)]
    assert padding(grouped) < 0.1 * padding(in_order)
    assert grouped != length_grouped_batches(lengths, 8, seed=1)
    unshuffled = length_grouped_batches(lengths, 8, seed=0, shuffle=False)
    assert [lengths[i] for b in unshuffled for i in b] == sorted(lengths, reverse=True)


# ---------------------------------------------------------------- NLL


def test_per_example_nll_matches_hand_computation():
    logits = torch.randn(3, 5, 11)
    labels = torch.tensor([[-100, -100, 4, 7, 1], [-100, 3, 3, -100, -100], [-100, -100, -100, -100, -100]])
    expected = []
    for row in range(3):
        terms = [
            F.cross_entropy(logits[row, t - 1 : t], labels[row, t : t + 1])
            for t in range(1, 5)
            if labels[row, t] != -100
        ]
        expected.append(torch.stack(terms).mean() if terms else torch.tensor(0.0))
    torch.testing.assert_close(per_example_nll(logits, labels), torch.stack(expected))


def test_per_example_nll_row_without_labels_is_zero_with_finite_gradient():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.tensor([[-100] * 4, [-100, 1, 2, 3]])
    nll = per_example_nll(logits, labels)
    nll.sum().backward()
    assert nll[0].item() == 0.0 and nll[1].item() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad[0].abs().sum() == 0


def test_sequence_nll_matches_the_models_own_loss(byte_tokenizer, chat):
    model = build_tiny_model(seed=0).eval()
    other = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there, friend"}]
    examples = [encode_messages(c, byte_tokenizer, max_length=128) for c in (chat, other)]
    batch = collate(examples, byte_tokenizer.pad_token_id)
    with torch.no_grad():
        nll = sequence_nll(model, batch)
        for row, example in enumerate(examples):
            single = collate([example], byte_tokenizer.pad_token_id)
            loss = model(input_ids=single["input_ids"], labels=single["labels"]).loss
            torch.testing.assert_close(nll[row], loss, rtol=1e-4, atol=1e-5)


def test_ids_beyond_the_byte_vocabulary_decode_to_nothing(byte_tokenizer):
    """The tiny model's padded vocabulary (320) exceeds the tokenizer's (259): stray ids must not crash decoding."""
    ids = byte_tokenizer.encode("ab") + [284, 319] + byte_tokenizer.encode("c")
    assert byte_tokenizer.decode(ids) == "abc"
