"""Chat messages → token ids with response-only labels; padding, length-grouped batching, per-row NLL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that cross_entropy skips (prompt and padding positions)
MIN_PROMPT_TAIL = 16  # prompt tokens kept when truncating, so the response keeps some context
MEGA_CHUNK_BATCHES = 50  # batches per shuffled chunk that is sorted by length (as in HF's LengthGroupedSampler)


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens, the token id on response tokens
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedSet:
    examples: list[EncodedExample]
    n_truncated: int = 0
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(e) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]


def _render_prompt_and_response(messages: Sequence[Mapping], tokenizer) -> tuple[str, str]:
    """Split the chat rendering into the prompt (ending in the assistant header) and the final response."""
    if not messages:
        raise ValueError("a conversation needs at least one message (the assistant's response)")
    if messages[-1].get("role") != "assistant":
        raise ValueError(f"the last message must be the assistant's response, got role {messages[-1].get('role')!r}")
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the conversation")
    return prompt, full[len(prompt) :]


def _token_ids(tokenizer, text: str) -> list[int]:
    # The chat template already placed every special token (bos, eos) the text needs.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _ends_with_eos(response_ids: list[int], eos_id: int | None) -> bool:
    return eos_id is None or eos_id in response_ids[-2:]  # some templates put a newline after eos


def _truncate(prompt_ids: list[int], response_ids: list[int], max_length: int, bos_id: int | None):
    """Fit into max_length: cut the prompt from the left (keeping bos and a short tail), then the response's end."""
    tail_floor = min(len(prompt_ids), max(1, min(MIN_PROMPT_TAIL, max_length // 4)))
    n_prompt = max(max_length - len(response_ids), tail_floor)  # <= len(prompt_ids) whenever truncation is due
    keep_bos = n_prompt >= 2 and bos_id is not None and prompt_ids[0] == bos_id
    if keep_bos:  # the model was trained with bos first; keep it and drop the oldest turns after it
        kept_prompt = prompt_ids[:1] + prompt_ids[len(prompt_ids) - (n_prompt - 1) :]
    else:
        kept_prompt = prompt_ids[len(prompt_ids) - n_prompt :]
    return kept_prompt, response_ids[: max_length - n_prompt]


def encode_messages(messages: Sequence[Mapping], tokenizer, max_length: int) -> EncodedExample:
    """Tokenise a conversation whose last message is the assistant's; loss only on that response (+ eos)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a context token and a predicted token), got {max_length}")
    prompt_text, response_text = _render_prompt_and_response(messages, tokenizer)
    prompt_ids, response_ids = _token_ids(tokenizer, prompt_text), _token_ids(tokenizer, response_text)
    if not _ends_with_eos(response_ids, tokenizer.eos_token_id):
        response_ids.append(tokenizer.eos_token_id)
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated:
        prompt_ids, response_ids = _truncate(prompt_ids, response_ids, max_length, tokenizer.bos_token_id)
    return EncodedExample(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        truncated=truncated,
    )


def encode_all(
    list_of_messages: Sequence[Sequence[Mapping]], tokenizer, max_length: int, progress: bool = False
) -> EncodedSet:
    """``encode_messages`` over a list of conversations, counting how many were truncated."""
    conversations = list_of_messages
    if progress:
        from tqdm.auto import tqdm

        conversations = tqdm(list_of_messages, desc="encoding", unit="row")
    examples = [encode_messages(messages, tokenizer, max_length) for messages in conversations]
    return EncodedSet(examples=examples, n_truncated=sum(e.truncated for e in examples))


def _field(example, name: str) -> list[int]:
    return example[name] if isinstance(example, Mapping) else getattr(example, name)


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` with pad, ``labels`` with -100, and the attention mask."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(_field(e, "input_ids")) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids, row_labels = _field(example, "input_ids"), _field(example, "labels")
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[row, : len(row_labels)] = torch.as_tensor(row_labels, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _chunk(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[start : start + size]) for start in range(0, len(indices), size)]


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding); every index exactly once, deterministic per seed.

    shuffle=True: shuffle, sort each chunk of ``MEGA_CHUNK_BATCHES`` batches by length, shuffle the batch order
    and put the batch holding the longest example first (an out-of-memory shows up at once).
    shuffle=False: all indices sorted by length, longest first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    lengths = np.asarray(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return _chunk(order.tolist(), batch_size)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    batches: list[list[int]] = []
    for mega in _chunk(order.tolist(), batch_size * MEGA_CHUNK_BATCHES):
        mega_sorted = sorted(mega, key=lambda i: -lengths[i])
        batches.extend(_chunk(mega_sorted, batch_size))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]), default=0)
    if batches:
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over each row's label tokens (shifted by one); 0 for a row without label tokens."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(logits.device)
    token_nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    counts = (shifted_labels != IGNORE_INDEX).sum(dim=1)
    return token_nll.sum(dim=1) / counts.clamp(min=1)


def sequence_nll(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Forward pass, then ``per_example_nll``; keeps the graph (wrap in ``torch.no_grad()`` to score only)."""
    device = next(model.parameters()).device
    outputs = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
    )
    return per_example_nll(outputs.logits, batch["labels"])
