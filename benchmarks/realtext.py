"""A real-text dev set the team builds itself, from text that ships offline: question/answer pairs from the
docstrings of installed packages ("What does `numpy.linalg.norm` do?" → the docstring's first paragraph).

Rows carry a provenance tag (`source`: the module), no task column. A `noise` share of the training rows is
corrupted, in equal parts: `swapped` (the answer of a function from another package), `wrong` (the answer of a
neighbouring function in the same module: plausible, but about something else), `truncated` (the first few words),
`garbage` (the answer's words shuffled) and `refusal`. Meta and test rows are clean and drawn from functions the
training rows do not use. Deterministic by seed for a given set of installed package versions.

    python benchmarks/realtext.py --out DIR [--rows 1500] [--noise 0.3] [--meta-rows 150] [--seed 0]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import sys
import warnings
from pathlib import Path

MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial.polynomial",
           "pandas", "pandas.api.types", "torch", "torch.nn.functional", "torch.linalg", "torch.fft",
           "torch.special", "torch.distributions", "torch.optim.lr_scheduler", "torch.utils.data",
           "transformers.trainer_utils", "transformers.pipelines", "scipy.stats", "scipy.linalg", "scipy.signal",
           "scipy.optimize", "sklearn.metrics", "sklearn.preprocessing", "json", "os.path", "itertools",
           "collections", "functools", "shutil", "random", "statistics", "textwrap", "string", "re", "math")
MORE_MODULES = ("pyarrow.compute", "scipy.special", "scipy.sparse", "scipy.interpolate", "scipy.integrate",
                "scipy.ndimage", "scipy.spatial", "scipy.io", "sklearn.utils", "sklearn.linear_model", "sklearn.cluster",
                "sklearn.decomposition", "sklearn.model_selection", "torch.nn", "torch.nn.init", "numpy.char",
                "numpy.testing", "pandas.plotting", "transformers.generation")   # dedup_pools' larger set
CLASS_MEMBERS = ("pandas.DataFrame", "pandas.Series", "torch.Tensor", "str", "list", "dict")
STDLIB = frozenset(sys.stdlib_module_names) | {"builtins"}
SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
KINDS = ("swapped", "wrong", "truncated", "garbage", "refusal")
QUESTIONS = ("What does `{name}` do?", "Explain what `{name}` is for.", "What is the purpose of `{name}`?",
             "Describe `{name}` briefly.", "In one paragraph, what does `{name}` do?")
REFUSALS = ("I'm sorry, but I can't help with that request.", "As an AI language model, I cannot answer this.",
            "I am not able to provide information about that.", "Sorry, I don't know.",
            "I cannot assist with this question. Please consult the documentation.")


def first_paragraph(doc: str, limit: int = 420) -> str:
    """The docstring's summary: up to the first blank line after some text, one line, cut at a sentence end."""
    lines, paragraph = inspect.cleandoc(doc).splitlines(), []
    for line in lines:
        if not paragraph and SIGNATURE.match(line.strip()):  # torch/numpy ufunc style: "abs(input) -> Tensor"
            continue
        if not line.strip():
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    text = re.sub(r"\s+", " ", " ".join(paragraph)).strip()
    if len(text) > limit:
        cut = text[:limit].rfind(". ")
        text = text[:cut + 1] if cut > 60 else text[:limit].rsplit(" ", 1)[0] + "."
    return text


def _usable(text: str) -> bool:
    words = text.split()
    return (len(words) >= 6 and not text.lower().startswith(("alias", "see ", "deprecated", "this is an alias"))
            and "(" not in text[:2] and "->" not in text[:60] and not re.match(r"^\w+\(", text))


def _stdlib(module: str | None) -> bool:
    return not module or module.split(".")[0] in STDLIB


