"""The curation stages as blocks (dpsel/stages): reasons, dup_of, determinism, accounting."""

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpsel.stages.base import Block, ConversationBatch, Verdict, hash_strings, shingle_hashes
from dpsel.stages.decontaminate import Decontaminate
from dpsel.stages.exact import Exact
from dpsel.stages.filters import FilterRules, Filters
from dpsel.stages.near_dup import NearDup, NearDupIndex, lsh_bands
from dpsel.stages.pii import Pii, find, luhn, scan
from dpsel.stages.options import StagesConfig
from dpsel.stages.pipeline import build_blocks, run_stages
from dpsel.stages.semantic_dup import SemanticDup

from builders import docs, make_table, planted

# ----------------------------------------------------------------------------- shared text views
def test_text_view_and_hashes_are_stable():
    rows = ConversationBatch(make_table(["Hello, World!"], ["Hi  there."], column="messages"))
    assert rows.text.to_pylist() == ["Hello, World!\nHi  there."]
    assert rows.words.to_pylist() == [["hello", "world", "hi", "there"]]
    a, b = hash_strings(pa.array(["abc", "abd", "abc"])), hash_strings(pa.array(["abc"]))
    assert a[0] == a[2] == b[0] != a[1]
    tokens = hash_strings(pa.array(["a", "b", "c", "b", "a"]))
    grams, offsets = shingle_hashes(tokens, np.array([0, 3, 5]), 2)
    assert offsets.tolist() == [0, 2, 3] and grams[0] != grams[2]     # "a b" and "b a" differ


# ----------------------------------------------------------------------------- near-duplicates
def test_near_dup_finds_planted_edits_reorderings_and_templates():
    texts, truth = planted()
    block = NearDup()
    verdict = block(ConversationBatch(make_table(texts)))
    assert set(np.flatnonzero(verdict.reason != "")) == set(range(300, 330))
    assert set(verdict.reason[300:]) == {"near_duplicate"}
    assert verdict.dup_of[300:].tolist() == truth and set(verdict.dup_of[:300]) == {None}
    assert block.stats.as_dict()["by_reason"] == {"near_duplicate": 30} and block.stats.rows_in == 330


def test_near_dup_is_deterministic_and_order_robust():
    texts, _ = planted(seed=1)
    table = make_table(texts)
    first, again = NearDup()(ConversationBatch(table)), NearDup()(ConversationBatch(table))
    assert first.reason.tolist() == again.reason.tolist() and first.dup_of.tolist() == again.dup_of.tolist()
    order = np.random.default_rng(0).permutation(len(texts))
    shuffled = NearDup()(ConversationBatch(table.take(pa.array(order))))
    assert (shuffled.reason != "").sum() == (first.reason != "").sum()

    def clusters(verdict, ids):
        groups = {}
        for rid, of in zip(ids, verdict.dup_of.tolist()):
            groups.setdefault(of or rid, set()).add(rid)
        return {frozenset(g | {k}) for k, g in groups.items() if len(g | {k}) > 1}
    ids = table.column("dpsel_id").to_pylist()
    assert clusters(first, ids) == clusters(shuffled, [ids[i] for i in order])
    kept = [ids[i] for i in order if shuffled.reason[list(order).index(i)] == ""]
    assert len(kept) == 300


def test_near_dup_keeps_distinct_rows_and_threshold_matters():
    texts = docs(200, words=40, seed=3)
    assert (NearDup()(ConversationBatch(make_table(texts))).reason == "").all()
    base = docs(1, words=40, seed=4)[0].split()
    half = " ".join(base[:20] + docs(1, words=20, seed=5)[0].split())      # Jaccard ~ 0.3
    table = make_table([" ".join(base), half])
    assert NearDup(0.8)(ConversationBatch(table)).reason.tolist() == ["", ""]
    assert NearDup(0.2)(ConversationBatch(table)).reason.tolist() == ["", "near_duplicate"]
    with pytest.raises(ValueError):
        NearDup(0)


