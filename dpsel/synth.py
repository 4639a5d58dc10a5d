"""A deterministic noisy instruction set with known truth: the yardstick for selection quality.

Every clean answer is computed, so correctness is exact. A fraction `noise` of the train rows is corrupted
with the kinds of damage scraped data has. The mix of corrupted rows (largest-remainder rounding):

    wrong 25%  swapped 20%  garbage 15%  truncated 15%  refusal 15%  duplicate 10%

Corruptions are built to look like answers (same character pool, similar lengths), so that no single surface
feature separates clean from corrupted rows; tests check this with the AUROC of length and of punctuation.

Rows come from three sources with different corruption rates (`forum` worst, `vendor` best), so that
per-source mean weights mean something. meta (source `trusted`) and test (source `heldout`) are clean and
share no prompt with train.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, NamedTuple

import pyarrow as pa

from dpsel.data import alpaca_to_messages, row_id
from dpsel.errors import DpselInputError
from dpsel.io import write_parquet_atomic


class Problem(NamedTuple):
    """One generated task instance: the prompt, its exact answer and a plausible wrong answer."""
    instruction: str
    input: str
    output: str
    wrong: str


Generator = Callable[[random.Random], Problem]

# ---------------------------------------------------------------- vocabularies

WORDS = """apple river stone cloud green quiet table window garden yellow bright summer winter forest
candle mirror silver orange planet rocket bottle pencil basket violin marble shadow castle dragon
island jungle ladder meadow needle ocean parrot rabbit saddle tunnel velvet wagon zebra anchor
blanket copper desert engine feather ginger harbor insect jacket kettle lemon magnet napkin oyster
pepper quartz ribbon spider tomato umbrella valley walnut yogurt bridge cactus dolphin falcon glacier
hammer iron kitten lantern mango nickel olive pillow puzzle rain salt tiger tulip vessel whale
wizard cotton circle morning evening little happy gentle sunny frozen golden hidden simple rapid
""".split()
SYLLABLES = "ka lo mi ne ru sa ti vo ze ba do fe gu hi ja ko lu ma no pe ri so tu wa yo".split()
VOWELS = set("aeiou")

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
       "sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

REFUSAL = "Sorry, I can't help with that."

# ---------------------------------------------------------------- helpers


def _pick(rng: random.Random, options):
    return options[rng.randrange(len(options))]


def _nudge_number(rng: random.Random, value: int) -> int:
    """A plausible arithmetic slip: off by one, off by ten, or one digit changed."""
    slip = rng.randrange(3)
    if slip == 0:
        wrong = value + _pick(rng, (-1, 1))
    elif slip == 1:
        wrong = value + _pick(rng, (-10, 10))
    else:
        digits = list(str(value))
        i = rng.randrange(len(digits))
        digits[i] = str((int(digits[i]) + rng.randrange(1, 10)) % 10)
        wrong = int("".join(digits))
    wrong = abs(wrong)
    return wrong if wrong != value else value + 1


def _made_up_word(rng: random.Random) -> str:
    return "".join(_pick(rng, SYLLABLES) for _ in range(rng.randint(2, 4)))


def _word(rng: random.Random) -> str:
    """Half real words, half pronounceable made-up ones: keeps prompt spaces large."""
    return _pick(rng, WORDS) if rng.random() < 0.5 else _made_up_word(rng)


def number_to_words(n: int) -> str:
    """English words for 0..9999 (hand-written: tiny, and no dependency needed)."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    rest = n % 1000
    return ONES[n // 1000] + " thousand" + ("" if rest == 0 else " " + number_to_words(rest))


def _swap_adjacent(rng: random.Random, items: list) -> list:
    items = list(items)
    i = rng.randrange(len(items) - 1)
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


# ---------------------------------------------------------------- task families


def gen_add(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 10 ** rng.randint(1, 3)), rng.randint(0, 10 ** rng.randint(1, 3))
    instruction, inp = _pick(rng, (
        (f"What is {a} + {b}?", ""),
        ("Add the two numbers.", f"{a} and {b}"),
        (f"Compute the sum of {a} and {b}.", ""),
        (f"Calculate {a} plus {b}.", ""),
    ))
    total = a + b
    wrong = abs(a - b) if rng.random() < 0.2 and abs(a - b) != total else _nudge_number(rng, total)
    return Problem(instruction, inp, str(total), str(wrong))


def gen_mul(rng: random.Random) -> Problem:
    a, k = rng.randint(2, 999), rng.randint(2, 9)
    instruction, inp = _pick(rng, (
        (f"What is {a} times {k}?", ""),
        (f"Multiply {a} by {k}.", ""),
        ("Give the product of these numbers.", f"{a} x {k}"),
        (f"Compute {a} * {k}.", ""),
    ))
    wrong = a * (k + _pick(rng, (-1, 1))) if rng.random() < 0.4 else _nudge_number(rng, a * k)
    return Problem(instruction, inp, str(a * k), str(wrong))


def gen_reverse(rng: random.Random) -> Problem:
    word = _word(rng)
    instruction, inp = _pick(rng, (
        (f"Reverse the word '{word}'.", ""),
        ("Write this word backwards.", word),
        (f"Spell {word} in reverse order.", ""),
        ("Reverse the letters of the following word.", word),
    ))
    answer = word[::-1]
    wrong = "".join(_swap_adjacent(rng, list(answer)))
    if wrong == answer:
        wrong = word if word != answer else answer[1:] + answer[0]
    return Problem(instruction, inp, answer, wrong)


def gen_sort(rng: random.Random) -> Problem:
    numbers = rng.sample(range(100), rng.randint(3, 6))
    shown = ", ".join(map(str, numbers))
    instruction, inp = _pick(rng, (
        ("Sort these numbers in ascending order.", shown),
        ("Arrange from smallest to largest.", shown),
        (f"Put {shown} in increasing order.", ""),
        ("Order the following list from low to high.", shown),
    ))
    ordered = sorted(numbers)
    wrong = ordered[::-1] if rng.random() < 0.3 else _swap_adjacent(rng, ordered)
    return Problem(instruction, inp, ", ".join(map(str, ordered)), ", ".join(map(str, wrong)))


def gen_upper(rng: random.Random) -> Problem:
    phrase = " ".join(_word(rng) for _ in range(rng.randint(2, 4)))
    instruction, inp = _pick(rng, (
        ("Convert this phrase to uppercase.", phrase),
        (f"Write '{phrase}' in capital letters.", ""),
        ("Uppercase the following text.", phrase),
        (f"Shout this: {phrase}", ""),
    ))
    answer = phrase.upper()
    words = answer.split()
    i = rng.randrange(len(words))
    wrong = phrase.title() if rng.random() < 0.3 else " ".join(
        w.lower() if j == i else w for j, w in enumerate(words))
    return Problem(instruction, inp, answer, wrong)


def gen_count(rng: random.Random) -> Problem:
    text = _word(rng) if rng.random() < 0.6 else f"{_word(rng)} {_word(rng)}"
    if rng.random() < 0.5:
        count = sum(c in VOWELS for c in text)
        instruction, inp = _pick(rng, (
            (f"How many vowels are in '{text}'?", ""),
            ("Count the vowels in this text.", text),
            (f"Count the vowels (a, e, i, o, u) in {text}.", ""),
        ))
    else:
        letter = _pick(rng, sorted(set(text.replace(" ", ""))))
        count = text.count(letter)
        instruction, inp = _pick(rng, (
            (f"How many times does the letter '{letter}' appear in '{text}'?", ""),
            (f"Count the letter {letter} in the text below.", text),
        ))
    wrong = count + 1 if count == 0 or rng.random() < 0.5 else count - 1
    return Problem(instruction, inp, str(count), str(wrong))


def gen_compare(rng: random.Random) -> Problem:
    a, b = rng.sample(range(10 ** rng.randint(2, 4)), 2)
    big, small = max(a, b), min(a, b)
    if rng.random() < 0.5:
        instruction, inp = _pick(rng, (
            (f"Which is larger, {a} or {b}?", ""),
            ("Which of these two numbers is bigger?", f"{a}, {b}"),
            (f"Compare {a} and {b}: which is greater?", ""),
        ))
        answer, wrong = f"{big} is larger than {small}.", f"{small} is larger than {big}."
    else:
        instruction, inp = _pick(rng, (
            (f"Which is smaller, {a} or {b}?", ""),
            ("Which of these two numbers is less?", f"{a}, {b}"),
        ))
        answer, wrong = f"{small} is smaller than {big}.", f"{big} is smaller than {small}."
    return Problem(instruction, inp, answer, wrong)


def gen_next(rng: random.Random) -> Problem:
    start, step, shown = rng.randint(0, 99), rng.randint(1, 12), rng.randint(3, 5)
    terms = [start + step * i for i in range(shown)]
    listed = ", ".join(map(str, terms))
    instruction, inp = _pick(rng, (
        ("What comes next in the sequence?", listed),
        (f"Continue the pattern: {listed}, ...", ""),
        (f"Give the next number after {listed}.", ""),
    ))
    answer = terms[-1] + step
    wrong = terms[-1] + step + _pick(rng, (-1, 1)) if rng.random() < 0.5 else terms[-1] + step * 2
    return Problem(instruction, inp, str(answer), str(wrong))


# (from, to, factor, plausible wrong factors)
UNITS = (("kilometres", "metres", 1000, (100, 10)), ("metres", "centimetres", 100, (1000, 10)),
         ("kilograms", "grams", 1000, (100,)), ("hours", "minutes", 60, (100, 24)),
         ("minutes", "seconds", 60, (100,)), ("feet", "inches", 12, (10, 3)),
         ("days", "hours", 24, (12, 60)), ("weeks", "days", 7, (5, 30)))


def gen_convert(rng: random.Random) -> Problem:
    src, dst, factor, wrong_factors = _pick(rng, UNITS)
    value = rng.randint(1, 499)
    instruction, inp = _pick(rng, (
        (f"Convert {value} {src} to {dst}.", ""),
        (f"How many {dst} are in {value} {src}?", ""),
        (f"Express {value} {src} in {dst}.", ""),
        (f"Convert to {dst}.", f"{value} {src}"),
    ))
    return Problem(instruction, inp, f"{value * factor} {dst}", f"{value * _pick(rng, wrong_factors)} {dst}")


def gen_digits(rng: random.Random) -> Problem:
    n = rng.randint(0, 10 ** rng.randint(2, 4) - 1)
    words = number_to_words(n)
    instruction, inp = _pick(rng, (
        (f"Write '{words}' as digits.", ""),
        ("Convert the number words to digits.", words),
        (f"What number is {words}?", ""),
    ))
    return Problem(instruction, inp, str(n), str(_nudge_number(rng, n)))


TASK_FAMILIES: dict[str, Generator] = {
    "add": gen_add, "mul": gen_mul, "reverse": gen_reverse, "sort": gen_sort, "upper": gen_upper,
    "count": gen_count, "compare": gen_compare, "next": gen_next, "convert": gen_convert,
    "digits": gen_digits,
}

# Share of the corrupted rows per kind (sums to 1); duplicates a smaller share.
CORRUPTION_MIX: dict[str, float] = {"wrong": 0.25, "swapped": 0.20, "garbage": 0.15, "truncated": 0.15,
                                    "refusal": 0.15, "duplicate": 0.10}
CORRUPTION_KINDS: tuple[str, ...] = tuple(CORRUPTION_MIX)

# (name, share of clean rows, share of corrupted rows): forum is the noisiest source.
SOURCES = (("forum", 0.25, 0.60), ("scrape", 0.35, 0.30), ("vendor", 0.40, 0.10))

COLUMNS = ("instruction", "input", "output", "task", "source")
_MAX_TRIES_PER_ROW = 200


# ---------------------------------------------------------------- argument checks


def _check_tasks(tasks) -> list[str]:
    if tasks is None:
        return list(TASK_FAMILIES)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    chosen = [t.strip() for t in tasks]
    unknown = [t for t in chosen if t not in TASK_FAMILIES]
    if unknown or not chosen:
        raise DpselInputError(f"unknown task families {unknown or '(none given)'}; "
                              f"valid choices: {', '.join(TASK_FAMILIES)}")
    return list(dict.fromkeys(chosen))


def _check_args(rows: int, noise: float, meta_rows: int, test_rows: int) -> None:
    if not isinstance(rows, int) or rows < 10:
        raise DpselInputError(f"--rows must be an integer >= 10, got {rows!r}")
    if not isinstance(noise, (int, float)) or not 0.0 <= noise < 1.0:
        raise DpselInputError(f"--noise must be in [0, 1), got {noise!r}")
    if meta_rows < 1 or test_rows < 1:
        raise DpselInputError(f"meta_rows and test_rows must be >= 1, got {meta_rows}, {test_rows}")


# ---------------------------------------------------------------- clean rows


def _as_rng(rng) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _make_problems(n: int, tasks: list[str], rng: random.Random, seen_prompts: set) -> list[tuple[str, Problem]]:
    """n (task, Problem) with prompts unique across `seen_prompts` (updated); tasks balanced, order shuffled."""
    order = [tasks[i % len(tasks)] for i in range(n)]
    rng.shuffle(order)
    problems = []
    for i, task in enumerate(order):
        for _ in range(_MAX_TRIES_PER_ROW):
            problem = TASK_FAMILIES[task](rng)
            prompt = (problem.instruction, problem.input)
            if prompt not in seen_prompts and problem.wrong != problem.output:
                seen_prompts.add(prompt)
                problems.append((task, problem))
                break
        else:
            raise DpselInputError(f"task family '{task}' ran out of distinct prompts at row {i}; "
                                  f"ask for fewer rows or more task families ({', '.join(TASK_FAMILIES)})")
    return problems


def make_rows(n: int, tasks=None, rng: random.Random | int = 0) -> list[dict]:
    """n clean Alpaca rows (instruction, input, output, task) with distinct prompts; rng: Random or seed."""
    chosen = _check_tasks(tasks)
    problems = _make_problems(n, chosen, _as_rng(rng), set())
    return [{"instruction": p.instruction, "input": p.input, "output": p.output, "task": t} for t, p in problems]


# ---------------------------------------------------------------- corruptions


def _kind_counts(n_corrupt: int) -> dict[str, int]:
    """Split n_corrupt across kinds by CORRUPTION_MIX, rounding by largest remainder (sums exactly)."""
    exact = {k: share * n_corrupt for k, share in CORRUPTION_MIX.items()}
    counts = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), CORRUPTION_KINDS.index(k)))
    for k in by_remainder[: n_corrupt - sum(counts.values())]:
        counts[k] += 1
    return counts


