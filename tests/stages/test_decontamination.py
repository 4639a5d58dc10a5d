"""Decontamination matches user and assistant content only, ignores template n-grams and scores a pool row by
the share of an eval text's n-grams it holds: chat-shaped rows with system turns, boilerplate, re-templated
copies, short questions; through the block, `dpsel curate` and the streamed `dpsel filter`."""
from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pyarrow as pa
from typer.testing import CliRunner

from dpsel.cli import app
from dpsel.data import read_instruction_set
from dpsel.stages.base import ConversationBatch
from dpsel.stages.decontaminate import Decontaminate, EvalRows

runner = CliRunner()
SYSTEM = "You are a helpful assistant today."                      # 6 words, shared by eval and pool
BOILERPLATE = ("See https://example.org/policy for details of the policy that governs this answer "
               "and any text quoted in it.")


def _words(rng: random.Random, k: int) -> str:
    return " ".join(f"{rng.choice('bcdfgklmnprst')}{rng.choice('aeiou')}{rng.randrange(500)}" for _ in range(k))


def _messages(system: str | None, user: str, assistant: str) -> list[dict]:
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def chat_table(rows: list[tuple], prefix: str = "p") -> pa.Table:
    """(system or None, user, assistant) per row -> the table the stages read."""
    return pa.table({"dpsel_id": [f"{prefix}{i}" for i in range(len(rows))],
                     "dpsel_messages": [_messages(*row) for row in rows]})


def eval_rows(rows: list[tuple]) -> EvalRows:
    table = chat_table(rows, prefix="e")
    return EvalRows.from_messages(table.column("dpsel_id").to_pylist(), ["eval.parquet"] * len(rows),
                                  table.column("dpsel_messages").combine_chunks())


def _keyless(rows: list[tuple]) -> list[tuple]:
    """The rows with every digit spelled as a letter: their questions name nothing (`content_keys`)."""
    table = str.maketrans("0123456789", "abcdefghij")
    return [tuple(t.translate(table) if t else t for t in row) for row in rows]


def _flagged(block: Decontaminate, pool: list[tuple]) -> list[int]:
    return np.flatnonzero(block(ConversationBatch(chat_table(pool))).reason != "").tolist()


def _qa(seed: int, n: int, question: int = 20, answer: int = 30) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(_words(rng, question), _words(rng, answer)) for _ in range(n)]


def test_a_shared_system_prompt_contaminates_nothing():
    evals = [(SYSTEM, q, a) for q, a in _qa(1, 10)]
    pool = [(SYSTEM, q, a) for q, a in _qa(2, 40)] + [(SYSTEM, "hello", "hi"), (SYSTEM, "", "")]
    assert _flagged(Decontaminate(eval_rows(evals)), pool) == []
    assert _flagged(Decontaminate([SYSTEM]), pool) == []          # not even as a plain eval text


def test_a_retemplated_copy_is_caught_whatever_its_system_prompt():
    evals = [(SYSTEM, q, a) for q, a in _qa(3, 6)]
    (q0, a0), (q1, _) = evals[0][1:], evals[1][1:]
    pool = [(SYSTEM, q, a) for q, a in _qa(4, 10)]
    pool += [("Answer as a patient tutor would.", f"### Instruction:\n{q0}\n\n### Response:", a0),   # 10
             (None, f"Question: {q1} Please answer briefly.", _words(random.Random(5), 30))]        # 11
    verdict = Decontaminate(eval_rows(evals))(ConversationBatch(chat_table(pool)))
    assert np.flatnonzero(verdict.reason != "").tolist() == [10, 11]
    assert verdict.detail[10] == "contaminated: 1.00 of the user 13-grams of eval row e0 (eval.parquet)"
    assert verdict.detail[11] == "contaminated: 1.00 of the user 13-grams of eval row e1 (eval.parquet)"