def test_near_dup_seen_index_drops_copies_of_curated_rows(tmp_path):
    curated = docs(50, seed=6)
    first = NearDup()
    first(ConversationBatch(make_table(curated, ids=[f"old{i}" for i in range(50)])))
    first.index.save(tmp_path / "seen.npz")
    seen = NearDupIndex.load(tmp_path / "seen.npz")
    assert len(seen) == 50 and seen.nbytes == 50 * first.bytes_per_row
    new = [curated[7].replace(curated[7].split()[3], "changed"), *docs(5, seed=7)]
    verdict = NearDup(seen=seen)(ConversationBatch(make_table(new, ids=[f"new{i}" for i in range(6)])))
    assert verdict.reason.tolist() == ["near_duplicate"] + [""] * 5 and verdict.dup_of[0] == "old7"
    streamed = first(ConversationBatch(make_table(new, ids=[f"a-longer-id-than-twenty-bytes-{i}" for i in range(6)])))
    assert streamed.reason.tolist() == verdict.reason.tolist() and len(first.index) == 55   # batch to batch
    assert first.index.ids[-1].decode() == "a-longer-id-than-twenty-bytes-5"


def test_near_dup_memory_is_bounded_per_row():
    block = NearDup()
    # conversation rule 220 B (18 bands of 7, 128 permutations, id), answer rule 164 B (21 bands of 3, 64, 4 keys)
    assert lsh_bands(0.8, 128) == (18, 7) and block.bytes_per_row == 384 <= 400
    block(ConversationBatch(make_table(docs(100, seed=8))))
    assert block.index.nbytes / len(block.index) == 384


# ----------------------------------------------------------------------------- semantic duplicates
def unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("cluster_rows", [10_000, 100])
def test_semantic_dup_keeps_first_of_each_group(cluster_rows):
    rng = np.random.default_rng(0)
    base = unit(rng.normal(size=(400, 32)))
    near = unit(base[:40] + 0.02 * rng.normal(size=(40, 32)))
    vectors = np.concatenate([base, near])
    table = make_table([f"row {i}" for i in range(440)])
    verdict = SemanticDup(0.95, cluster_rows=cluster_rows)(ConversationBatch(table), embeddings=vectors)
    assert set(np.flatnonzero(verdict.reason != "")) == set(range(400, 440))
    assert set(verdict.reason[400:]) == {"semantic_duplicate"}
    assert verdict.dup_of[400:].tolist() == [f"id{i:05d}" for i in range(40)]
    again = SemanticDup(0.95, cluster_rows=cluster_rows)(ConversationBatch(table), embeddings=vectors)
    assert again.dup_of.tolist() == verdict.dup_of.tolist()
    order = np.random.default_rng(1).permutation(440)
    shuffled = SemanticDup(0.95, cluster_rows=cluster_rows)(ConversationBatch(table.take(pa.array(order))),
                                                           embeddings=vectors[order])
    assert (shuffled.reason != "").sum() == 40       # one of each planted pair, whichever comes first
    with pytest.raises(ValueError):
        SemanticDup(0.95)(ConversationBatch(table), embeddings=vectors[:10])


# ----------------------------------------------------------------------------- decontamination
def test_decontaminate_share_of_13_grams_and_short_texts():
    long_eval = " ".join(f"e{i}" for i in range(30))                       # 18 distinct 13-grams
    evals = [long_eval, "what is the capital city of france today", "yes"]
    prompts = [
        "please " + " ".join(f"e{i}" for i in range(22)) + " thanks",      # 10 of its 18 13-grams: 0.56
        " ".join(f"e{i}" for i in range(20)) + " other words here",         # 8 of 18: under half, clean
        "Q: What is the capital city of France today? Answer briefly.",     # short eval text inside
        "e3 e4 e5 e6",                        # a fragment of a long eval text is not a copy of it: clean
        "yes",                                                              # tiny eval text = user message
        "is it raining",                                                     # clean
    ]
    answers = ["a", "a", "a", "e7", "a", "yes"]                            # "yes" as an answer: clean
    block = Decontaminate(evals)
    verdict = block(ConversationBatch(make_table(prompts, answers)))
    assert verdict.reason.tolist() == ["contaminated", "", "contaminated", "", "contaminated", ""]
    assert verdict.detail[0] == "contaminated: 0.56 of the user 13-grams of eval row text 0 (eval texts)"
    assert block.stats.dropped == 3