def _assign_kinds(outputs: list[str], counts: dict[str, int], rng: random.Random) -> list[str]:
    """Kind per base row. Corrupted rows are drawn uniformly (so every task and answer length is hit
    alike); within them truncation needs an answer of 2+ characters, any shortfall becomes `wrong`."""
    n_damaged = sum(c for k, c in counts.items() if k != "duplicate")
    damaged = rng.sample(range(len(outputs)), n_damaged)
    kinds = ["clean"] * len(outputs)
    cuttable = [i for i in damaged if len(outputs[i]) >= 2][: counts["truncated"]]
    for i in cuttable:
        kinds[i] = "truncated"
    rest = iter(i for i in damaged if kinds[i] == "clean")
    shortfall = counts["truncated"] - len(cuttable)
    for kind in ("wrong", "swapped", "garbage", "refusal"):
        for _ in range(counts[kind] + (shortfall if kind == "wrong" else 0)):
            kinds[next(rest)] = kind
    return kinds


def _truncate(rng: random.Random, answer: str) -> str:
    """Cut mid-answer at 30-80% of its length (trailing space stripped: no free tell)."""
    cut = max(1, min(len(answer) - 1, round(len(answer) * rng.uniform(0.3, 0.8))))
    return answer[:cut].rstrip() or answer[0]