def test_boilerplate_alone_flags_nothing():
    rng = random.Random(6)
    # in 2 eval rows the paragraph is most of the answer; 30 pool rows carry it: a pool-side template
    evals = [(SYSTEM, q, f"{_words(rng, 4)}\n{BOILERPLATE}" if k < 2 else a) for k, (q, a) in enumerate(_qa(7, 6))]
    pool = [(SYSTEM, q, f"{a}\n{BOILERPLATE}") for q, a in _qa(8, 30)] + [evals[0]]    # 30: a real copy
    assert _flagged(Decontaminate(eval_rows(evals)), pool) == [30]
    # without the cut, questions that name different things still keep the paragraph from counting ...
    assert _flagged(Decontaminate(eval_rows(evals), pool_df_max=10**9), pool) == [30]
    # ... but questions that name nothing (no key to compare) need the cut
    evals, pool = _keyless(evals), _keyless(pool)
    assert _flagged(Decontaminate(eval_rows(evals)), pool) == [30]
    assert len(_flagged(Decontaminate(eval_rows(evals), pool_df_max=10**9), pool)) == 31
    # in 8 eval rows (more than 5): an eval-side template, whatever the pool holds
    evals = [(SYSTEM, q, f"{a}\n{BOILERPLATE}") for q, a in _qa(9, 8, answer=3)]
    pool = [(SYSTEM, q, f"{BOILERPLATE}") for q, _ in _qa(10, 3)]
    assert _flagged(Decontaminate(eval_rows(evals)), pool) == []


def test_a_short_eval_question_is_caught_and_a_tiny_answer_is_not():
    evals = [(SYSTEM, "What is the sum of two and two?", "4"), (None, "Name a colour.", "Red")]
    pool = [(SYSTEM, "Please help: what is the sum of two and two? Thanks a lot.", "Four."),     # caught
            (SYSTEM, "How many legs does a dog have?", "4"),                                  # same answer
            (SYSTEM, "4", "Four is a number."),                                               # the answer as a prompt
            ("What is the sum of two and two?", "Tell me a joke.", "No."),                    # only in the system turn
            (SYSTEM, "Tell me a word that rhymes with bed.", "Red")]
    verdict = Decontaminate(eval_rows(evals))(ConversationBatch(chat_table(pool)))
    assert np.flatnonzero(verdict.reason != "").tolist() == [0]
    assert verdict.detail[0] == "contaminated: 1.00 of the user text (8 words, in order) of eval row e0 (eval.parquet)"


def test_a_retemplated_short_answer_copy_is_caught_only_under_the_same_subject():
    evals = [(SYSTEM, "Describe `numpy.ravel` briefly (a web service).", "Return a contiguous flattened array."),
             (None, "What does `scipy.fft.fft` do?", "Compute the one-dimensional discrete Fourier Transform.")]
    pool = [(None, "How is `numpy.ravel` used for a web service?", "Return a contiguous flattened array."),   # copy
            (SYSTEM, "What does `torch.flatten` do?", "Return a contiguous flattened array."),        # other subject
            (SYSTEM, "Is `scipy.fft.fft` fast?", "Yes, it uses a fast algorithm."),                 # same subject
            (SYSTEM, "Explain this.", "Return a contiguous flattened array.")]                     # names nothing
    verdict = Decontaminate(eval_rows(evals))(ConversationBatch(chat_table(pool)))
    assert np.flatnonzero(verdict.reason != "").tolist() == [0]
    assert verdict.detail[0] == ("contaminated: 1.00 of the assistant text (5 words, in order) of eval row e0 "
                                 "(eval.parquet)")


def test_formulaic_answers_about_another_subject_are_not_copies():
    def doc(op):
        return (f"Computes the bitwise {op} of input and other. The input tensor must be of integral or Boolean "
                f"types. For bool tensors, it computes the logical {op}.")
    evals = [(SYSTEM, "What does `torch.bitwise_xor` do?", doc("XOR"))]
    pool = [(SYSTEM, "What does `torch.bitwise_or` do?", doc("OR")),                  # half the 13-grams, other key
            (None, "Explain `torch.bitwise_xor` to me.", doc("XOR")),                 # the copy
            (SYSTEM, "What does it do?", doc("OR"))]                                  # names nothing: no key to compare
    assert _flagged(Decontaminate(eval_rows(evals)), pool) == [1, 2]
    unkeyed = Decontaminate(eval_rows(evals))
    unkeyed.keys[:] = 0                               # the key is what spares row 0: it holds >= 0.5 of the 13-grams
    assert _flagged(unkeyed, pool) == [0, 1, 2]