# ----------------------------------------------------------------------------- filters
def test_filters_default_is_conservative_and_names_rules(tmp_path):
    prompts = ["What is 12 + 7?", "spam " * 80, "\n".join(["the same line again and again"] * 20),
               "#$%^&*()!@#$%^&*()_+{}|:<>?", "Explain why the sky is blue in one short paragraph."]
    verdict = Filters(FilterRules.default())(ConversationBatch(make_table(prompts, ["19", "x", "y", "z", "Rayleigh scattering."])))
    assert verdict.reason.tolist() == ["", "filtered:ngram_repetition", "filtered:line_repetition",
                                       "filtered:non_alpha", ""]
    assert FilterRules.from_spec("none") is None
    rules = tmp_path / "rules.yaml"
    rules.write_text("min_words: 4\nlanguage: {allow: [en], min_confidence: 0.5, min_chars: 20}\n")
    texts = ["Short one", "Dies ist ein deutscher Satz über das Wetter und die Berge im Sommer.",
             "This sentence is written in plain English about the weather."]
    verdict = Filters(FilterRules.from_spec(rules))(ConversationBatch(make_table(texts, ["ok"] * 3)))
    assert verdict.reason.tolist() == ["filtered:min_words", "filtered:language", ""]
    (tmp_path / "bad.yaml").write_text("max_wordz: 3\n")
    with pytest.raises(ValueError, match="unknown filter rules"):
        FilterRules.from_spec(tmp_path / "bad.yaml")


# ----------------------------------------------------------------------------- PII
def test_luhn():
    assert luhn("4111111111111111") and luhn("378282246310005") and luhn("6011111111111117")
    assert not luhn("4111111111111112") and not luhn("1234") and not luhn("41111111111111a1")


def test_pii_kinds_and_modes():
    prompts = ["write to ann@example.org", "card 4111-1111-1111-1111", "card 4111 1111 1111 1112 is not valid",
               "host 10.0.0.12, phone (415) 555-0199", "token ghp_" + "A" * 36, "what is 123456 * 789?"]
    table = make_table(prompts)
    flag = Pii("flag")(ConversationBatch(table))
    assert flag.columns["dpsel_pii"].to_pylist() == [["email"], ["card"], ["phone"], ["ip", "phone"], ["key"], []]
    assert (flag.reason == "").all()
    drop = Pii("drop")(ConversationBatch(table))
    assert drop.reason.tolist() == ["pii"] * 5 + [""]
    redacted = Pii("redact")(ConversationBatch(table)).columns["dpsel_messages"].to_pylist()
    assert [r[0]["content"] for r in redacted][:2] == ["write to [EMAIL]", "card [CARD]"]
    assert redacted[3][0]["content"] == "host [IP], phone [PHONE]"
    assert redacted[0][1] == {"role": "assistant", "content": "ok"}
    assert scan(pa.array(["nothing here"]))[0].to_pylist() == ["nothing here"]
    with pytest.raises(ValueError):
        Pii("mask")


PII_PIECES = ["ann@example.org", "4111-1111-1111-1111", "4111 1111 1111 1112", "10.0.0.12", "(415) 555-0199",
              "+44 20 7946 0958", "ghp_" + "A" * 36, "192.168.1.1:8080", "mail@10.0.0.1.io", "words", "12 34", "[EMAIL]"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PII_PIECES), max_size=5).map(" ".join) | st.none(), max_size=12))
def test_pii_flags_found_without_masking_every_row_equal_the_full_scan(values):
    """`find` scans only the values some pattern matches as given; its findings equal `scan`'s, which masks
    every value kind by kind (kinds overlap: an IP inside an address, a key's digits, a card next to a phone)."""
    text = pa.array(values, pa.string())
    expected, got = scan(text)[1], find(text)
    assert set(got) == set(expected) and all((got[kind] == expected[kind]).all() for kind in expected)