def _garbage(rng: random.Random, donor: str) -> str:
    """Gibberish shaped like an answer: a donor answer's characters shuffled, or random words of its length."""
    if rng.random() < 0.5 and len(set(donor)) > 1:
        chars = list(donor)
        while "".join(chars) == donor:
            rng.shuffle(chars)
        return "".join(chars).strip() or donor[::-1]
    target, words = max(1, len(donor)), []
    while len(" ".join(words)) < target:
        words.append(_pick(rng, WORDS) if rng.random() < 0.7 else str(rng.randint(0, 999)))
    return " ".join(words)[:target].rstrip()


def _corrupt(kind: str, problem: Problem, outputs: list[str], rng: random.Random) -> str:
    if kind == "clean":
        return problem.output
    if kind == "wrong":
        return problem.wrong
    if kind == "truncated":
        return _truncate(rng, problem.output)
    if kind == "refusal":
        return REFUSAL
    for _ in range(_MAX_TRIES_PER_ROW):  # a swap or gibberish that happens to be right is not damage
        donor = _pick(rng, outputs)
        damaged = donor if kind == "swapped" else _garbage(rng, donor)
        if damaged != problem.output:
            return damaged
    return problem.wrong  # every other answer equals this one: only a wrong answer can differ


def _draw_source(rng: random.Random, corrupted: bool) -> str:
    weights = [corrupt_share if corrupted else clean_share for _, clean_share, corrupt_share in SOURCES]
    return rng.choices([name for name, _, _ in SOURCES], weights=weights)[0]


