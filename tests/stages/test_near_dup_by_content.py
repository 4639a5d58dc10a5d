"""Near-duplicates keyed on content: a re-templated question with a near-identical answer is a near-duplicate
when both questions name the same thing; a shared (generic) answer alone, or a shared subject alone, is not."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from dpsel.cli import app
from dpsel.curation.stages import INDEX_FILE, INDEX_META_FILE, load_index
from dpsel.errors import DpselInputError
from dpsel.stages.base import ConversationBatch
from dpsel.stages.content_keys import keys_of
from dpsel.stages.near_dup import NearDup, NearDupIndex, SpilledSketch
from dpsel.stages.options import StagesConfig

from builders import docs, make_table

LISTDIR = ("It returns a list containing the names of the entries in the directory given by path, "
           "in arbitrary order, without the special entries for the directory itself and its parent.")
EDITED = LISTDIR.replace("arbitrary", "unspecified")          # one word of the answer differs
FILLER = [f"Tell me about {w} please." for w in docs(6, words=1, seed=11)]
FILLER_ANSWERS = docs(6, words=25, seed=12)


def _verdict(questions, answers, **kw):
    return NearDup(**kw)(ConversationBatch(make_table(questions, answers)))


def test_keys_are_the_named_things_of_a_question():
    keys, row = keys_of(pa.array(["Describe `os.listdir` in a sentence or two.",
                                  "In Python's standard library, what is `os.listdir` for?",
                                  "Where was Albert Einstein born? E.g. in 1879", "Say yes."]))
    assert list(zip(row.tolist(), keys.to_pylist())) == [(0, "os.listdir"), (1, "os.listdir"), (2, "1879"),
                                                         (2, "albert einstein")]


def test_a_quoted_phrase_is_a_key_and_sharing_one_key_of_several_is_not_the_same_subject():
    keys, row = keys_of(pa.array(['In the `gnupg` manual, what is "Agent Signals"?', 'Say “hi there” and "open']))
    assert set(zip(row.tolist(), keys.to_pylist())) == {(0, "gnupg"), (0, "agent signals"), (1, "hi there")}
    signals = ("A running {} may be controlled by signals, i.e. using the kill command to send a signal to the "
               "process, which then reloads its configuration.")
    questions = ['In the `gnupg` manual, what is "Agent Signals"?', 'In the `gnupg` manual, what is "Dirmngr Signals"?',
                 'What does the `gnupg` manual say about "Agent Signals"?']
    answers = [signals.format("gpg-agent"), signals.format("dirmngr"), signals.format("gpg-agent daemon")]
    verdict = _verdict(questions, answers)          # two sections of one manual, documented alike, stay apart
    assert verdict.reason.tolist() == ["", "", "near_duplicate"] and verdict.dup_of[2] == "id00000"


def test_a_retemplated_question_with_a_lightly_edited_answer_is_a_near_duplicate():
    questions = ["Describe `os.listdir` in a sentence or two.", *FILLER,
                 "In Python's standard library, what is `os.listdir` for?"]
    verdict = _verdict(questions, [LISTDIR, *FILLER_ANSWERS, EDITED])
    assert verdict.reason.tolist() == [""] * 7 + ["near_duplicate"] and verdict.dup_of[7] == "id00000"
    assert verdict.detail[7].startswith("near_duplicate of id00000 (answer Jaccard ")
    assert verdict.detail[7].endswith(", same `os.listdir`)")
    # the whole-conversation rule alone misses it (the case this rule is for)
    assert _shingle_jaccard(f"{questions[0]}\n{LISTDIR}", f"{questions[-1]}\n{EDITED}") < 0.8


def _shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(text):
        words = re.sub(r"[^\w\s]+", " ", text.lower()).split()
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


def test_the_conversation_rule_still_finds_copies_and_says_so():
    text = docs(1, words=80, seed=13)[0]
    verdict = _verdict([text, f"### Instruction:\n{text}\n\n### Response:"], ["ok", "ok"])
    assert verdict.reason.tolist() == ["", "near_duplicate"]
    assert verdict.detail[1].startswith("near_duplicate of id00000 (conversation Jaccard 0.")


def test_a_shared_generic_answer_to_different_questions_pairs_nothing():
    boiler = ("This function is part of the standard library; see the official documentation for its full "
              "behaviour and for the errors it can raise.")
    questions = ["What does `os.path.join` do?", "What does `os.remove` do?", "Explain `shutil.copy` briefly.",
                 "Is Mount Everest in Nepal?", "Is 17 a prime number?", "Is the sky blue?",
                 "Who wrote Moby Dick?", "Do you know what `foo.bar` means?", "What happened in 1815 at Waterloo?"]
    answers = [boiler] * 3 + ["Yes."] * 3 + ["I don't know the answer to that question, I am sorry about it."] * 3
    verdict = _verdict(questions, answers)
    assert (verdict.reason == "").all(), verdict.detail


def test_the_same_subject_with_different_answers_pairs_nothing():
    questions = ["What does `os.listdir` return?", "Is `os.listdir` recursive?", "Describe `os.listdir` briefly.",
                 "When should I avoid `os.listdir`?"]
    answers = [LISTDIR,
               "No, it only looks at one directory level; use os.walk to descend into every subdirectory below it.",
               "Lists a folder's contents as strings, skips the dot entries and never follows symbolic links.",
               "Avoid it for huge folders: os.scandir yields entries lazily and gives file types without extra calls."]
    assert (_verdict(questions, answers).reason == "").all()


def test_a_short_answer_pairs_only_when_it_says_something_specific():
    questions = ["Is `os.listdir` recursive?", "Tell me: is `os.listdir` thread-safe, yes or no?",
                 "Describe `numpy.ravel` briefly (a web service).", "How is `numpy.ravel` used for a web service?",
                 "What does `torch.flatten` do?"]
    answers = ["No, it is not.", "No, it is not.",                      # stop words only: never pairs
               "Return a contiguous flattened array.", "Return a contiguous flattened list.",     # one edit
               "Return a contiguous flattened array."]                  # the same words about another subject
    verdict = _verdict(questions, answers)
    assert verdict.reason.tolist() == ["", "", "", "near_duplicate", ""] and verdict.dup_of[3] == "id00002"
    assert verdict.detail[3].endswith(", same `numpy.ravel`)")


def test_two_edits_of_a_ten_word_answer_still_pair():
    answer = "Return the indices of the lower triangle of a matrix."
    edited = answer.replace("indices", "positions").replace("matrix", "tensor")
    verdict = _verdict(["What does `torch.tril_indices` do?", "Explain `torch.tril_indices` to me."], [answer, edited])
    assert verdict.reason.tolist() == ["", "near_duplicate"]


def test_the_seen_index_finds_a_retemplated_copy_and_spilled_sketches_agree(tmp_path):
    first = NearDup()
    first(ConversationBatch(make_table(["Describe `os.listdir` in a sentence or two.", *FILLER],
                                       [LISTDIR, *FILLER_ANSWERS], ids=[f"old{i}" for i in range(7)])))
    first.index.save(tmp_path / "seen.npz")
    later = NearDup(seen=NearDupIndex.load(tmp_path / "seen.npz"))
    verdict = later(ConversationBatch(make_table(["In Python's standard library, what is `os.listdir` for?"],
                                                 [EDITED], ids=["new0"])))
    assert verdict.reason.tolist() == ["near_duplicate"] and verdict.dup_of[0] == "old0"
    assert "answer Jaccard" in verdict.detail[0] and "`os.listdir`" in verdict.detail[0]
    # the streamed filter reads the sketches back from files: the same clusters
    both = ConversationBatch(make_table(["Describe `os.listdir` in a sentence or two.", *FILLER,
                                         "In Python's standard library, what is `os.listdir` for?"],
                                        [LISTDIR, *FILLER_ANSWERS, EDITED]))
    block = NearDup()
    held, empty = block.extended(both)
    spilled = {name: SpilledSketch(tmp_path / name, block.widths[name][0]) for name in ("sketch", "answer_sketch")}
    for name, sketch in spilled.items():
        sketch[0:len(held)] = getattr(held, name)
    on_disk = block.keepers(dataclasses.replace(held, **spilled), empty.copy(), 0)[0]
    in_memory = block.keepers(held, empty.copy(), 0)[0]
    assert np.array_equal(on_disk.keeper, in_memory.keeper) and on_disk.keeper.tolist() == [*range(7), 0]


def test_curate_holds_the_index_on_disk_until_the_scorer_takes_it(tmp_path):
    """The index `curate` spills after the stages saves as the index itself would; unsaved, its file goes."""
    import gc
    from dpsel.curation.stages import SpilledIndex, save_index
    block = NearDup()
    block(ConversationBatch(make_table(["Describe `os.listdir` in a sentence or two.", *FILLER],
                                       [LISTDIR, *FILLER_ANSWERS])))
    spilled = SpilledIndex(block.index)
    assert len(spilled) == len(block.index) == 7 and spilled.path.exists()
    (tmp_path / "held").mkdir()
    (tmp_path / "spilled").mkdir()
    save_index(tmp_path / "held", block.index, StagesConfig())
    save_index(tmp_path / "spilled", spilled, StagesConfig())
    assert (tmp_path / "held" / INDEX_META_FILE).read_text() == (tmp_path / "spilled" / INDEX_META_FILE).read_text()
    held, moved = (NearDupIndex.load(tmp_path / d / INDEX_FILE) for d in ("held", "spilled"))
    assert all(np.array_equal(getattr(held, n), getattr(moved, n)) for n in held.names)
    assert not spilled.path.exists()           # moved into scorer/
    dropped = SpilledIndex(block.index)
    path = dropped.path
    del dropped
    gc.collect()
    assert not path.exists()


def test_an_index_saved_before_the_answer_rule_loads_and_a_broken_one_exits_2(tmp_path):
    block = NearDup()
    block(ConversationBatch(make_table(["Describe `os.listdir` in a sentence or two."], [LISTDIR], ids=["old0"])))
    index = block.index
    np.savez(tmp_path / INDEX_FILE, ids=index.ids, bands=index.bands, sketch=index.sketch)   # the old format
    (tmp_path / INDEX_META_FILE).write_text(json.dumps({"threshold": 0.8, "rows": 1}))
    old = load_index(tmp_path, StagesConfig())
    assert old.answer_missing and not old.keys.any()
    later = NearDup(seen=old)
    verdict = later(ConversationBatch(make_table(["Describe `os.listdir` in a sentence or two.",
                                                  "In Python's standard library, what is `os.listdir` for?"],
                                                 [LISTDIR, EDITED], ids=["new0", "new1"])))
    # old rows pair by the conversation rule only (they have no answer signatures), as the log says; new rows
    # pair with each other by both (new1 reaches old0 through new0, and its detail says so)
    assert verdict.reason.tolist() == ["near_duplicate"] * 2 and verdict.dup_of.tolist() == ["old0"] * 2
    assert verdict.detail[0].startswith("near_duplicate of old0 (conversation Jaccard")
    assert " with new0, same `os.listdir`)" in verdict.detail[1]
    np.savez(tmp_path / INDEX_FILE, ids=index.ids, bands=index.bands, sketch=index.sketch,
             answer_bands=index.answer_bands[:, :3], answer_sketch=index.answer_sketch, keys=index.keys)
    with pytest.raises(DpselInputError, match=INDEX_FILE):
        load_index(tmp_path, StagesConfig())


def test_filter_drops_a_retemplated_copy_of_a_curated_row(tmp_path):
    rows = [{"instruction": "Describe `os.listdir` in a sentence or two.", "output": LISTDIR},
            *({"instruction": q, "output": a} for q, a in zip(FILLER, FILLER_ANSWERS))]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame([{"instruction": "meta `z.q` row", "output": "ok"}]).to_parquet(tmp_path / "meta.parquet")
    runner = CliRunner()
    result = runner.invoke(app, ["curate", "--train", str(tmp_path / "train.parquet"), "--meta",
                                 str(tmp_path / "meta.parquet"), "--out", str(tmp_path / "run"), "--method", "random",
                                 "--budget", "1.0"])
    assert result.exit_code == 0, result.output
    pd.DataFrame([{"instruction": "In Python's standard library, what is `os.listdir` for?", "output": EDITED},
                  {"instruction": "What does `os.remove` do?", "output": EDITED}]).to_parquet(tmp_path / "new.parquet")
    result = runner.invoke(app, ["filter", "--scorer", str(tmp_path / "run" / "scorer"), "--in",
                                 str(tmp_path / "new.parquet"), "--out", str(tmp_path / "f"), "--threshold", "0"])
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(tmp_path / "f" / "scores.parquet")
    curated = pd.read_parquet(tmp_path / "run" / "scores.parquet").dpsel_id.tolist()
    assert scores.dpsel_reason.tolist() == ["near_duplicate", ""]
    assert scores.dpsel_dup_of[0] == curated[0] and "same `os.listdir`" in scores.dpsel_detail[0]


def test_ray_signs_the_answer_rule_as_this_process_does(ray_local, monkeypatch):
    """Both rules' signatures and the question keys computed by Ray actors (several blocks) give the local index
    and verdicts, details included."""
    from dpsel.engines import RayOptions
    from dpsel.engines.ray_engine import RayBlocks
    from dpsel.stages import near_dup
    from dpsel.stages.base import mapping_blocks_on
    monkeypatch.setattr(near_dup, "CHUNK_ROWS", 3)
    table = make_table(["Describe `os.listdir` in a sentence or two.", *FILLER,
                        "In Python's standard library, what is `os.listdir` for?"], [LISTDIR, *FILLER_ANSWERS, EDITED])
    local, on_ray = NearDup(), NearDup()
    expected = local(ConversationBatch(table))
    with mapping_blocks_on(RayBlocks(RayOptions(workers=2))):
        got = on_ray(ConversationBatch(table))
    assert got.reason.tolist() == expected.reason.tolist() and got.reason[-1] == "near_duplicate"
    assert got.detail.tolist() == expected.detail.tolist()
    for name in local.index.names:
        assert np.array_equal(getattr(on_ray.index, name), getattr(local.index, name)), name