# ---- through the entry points --------------------------------------------------------------------------------

def _files(tmp_path):
    """A chat-shaped pool with three planted copies (16, 17, 18) of an eval set that shares its system prompt
    and carries a boilerplate paragraph in every answer (an eval-side template)."""
    rng = random.Random(11)
    evals = [(SYSTEM, q, f"{a}\n{BOILERPLATE}") for q, a in _qa(12, 8)]
    evals[2] = (SYSTEM, "What is the sum of two and two?", "4")
    pool = [(SYSTEM, q, f"{a}\n{BOILERPLATE}" if k % 2 else a) for k, (q, a) in enumerate(_qa(13, 16))]
    pool += [("Be terse.", evals[0][1], evals[0][2]),                                       # 16: verbatim, other system
             (SYSTEM, f"### Instruction:\n{evals[1][1]}\n\n### Response:", _words(rng, 25)),    # 17: re-templated
             (SYSTEM, "Please help: what is the sum of two and two? Thanks.", "Four."),         # 18: short question
             (SYSTEM, "How many legs does a dog have?", "4")]                                   # 19: same tiny answer
    paths = {name: tmp_path / f"{name}.parquet" for name in ("train", "eval", "meta")}
    for name, rows in (("train", pool), ("eval", evals), ("meta", [(None, _words(rng, 8), "ok") for _ in range(4)])):
        pd.DataFrame({"messages": [_messages(*row) for row in rows]}).to_parquet(paths[name])
    return paths


def _curate(paths, out, *flags):
    result = runner.invoke(app, ["curate", "--train", str(paths["train"]), "--meta", str(paths["meta"]),
                                 "--out", str(out), "--decontaminate", str(paths["eval"]), *flags])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / "scores.parquet")


def test_curate_names_the_eval_row_and_the_overlap_in_dpsel_detail(tmp_path):
    paths = _files(tmp_path)
    scores = _curate(paths, tmp_path / "run", "--method", "all")
    eval_ids = read_instruction_set([str(paths["eval"])]).id_list()
    contaminated = scores[scores.dpsel_reason == "contaminated"]
    assert contaminated.index.tolist() == [16, 17, 18]
    assert contaminated.dpsel_detail.tolist() == [
        f"contaminated: 1.00 of the user 13-grams of eval row {eval_ids[0]} (eval.parquet)",
        f"contaminated: 1.00 of the user 13-grams of eval row {eval_ids[1]} (eval.parquet)",
        f"contaminated: 1.00 of the user text (8 words, in order) of eval row {eval_ids[2]} (eval.parquet)"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["counts"]["dropped_by_stage"]["decontaminate"] == 3


def test_streamed_filter_flags_the_same_rows_as_curate(tmp_path, monkeypatch):
    from dpsel.curation import stream
    paths = _files(tmp_path)
    curated = _curate(paths, tmp_path / "run", "--method", "random", "--budget", "1.0", "--no-near-dup")
    monkeypatch.setattr(stream, "BATCH_ROWS", 3)          # many batches: the pool-side counts grow batch by batch
    result = runner.invoke(app, ["filter", "--scorer", str(tmp_path / "run" / "scorer"), "--in", str(paths["train"]),
                                 "--out", str(tmp_path / "filtered"), "--threshold", "0", "--no-near-dup",
                                 "--decontaminate", str(paths["eval"])])
    assert result.exit_code == 0, result.output
    filtered = pd.read_parquet(tmp_path / "filtered" / "scores.parquet")
    mine = filtered.dpsel_reason == "contaminated"
    assert mine.tolist() == (curated.dpsel_reason == "contaminated").tolist() and mine.sum() == 3
    assert filtered.dpsel_detail[mine].tolist() == curated.dpsel_detail[mine].tolist()