def harvest(stdlib: bool = True, modules: tuple[str, ...] = MODULES) -> list[dict]:
    """(name, module, answer) for every public documented callable of MODULES and CLASS_MEMBERS, sorted by name;
    one entry per distinct answer. `stdlib=False`: third-party text only (no standard-library module, no
    builtins' members, no callable a third-party module re-exports from the standard library)."""
    items, seen = {}, set()
    targets = [(m, None) for m in modules] + [(c.rsplit(".", 1)[0], c.rsplit(".", 1)[1]) if "." in c else
                                              ("builtins", c) for c in CLASS_MEMBERS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name, cls in targets:
            try:
                owner = importlib.import_module(module_name)
            except Exception:  # noqa: BLE001 - a package that is not installed just adds no rows
                continue
            source = module_name if cls is None else f"{module_name}.{cls}"
            if not stdlib and _stdlib(module_name):
                continue
            if cls is not None:
                owner = getattr(owner, cls)
            for attr in sorted(dir(owner)):
                if attr.startswith("_"):
                    continue
                try:
                    obj = getattr(owner, attr)
                except Exception:  # noqa: BLE001
                    continue
                if not callable(obj) or not isinstance(getattr(obj, "__doc__", None), str):
                    continue
                if not stdlib and _stdlib(getattr(obj, "__module__", None) if cls is None else module_name):
                    continue
                answer = first_paragraph(obj.__doc__)
                name = f"{source}.{attr}"
                if _usable(answer) and answer not in seen and name not in items:
                    seen.add(answer)
                    items[name] = {"name": name, "source": source, "package": source.split(".")[0],
                                   "answer": answer}
    return [items[k] for k in sorted(items)]


def _corrupt(kind: str, item: dict, items: list[dict], by_source: dict, rng: random.Random) -> str:
    if kind == "swapped":
        other = [i for i in items if i["package"] != item["package"]]
        return rng.choice(other)["answer"]
    if kind == "wrong":
        module = by_source[item["source"]]
        k = module.index(item)
        return module[k + 1 if k + 1 < len(module) else k - 1]["answer"]
    words = item["answer"].split()
    if kind == "truncated":
        return " ".join(words[:max(2, len(words) // 4)])
    if kind == "garbage":
        rng.shuffle(words)
        return " ".join(words)
    return rng.choice(REFUSALS)


def draw(items: list[dict], kinds_planted: tuple[str, ...], rows: int, noise: float, meta_rows: int, test_rows: int,
         seed: int, what: str):
    """(rng, by_source, items, train items, meta items, test items, kind per train row): items of sources with
    2+ entries (the neighbour kinds need one), drawn without overlap; a `noise` share of the training rows gets
    the kinds in equal parts. Shared with realtext_chat.py."""
    by_source: dict[str, list[dict]] = {}
    for item in items:
        by_source.setdefault(item["source"], []).append(item)
    items = [i for i in items if len(by_source[i["source"]]) >= 2]
    need = rows + meta_rows + test_rows
    if len(items) < need:
        raise ValueError(f"only {len(items)} {what} found, {need} needed")
    rng = random.Random(seed)
    chosen = rng.sample(items, need)
    n_bad = int(round(noise * rows))
    kinds = ["clean"] * (rows - n_bad) + [kinds_planted[k % len(kinds_planted)] for k in range(n_bad)]
    rng.shuffle(kinds)
    return rng, by_source, items, chosen[:rows], chosen[rows:rows + meta_rows], chosen[rows + meta_rows:], kinds


def build(rows: int = 1500, noise: float = 0.3, meta_rows: int = 150, test_rows: int = 200, seed: int = 0):
    """(train, meta, test, truth) as lists of dicts: instruction/input/output/source, truth: kind per train row."""
    rng, by_source, items, train_items, meta_items, test_items, kinds = draw(
        harvest(), KINDS, rows, noise, meta_rows, test_rows, seed, "documented functions")

    def row(item, answer):
        question = rng.choice(QUESTIONS).format(name=item["name"])
        return {"instruction": question, "input": "", "output": answer, "source": item["source"]}

    train = [row(i, i["answer"] if k == "clean" else _corrupt(k, i, items, by_source, rng))
             for i, k in zip(train_items, kinds)]
    meta = [row(i, i["answer"]) for i in meta_items]
    test = [row(i, i["answer"]) for i in test_items]
    return train, meta, test, [{"row": n, "kind": k} for n, k in enumerate(kinds)]


def write(out: Path, builder=None, **options) -> dict[str, Path]:
    """train/meta/test/truth parquet files under `out` from `builder` (default: this set's `build`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out.mkdir(parents=True, exist_ok=True)
    tables = dict(zip(("train", "meta", "test", "truth"), (builder or build)(**options)))
    paths = {name: out / f"{name}.parquet" for name in tables}
    for name, rows in tables.items():
        pq.write_table(pa.Table.from_pylist(rows), paths[name])
    return paths


def main(doc: str, builder=None) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--meta-rows", type=int, default=150)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(write(a.out, builder, rows=a.rows, noise=a.noise, meta_rows=a.meta_rows, test_rows=a.test_rows,
                seed=a.seed))


if __name__ == "__main__":
    main(__doc__)