# ----------------------------------------------------------------------------- pipeline
def test_pipeline_order_reasons_and_accounting():
    texts, truth = planted(seed=2)
    texts = texts + [texts[5], "contact me at joe@example.com " + "please " * 3, "spam " * 80,
                     " ".join(f"e{i}" for i in range(35))]     # 0.82 of the eval text's 13-grams
    ids = [f"id{i:05d}" for i in range(len(texts))]
    ids[330] = "id00005"                                   # an exact copy has the same dpsel_id
    table = make_table(texts, ids=ids)
    evals = [" ".join(f"e{i}" for i in range(40))]
    blocks = build_blocks(StagesConfig(filters="default", pii="drop"), eval_texts=evals)
    assert [b.name for b in blocks] == ["exact", "near_dup", "decontaminate", "filters", "pii"]
    outcome = run_stages(table, blocks)
    assert outcome.counts == {"contaminated": 1, "duplicate": 1, "filtered:ngram_repetition": 1,
                              "near_duplicate": 30, "pii": 1}
    assert outcome.input_rows == outcome.kept + sum(outcome.counts.values()) == 334
    assert outcome.dup_of[330] == "id00005" and outcome.dup_of[300:330].tolist() == truth
    assert [s.rows_in for s in outcome.stats] == [334, 333, 303, 302, 301]
    assert sum(s.dropped for s in outcome.stats) == 334 - outcome.kept
    pii = outcome.columns["dpsel_pii"].to_pylist()
    assert pii[331] == ["email"] and pii[300] is None and pii[0] == []


def test_pipeline_exact_reader_verdicts_semantic_and_redact():
    table = make_table(["a b c", "a b c", "d e f", "mail x@y.io"], ids=["i0", "i0", "i2", "i3"])
    table = table.append_column("dpsel_reason", pa.array(["", "duplicate", "invalid", ""]))
    vectors = unit(np.random.default_rng(1).normal(size=(4, 8)))
    blocks = build_blocks(StagesConfig(near_dup=False, semantic_dup=0.99, pii="redact"))
    outcome = run_stages(table, blocks, embeddings=vectors)
    assert outcome.reason.tolist() == ["", "duplicate", "invalid", ""] and outcome.dup_of[1] == "i0"
    messages = outcome.columns["dpsel_messages"].to_pylist()
    assert messages[3][0]["content"] == "mail [EMAIL]" and messages[2][0]["content"] == "d e f"
    in_memory = Exact()(ConversationBatch(make_table(["x", "x", "y"], ids=["a", "a", "b"])))
    assert in_memory.reason.tolist() == ["", "duplicate", ""] and in_memory.dup_of[1] == "a"
    with pytest.raises(ValueError, match="order"):
        run_stages(table, list(reversed(blocks)))


def test_spilled_sketch_reads_back_the_rows_asked_for_across_chunks(tmp_path, monkeypatch):
    from dpsel.stages.near_dup import SpilledSketch
    monkeypatch.setattr(SpilledSketch, "READ_ROWS", 7)
    held = np.random.default_rng(0).integers(0, 256, (50, 16), dtype=np.uint8)
    spilled = SpilledSketch(tmp_path / "s.u8", 16)
    for start in range(0, 50, 12):
        spilled[start:start + 12] = held[start:start + 12]
    assert len(spilled) == 50 and spilled[:50] is spilled
    rows = np.array([0, 6, 7, 8, 20, 21, 49])
    np.testing.assert_array_equal(spilled.take(rows), held[rows])
    with pytest.raises(RuntimeError, match="row order"):
        spilled[10:12] = held[10:12]
    spilled.close()


def test_near_dup_verdicts_are_the_same_with_spilled_sketches(tmp_path):
    """The clustering reads the sketches of candidate pairs back from the spill: the same keepers as held."""
    from dpsel.stages.near_dup import SpilledSketch
    near = NearDup()
    held, empty = near.extended(ConversationBatch(make_table(planted()[0])))
    spilled = {name: SpilledSketch(tmp_path / f"{name}.u8", near.widths[name][0]) for name in ("sketch", "answer_sketch")}
    for name, sketch in spilled.items():
        sketch[0:len(held)] = getattr(held, name)
    again = dataclasses.replace(held, **spilled)
    keep_held = near.keepers(held, empty.copy(), 0)[0].keeper
    keep_spilled = near.keepers(again, empty.copy(), 0)[0].keeper
    np.testing.assert_array_equal(keep_held, keep_spilled)
    assert (keep_held != np.arange(len(keep_held))).any()      # the planted copies were found


