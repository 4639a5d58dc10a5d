"""dpsel.synth: a deterministic noisy instruction set whose truth the selection methods are scored against."""
from __future__ import annotations

import random
import re

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from dpsel.data import alpaca_to_messages, row_id
from dpsel.errors import DpselInputError
from dpsel.synth import CORRUPTION_KINDS, REFUSAL, TASK_FAMILIES, generate, make_rows


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The default-size set (3000 rows, 30% noise), read back as DataFrames."""
    paths = generate(tmp_path_factory.mktemp("synth"), rows=3000, noise=0.3, seed=0)
    return {name: pd.read_parquet(path) for name, path in paths.items()}


def _prompt(df: pd.DataFrame) -> pd.Series:
    return df["instruction"] + "\x00" + df["input"]


def test_same_arguments_give_byte_identical_files(tmp_path):
    first = generate(tmp_path / "a", rows=300, noise=0.3, seed=7)
    second = generate(tmp_path / "b", rows=300, noise=0.3, seed=7)
    assert set(first) == {"train", "meta", "test", "truth"}
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    other_seed = generate(tmp_path / "c", rows=300, noise=0.3, seed=8)
    assert other_seed["train"].read_bytes() != first["train"].read_bytes()


def test_no_temp_files_left_behind(tmp_path):
    generate(tmp_path, rows=50, meta_rows=10, test_rows=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.parquet", "test.parquet", "train.parquet", "truth.parquet"]


def test_row_counts_and_columns(full):
    assert len(full["train"]) == 3000 and len(full["truth"]) == 3000
    assert len(full["meta"]) == 200 and len(full["test"]) == 300
    for name in ("train", "meta", "test"):
        assert list(full[name].columns) == ["instruction", "input", "output", "task", "source"]
    assert list(full["truth"].columns) == ["row", "dpsel_id", "kind", "task"]


def test_truth_aligns_with_train_rows_and_ids(full):
    train, truth = full["train"], full["truth"]
    assert truth["row"].tolist() == list(range(len(train)))
    assert truth["task"].tolist() == train["task"].tolist()
    ids = [row_id(alpaca_to_messages(r.instruction, r.output, r.input)) for r in train.itertuples()]
    assert truth["dpsel_id"].tolist() == ids


def test_noise_fraction_and_every_kind_present(full):
    kinds = full["truth"]["kind"]
    assert (kinds != "clean").sum() == 900
    counts = kinds.value_counts()
    for kind in CORRUPTION_KINDS:
        assert counts.get(kind, 0) > 0, kind
    assert counts["duplicate"] < counts["wrong"]
    assert set(kinds) == {"clean", *CORRUPTION_KINDS}


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.5, 0.95])
def test_noise_fraction_other_levels(tmp_path, noise):
    truth = pd.read_parquet(generate(tmp_path, rows=101, noise=noise, meta_rows=5, test_rows=5)["truth"])
    assert (truth["kind"] != "clean").sum() == round(noise * 101)


def test_corrupted_rows_differ_from_the_truth(full):
    train, kinds = full["train"], full["truth"]["kind"]
    refusals = train["output"][kinds == "refusal"]
    assert (refusals == REFUSAL).all()
    others = ~kinds.isin(["refusal", "duplicate"])  # a duplicate may copy a refusal row
    assert (train["output"][others] != REFUSAL).all()
    # Every non-duplicate row has its own prompt; a duplicate repeats an earlier row exactly.
    not_dup = train[kinds != "duplicate"]
    assert not _prompt(not_dup).duplicated().any()
    whole_rows = train.apply(tuple, axis=1)
    first_seen = ~whole_rows.duplicated(keep="first")
    assert ((kinds == "duplicate") == ~first_seen).all()
    # Damaged answers are not the computed answer: checked where an independent solver is easy.
    for row, kind in zip(train.itertuples(), kinds):
        if row.task in INDEPENDENT_SOLVERS and kind not in ("clean", "duplicate"):
            assert row.output != INDEPENDENT_SOLVERS[row.task](row.instruction, row.input), (row, kind)


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def _solve_add(instruction, inp):
    return str(sum(_numbers(instruction + " " + inp)))


def _solve_sort(instruction, inp):
    return ", ".join(map(str, sorted(_numbers(inp or instruction))))


def _solve_compare(instruction, inp):
    a, b = _numbers(instruction + " " + inp)
    big, small = max(a, b), min(a, b)
    if re.search(r"smaller|less", instruction):
        return f"{small} is smaller than {big}."
    return f"{big} is larger than {small}."


def _solve_upper(instruction, inp):
    quoted = re.search(r"'(.*)'", instruction)
    text = inp or (quoted.group(1) if quoted else instruction.split(": ", 1)[1])
    return text.upper()


def _solve_next(instruction, inp):
    terms = _numbers(inp or instruction)
    return str(terms[-1] + terms[-1] - terms[-2])


def _solve_reverse(instruction, inp):
    word = inp or re.search(r"'(\w+)'|Spell (\w+) ", instruction).group(1, 2)
    return (word if isinstance(word, str) else next(w for w in word if w))[::-1]


INDEPENDENT_SOLVERS = {"add": _solve_add, "reverse": _solve_reverse, "sort": _solve_sort, "compare": _solve_compare,
                       "upper": _solve_upper, "next": _solve_next}


def test_clean_answers_are_correct(full):
    clean = pd.concat([full["train"][full["truth"]["kind"] == "clean"], full["meta"], full["test"]])
    checked = 0
    for row in clean.itertuples():
        if row.task in INDEPENDENT_SOLVERS:
            assert row.output == INDEPENDENT_SOLVERS[row.task](row.instruction, row.input), row
            checked += 1
    assert checked > 500


def test_meta_and_test_are_clean_and_disjoint_from_train(full):
    train_prompts = set(_prompt(full["train"]))
    meta_prompts, test_prompts = set(_prompt(full["meta"])), set(_prompt(full["test"]))
    assert not train_prompts & meta_prompts
    assert not train_prompts & test_prompts
    assert not meta_prompts & test_prompts
    assert (full["meta"]["source"] == "trusted").all() and (full["test"]["source"] == "heldout").all()
    assert not (full["meta"]["output"] == REFUSAL).any()


def test_sizes_fit_a_tiny_model(full):
    for name in ("train", "meta", "test"):
        df = full[name]
        assert (df["instruction"].str.len() + df["input"].str.len()).max() < 120
        assert df["output"].str.len().max() < 60
        assert (df["output"].str.len() > 0).all()


def test_every_family_appears_with_varied_phrasing(full):
    train = full["train"]
    assert set(train["task"]) == set(TASK_FAMILIES)
    for task, group in train.groupby("task"):
        templates = group["instruction"].str.replace(r"\d+|'[^']*'", "#", regex=True)
        assert templates.nunique() >= 3, task


def test_sources_have_different_corruption_rates(full):
    corrupted = full["truth"]["kind"] != "clean"
    rates = corrupted.groupby(full["train"]["source"]).mean()
    assert rates["forum"] > rates["scrape"] > rates["vendor"]


def test_no_single_surface_feature_separates_clean_from_corrupted(full):
    outputs, corrupted = full["train"]["output"], full["truth"]["kind"] != "clean"
    length = outputs.str.len()
    non_alnum = outputs.map(lambda s: sum(not c.isalnum() for c in s) / len(s))
    for feature in (length, non_alnum):
        assert 0.3 <= roc_auc_score(corrupted, feature) <= 0.7
    # Kind by kind too (a refusal is one fixed sentence, so any feature of it is constant: skipped).
    kinds = full["truth"]["kind"]
    for kind in set(CORRUPTION_KINDS) - {"refusal"}:
        pair = kinds.isin(["clean", kind])
        for feature in (length, non_alnum):
            assert 0.3 <= roc_auc_score(kinds[pair] == kind, feature[pair]) <= 0.7, kind


def test_tasks_restricts_families(tmp_path):
    paths = generate(tmp_path, rows=200, tasks="add,reverse", meta_rows=20, test_rows=20)
    for name in ("train", "meta", "test", "truth"):
        assert set(pd.read_parquet(paths[name])["task"]) == {"add", "reverse"}
    single = generate(tmp_path / "one", rows=50, tasks=["sort"], meta_rows=5, test_rows=5)
    assert set(pd.read_parquet(single["train"])["task"]) == {"sort"}


@pytest.mark.parametrize("kwargs, needle", [
    ({"noise": 1.0}, "[0, 1)"), ({"noise": -0.1}, "[0, 1)"), ({"rows": 9}, ">= 10"),
    ({"tasks": "add,nope"}, "valid choices: add, mul"), ({"tasks": []}, "valid choices"),
])
def test_bad_arguments_raise_input_error(tmp_path, kwargs, needle):
    with pytest.raises(DpselInputError, match=re.escape(needle)):
        generate(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def test_make_rows_gives_clean_distinct_rows():
    rows = make_rows(400, ["add", "compare"], random.Random(3))
    assert len(rows) == 400
    assert {r["task"] for r in rows} == {"add", "compare"}
    assert len({(r["instruction"], r["input"]) for r in rows}) == 400
    for r in rows:
        assert r["output"] == INDEPENDENT_SOLVERS[r["task"]](r["instruction"], r["input"])
    assert make_rows(50, None, 11) == make_rows(50, None, random.Random(11))