def _insert_duplicates(base: list[dict], n_dup: int, rng: random.Random) -> list[dict]:
    """Add n_dup exact copies of base rows, each placed after its original (dedup keeps the first)."""
    keyed = [(float(i), 0, row) for i, row in enumerate(base)]
    for j in range(n_dup):
        src = rng.randrange(len(base))
        copy = dict(base[src], kind="duplicate")
        keyed.append((rng.uniform(src + 0.01, len(base)), j + 1, copy))
    keyed.sort(key=lambda entry: (entry[0], entry[1]))
    return [row for _, _, row in keyed]


def _build_train(problems: list[tuple[str, Problem]], n_rows: int, noise: float,
                 rng: random.Random) -> list[dict]:
    counts = _kind_counts(round(noise * n_rows))
    base_problems = problems[: n_rows - counts["duplicate"]]
    outputs = [p.output for _, p in base_problems]
    kinds = _assign_kinds(outputs, counts, rng)
    base = []
    for (task, problem), kind in zip(base_problems, kinds):
        base.append({"instruction": problem.instruction, "input": problem.input,
                     "output": _corrupt(kind, problem, outputs, rng), "task": task,
                     "source": _draw_source(rng, kind != "clean"), "kind": kind})
    return _insert_duplicates(base, counts["duplicate"], rng)