def test_spilled_sketch_compacts_in_place_and_appends_after_the_kept_rows(tmp_path, monkeypatch):
    from dpsel.stages.near_dup import SpilledSketch
    monkeypatch.setattr(SpilledSketch, "READ_ROWS", 7)
    held = np.random.default_rng(1).integers(0, 256, (60, 8), dtype=np.uint8)
    spilled = SpilledSketch(tmp_path / "s.u8", 8)
    spilled[0:40] = held[:40]
    kept = np.array([0, 1, 5, 6, 7, 13, 14, 20, 33, 39])
    spilled.compact(kept)
    assert len(spilled) == len(kept) and (tmp_path / "s.u8").stat().st_size == len(kept) * 8
    spilled[len(kept):len(kept) + 20] = held[40:]
    np.testing.assert_array_equal(spilled.take(np.arange(len(kept) + 20)), np.concatenate([held[kept], held[40:]]))


def test_a_spilled_near_dup_index_gives_the_held_ones_verdicts_and_saved_file(tmp_path):
    """Curate spills the index's sketches while the stages run: batch after batch (compaction included), the same
    verdicts as with them held, the same saved index, and the temporary files go with the index."""
    texts, _ = planted(seed=2)
    held, spilled = NearDup(), NearDup()
    spilled.index = spilled.index.spilled()
    files = [spilled.index.sketch.path, spilled.index.answer_sketch.path]
    for part, ids in ((texts[:200], None), (texts[200:], [f"late-{i}" for i in range(len(texts) - 200)])):
        table = make_table(part, ids=ids)
        a, b = held(ConversationBatch(table)), spilled(ConversationBatch(table))
        assert a.reason.tolist() == b.reason.tolist() and a.dup_of.tolist() == b.dup_of.tolist()
    assert (a.reason != "").any() and len(held.index) == len(spilled.index) < len(texts)
    held.index.save(tmp_path / "held.npz")
    spilled.index.save(tmp_path / "spilled.npz")
    one, two = NearDupIndex.load(tmp_path / "held.npz"), NearDupIndex.load(tmp_path / "spilled.npz")
    for name in one.names:
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    del spilled, b
    import gc
    gc.collect()
    assert not any(Path(f).exists() for f in files)


def test_a_stage_detail_reaches_the_outcome_for_the_rows_it_dropped():
    class Says(Block):
        name = "filters"

        def decide(self, rows, **_):
            verdict = Verdict.keep_all(len(rows))
            verdict.reason[:2] = "quality"
            verdict.detail[:] = ["too short (3 words)", "too short (2 words)", "never shown: kept"]
            return verdict

    outcome = run_stages(make_table(["a b c", "a b", "a b c d e f"]), [Exact(), Says()])
    assert outcome.reason.tolist() == ["quality", "quality", ""]
    assert outcome.detail.tolist() == ["too short (3 words)", "too short (2 words)", None]


def test_star_pairs_are_every_bands_pairs_once():
    """Pairs merged band by band are the distinct (row, centre) codes of all bands: the same as one unique over
    every band's codes, with pairs that repeat across bands counted once."""
    from dpsel.stages.near_dup import _star_pairs
    rng = np.random.default_rng(0)
    rows, n, bands = np.sort(rng.choice(500, 300, replace=False)), 500, 6
    keys = rng.integers(0, 40, (bands, len(rows))).astype(np.uint32)
    keys[3] = keys[1]                                   # a band that repeats another's groups
    got = _star_pairs(lambda band: keys[band], bands, rows, n)
    expected = set()
    for band in range(bands):
        for key in np.unique(keys[band]):
            members = rows[keys[band] == key]
            expected |= {int(m) * n + int(members.min()) for m in members if m != members.min()}
    assert got.tolist() == sorted(expected)
    assert _star_pairs(lambda band: np.arange(len(rows), dtype=np.uint32), 2, rows, n).size == 0
