"""Evaluation after training: per-row eval loss (mean response-token NLL) and greedy exact match, per task too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from peft_train.encode import collate, encode_all, length_grouped_batches, per_example_nll
from peft_train.tokenizer import pad_token_id
from peft_train.training.data import has_response
from peft_train.training.progress import ProgressFn, report


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def row_losses(model, tokenizer, messages, max_length: int = 512, batch_size: int = 16,
               progress: ProgressFn | None = None) -> list[float | None]:
    """Mean response-token NLL of every conversation (None where truncation left no response token)."""
    was_training = model.training
    model.eval()
    encoded = encode_all(messages, tokenizer, max_length)
    device = _model_device(model)
    pad = pad_token_id(tokenizer)
    losses: list[float | None] = [None] * len(encoded.examples)
    for batch_rows in length_grouped_batches(encoded.lengths, batch_size, seed=0, shuffle=False):
        batch = collate([encoded.examples[i] for i in batch_rows], pad)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits
        for row, value in zip(batch_rows, per_example_nll(logits, batch["labels"]).tolist()):
            losses[row] = value if has_response(encoded.examples[row]) else None
        report(progress, sum(v is not None for v in losses), len(losses), "eval_loss")
    model.train(was_training)
    return losses


def _prompt_and_reference(conversation: Sequence[Mapping]) -> tuple[list[Mapping], str]:
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("each evaluation conversation must end with the assistant's reference answer")
    return list(conversation[:-1]), str(conversation[-1].get("content", ""))


def _prompt_ids(tokenizer, prompt: list[Mapping], max_prompt_tokens: int) -> list[int]:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[-max_prompt_tokens:]  # keep the end: the question and the assistant header


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    return input_ids, mask


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: Sequence[Sequence[Mapping]], max_new_tokens: int = 64, batch_size: int = 16,
    max_length: int = 512, progress: ProgressFn | None = None,
) -> list[str]:
    """Greedy completions of chat prompts (the assistant's next turn), decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    pad = pad_token_id(tokenizer)
    max_prompt = max(1, max_length - max_new_tokens)
    ids = [_prompt_ids(tokenizer, list(p), max_prompt) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    answers: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = _left_padded([ids[i] for i in rows], pad)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )
        for row, tokens in zip(rows, generated[:, input_ids.shape[1] :].tolist()):
            answers[row] = tokenizer.decode(tokens, skip_special_tokens=True)
        report(progress, min(start + batch_size, len(order)), len(order), "generate")
    model.train(was_training)
    return answers


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _summary(losses: list[float | None], matches: list[bool] | None, rows: Sequence[int]) -> dict:
    finite = [losses[i] for i in rows if losses[i] is not None]
    summary = {"eval_loss": _mean(finite), "rows": len(rows)}
    if matches is not None:
        summary["eval_exact_match"] = _mean([float(matches[i]) for i in rows])
    return summary


def evaluate(
    model,
    tokenizer,
    messages: Sequence[Sequence[Mapping]],
    max_new_tokens: int = 64,
    exact_match: bool = True,
    tasks: Sequence[str] | None = None,
    batch_size: int = 16,
    max_length: int = 512,
    progress: ProgressFn | None = None,
) -> dict:
    """``eval_loss`` (mean over rows of the response's mean token NLL) and ``eval_exact_match`` (greedy answer
    equal to the reference after stripping surrounding whitespace); with ``tasks`` (one label per row) the
    same under ``per_task``."""
    if not messages:
        raise ValueError("evaluate needs at least one conversation")
    if tasks is not None and len(tasks) != len(messages):
        raise ValueError(f"got {len(tasks)} task labels for {len(messages)} conversations")
    losses = row_losses(model, tokenizer, messages, max_length, batch_size, progress)
    matches = None
    if exact_match:
        prompts, references = zip(*(_prompt_and_reference(m) for m in messages))
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, max_length, progress)
        matches = [a.strip() == r.strip() for a, r in zip(answers, references)]
    result = _summary(losses, matches, range(len(messages)))
    if tasks is not None:
        groups: dict[str, list[int]] = {}
        for index, task in enumerate(tasks):
            groups.setdefault(str(task), []).append(index)
        result["per_task"] = {task: _summary(losses, matches, rows) for task, rows in sorted(groups.items())}
    return result