# ---------------------------------------------------------------- writing


def _table(rows: list[dict], columns) -> pa.Table:
    return pa.table({c: pa.array([r[c] for r in rows], type=pa.string()) for c in columns})


def _truth_table(train: list[dict]) -> pa.Table:
    ids = [row_id(alpaca_to_messages(r["instruction"], r["output"], r["input"])) for r in train]
    return pa.table({"row": pa.array(range(len(train)), type=pa.int64()),
                     "dpsel_id": pa.array(ids, type=pa.string()),
                     "kind": pa.array([r["kind"] for r in train], type=pa.string()),
                     "task": pa.array([r["task"] for r in train], type=pa.string())})


def _clean_split(problems, source: str) -> list[dict]:
    return [{"instruction": p.instruction, "input": p.input, "output": p.output, "task": t, "source": source}
            for t, p in problems]


def generate(out_dir, rows: int = 3000, noise: float = 0.3, seed: int = 0, tasks=None,
             meta_rows: int = 200, test_rows: int = 300) -> dict[str, Path]:
    """Write train/meta/test/truth Parquet files under out_dir; same arguments give byte-identical files."""
    _check_args(rows, noise, meta_rows, test_rows)
    chosen = _check_tasks(tasks)
    rng = random.Random(f"dpsel-synth-{seed}")
    # One pass with one set of seen prompts keeps train, meta and test prompt-disjoint.
    problems = _make_problems(rows + meta_rows + test_rows, chosen, rng, set())
    train = _build_train(problems[:rows], rows, noise, rng)
    meta = _clean_split(problems[rows: rows + meta_rows], "trusted")
    test = _clean_split(problems[rows + meta_rows:], "heldout")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.parquet" for name in ("train", "meta", "test", "truth")}
    write_parquet_atomic(_table(train, COLUMNS), paths["train"])
    write_parquet_atomic(_table(meta, COLUMNS), paths["meta"])
    write_parquet_atomic(_table(test, COLUMNS), paths["test"])
    write_parquet_atomic(_truth_table(train), paths["truth"])
    return paths

