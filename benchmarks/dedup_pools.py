"""Chat-shaped dev sets for benchmarks/dedup.py (`--shape chat`, `--shape realtext`): pools and eval sets that
look like real instruction pools, with planted truth for near-duplicates and contamination.

Every row is a conversation: an optional system turn drawn from a few shared SYSTEMS (none for 30% of rows), a
user turn built from one of the shared QUESTION templates around a subject (a named key such as a backticked
identifier, a capitalised name or a number, plus a few context words), and an assistant answer. 10% of the answers
(pool and eval alike) end with one of a few BOILERPLATE paragraphs (policy links, disclaimers) shared by many
unrelated rows. The eval set is built the same way (same system prompts, same templates, same boilerplate),
from its own subjects.

Planted near-duplicates (`dup_frac` of the pool, all template-differing): an original's subject asked in another
question template (`retemplate`), half of them also under another system prompt (`retemplate+system`), with
the answer lightly edited (1-2 words substituted). Hard negatives for precision: `sibling` rows ask about an
existing subject in another template with an independent answer; number keys collide by chance.

Planted contamination (`contam_frac` of the pool, each a distinct eval row): the eval row's question and answer
copied `exact`, under another system prompt (`system`), in another question template (`template`) or with a
boilerplate paragraph added to the answer (`boilerplate`). Clean hard negatives (`neighbour`): pool rows about
an eval row's subject in another template with an independent answer.

Synthetic text (`chat`): Zipf words (the vocabulary of benchmarks/dedup.py), answers of lognormal length (median
40 words, 2% under 8). Real text (`realtext`): subjects are the documented functions of third-party packages
(`realtext.harvest(stdlib=False)` over MODULES + MORE_MODULES: no standard-library module, no builtins, no manual pages), the answer is the
docstring's first paragraph; the pool's size is set by how many functions are installed. Second real source
(`infotext`): sections of installed packages' METADATA descriptions and of the GNU info manuals under
/usr/share/info (`infotext_subjects`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

SYSTEMS = (
    "You are a helpful assistant. Answer the user's question accurately and concisely, and say so when you are "
    "not sure about something.",
    "You are an expert software engineer. Give clear explanations with correct terminology and avoid "
    "speculation about behaviour you have not verified.",
    "You are a friendly tutor who explains things step by step so that a beginner can follow along without "
    "prior knowledge of the subject.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request "
    "and follows the style guide of the organisation.",
)
NO_SYSTEM_SHARE = 0.3
QUESTIONS = (
    "What does {k} do when {c}?",
    "Explain {k} in the context of {c}.",
    "I am working on {c} and I keep running into {k}. Can you tell me what it does and how I should use it?",
    "How is {k} used for {c}?",
    "Describe {k} briefly ({c}).",
    "Question: {c}. What is the role of {k} here?",
    "Could you help me understand {k}? My use case is {c}.",
    "Regarding {c}: what does {k} mean?",
)
BOILERPLATE = (
    "See https://example.org/policy for details of the policy that applies to this answer, including the terms of "
    "use and the list of exceptions that may apply in your region.",
    "Note: this information is provided for educational purposes only and may not reflect the latest version of "
    "the documentation. Always check the official reference before relying on it in production.",
    "If you have further questions, feel free to ask. You can also visit https://example.org/help for more "
    "tutorials, frequently asked questions and community forums where other users share their experience.",
)
BOILERPLATE_SHARE = 0.1
CONTEXTS = ("a data pipeline", "unit tests for a small library", "a web service", "a notebook for a class",
            "a batch job that runs every night", "code review at work", "a machine learning experiment",
            "porting old code to a new version", "a command line tool", "a plotting script",
            "a numerical simulation", "a report generator")
DUP_KINDS = ("retemplate", "retemplate+system")
CONTAM_KINDS = ("exact", "system", "template", "boilerplate")


@dataclass
class Subject:
    key: str            # as it appears in the question (`a.b`, Albert Einstein, 1984)
    context: str
    answer: str


@dataclass
class Row:
    system: int         # index into SYSTEMS, -1 for none
    template: int
    subject: Subject
    answer: str

    def messages(self) -> list[dict]:
        question = QUESTIONS[self.template].format(k=self.subject.key, c=self.subject.context)
        head = [] if self.system < 0 else [{"role": "system", "content": SYSTEMS[self.system]}]
        return head + [{"role": "user", "content": question}, {"role": "assistant", "content": self.answer}]


@dataclass
class ChatSet:
    pool: list[Row]
    evals: list[Row]
    copy_of: list[int]                 # pool row -> its planted original (-1: none)
    kind: list[str]                    # pool row: original / sibling / retemplate... / contam kinds / neighbour
    eval_of: list[int] = field(default_factory=list)   # pool row -> the eval row it copies (-1: clean)


# ----------------------------------------------------------------------------- subjects
class _Words:
    """Zipf-weighted words (the vocabulary of benchmarks/dedup.py)."""

    def __init__(self, rng: random.Random):
        from dedup import _vocabulary
        self.rng = rng
        self.vocab, weights = _vocabulary(rng)
        self.cum = list(_cumulative(weights))

    def draw(self, k: int) -> list[str]:
        return self.rng.choices(self.vocab, cum_weights=self.cum, k=k)

    def rare(self) -> str:
        return self.vocab[self.rng.randrange(2000, len(self.vocab))]


def _cumulative(weights):
    total = 0.0
    for w in weights:
        total += w
        yield total


def _answer_length(rng: random.Random) -> int:
    return max(3, min(200, round(math.exp(rng.gauss(math.log(40), 0.8)))))


def synthetic_subjects(rng: random.Random, words: _Words, n: int) -> list[Subject]:
    """Keys: 60% backticked identifiers, 20% capitalised names, 20% numbers (these collide by chance)."""
    out = []
    for _ in range(n):
        draw = rng.random()
        if draw < 0.6:
            key = f"`{words.rare()}{rng.choice('_.')}{words.rare()}`"
        elif draw < 0.8:
            key = f"{words.rare().capitalize()} {words.rare().capitalize()}"
        else:
            key = str(rng.randint(1000, 9999))
        context = " ".join(words.draw(rng.randint(3, 8)))
        out.append(Subject(key, context, " ".join(words.draw(_answer_length(rng)))))
    return out


def realtext_subjects(rng: random.Random) -> list[Subject]:
    """Third-party packages' documented functions (no stdlib, no builtins): key `name`, answer its summary."""
    from realtext import MODULES, MORE_MODULES, harvest
    items = harvest(stdlib=False, modules=MODULES + MORE_MODULES)
    rng.shuffle(items)
    return [Subject(f"`{i['name']}`", rng.choice(CONTEXTS), i["answer"]) for i in items]


def infotext_subjects(rng: random.Random) -> list[Subject]:
    """Sections of installed packages' METADATA descriptions and of the GNU info manuals (benchmarks/
    realtext_chat.py's harvest): key the package or manual (`name`) and the section's heading, answer the
    section's first prose paragraph. Many sections share a package: questions about one package with
    different answers are the usual case here."""
    from realtext_chat import harvest
    items = harvest()
    rng.shuffle(items)
    return [Subject(f"`{i['name']}` ({i['topic']})", rng.choice(CONTEXTS), i["answer"]) for i in items]


# ----------------------------------------------------------------------------- rows and plants
def _system(rng: random.Random) -> int:
    return -1 if rng.random() < NO_SYSTEM_SHARE else rng.randrange(len(SYSTEMS))


def _other(rng: random.Random, n: int, current: int, start: int = 0) -> int:
    return rng.choice([k for k in range(start, n) if k != current])


def _with_boilerplate(rng: random.Random, answer: str) -> str:
    return f"{answer}\n\n{rng.choice(BOILERPLATE)}" if rng.random() < BOILERPLATE_SHARE else answer


def _fresh(rng: random.Random, subject: Subject) -> Row:
    return Row(_system(rng), rng.randrange(len(QUESTIONS)), subject, _with_boilerplate(rng, subject.answer))


def _light_edit(rng: random.Random, answer: str, replacements: list[str]) -> str:
    """1-2 words of the answer's body (never of a boilerplate paragraph) substituted."""
    body, sep, tail = answer.partition("\n\n")
    words = body.split()
    for at in rng.sample(range(len(words)), min(len(words), rng.randint(1, 2))):
        words[at] = rng.choice(replacements)
    return " ".join(words) + sep + tail


def build(shape: str, rows: int, seed: int = 0, dup_frac: float = 0.2, contam_frac: float = 0.01,
          sibling_frac: float = 0.05, evals: int = 2000) -> ChatSet:
    """The pool (about `rows` rows; real text: as many as the installed text gives) and its eval set."""
    rng = random.Random(seed)
    if shape == "chat":
        words = _Words(rng)
        n_contam, n_eval = int(rows * contam_frac), evals
        n_dup, n_sib = int(rows * dup_frac), int(rows * sibling_frac)
        n_orig = rows - n_dup - n_sib - 2 * n_contam
        subjects = synthetic_subjects(rng, words, n_orig + n_eval + n_sib + n_contam)
        replacements = words.vocab[:5000]
    else:
        subjects = realtext_subjects(rng) if shape == "realtext" else infotext_subjects(rng)
        n_eval = len(subjects) // 5       # the rest: originals, and spare answers for siblings and neighbours
        scale = (len(subjects) - n_eval) / (1 - dup_frac - contam_frac)      # the pool's rows
        n_dup, n_sib, n_contam = int(scale * dup_frac), int(scale * sibling_frac), int(scale * contam_frac)
        n_orig = len(subjects) - n_eval - n_sib - n_contam
        replacements = sorted({w for s in subjects[:500] for w in s.answer.split()})
    originals, eval_subjects = subjects[:n_orig], subjects[n_orig:n_orig + n_eval]
    spare = subjects[n_orig + n_eval:]                 # independent answers: siblings, then neighbours
    assert len(spare) >= n_sib + n_contam, (len(spare), n_sib, n_contam)
    eval_rows = [_fresh(rng, s) for s in eval_subjects]
    pool = [_fresh(rng, s) for s in originals]
    copy_of, kind, eval_of = [-1] * n_orig, ["original"] * n_orig, [-1] * n_orig

    def add(row: Row, source: int, what: str, evaluated: int = -1) -> None:
        pool.append(row)
        copy_of.append(source)
        kind.append(what)
        eval_of.append(evaluated)

    for k in range(n_sib):                               # same subject, another template, its own answer
        src = pool[rng.randrange(n_orig)]
        other = spare[k].answer
        add(Row(_system(rng), _other(rng, len(QUESTIONS), src.template), src.subject, _with_boilerplate(rng, other)),
            -1, "sibling")
    for _ in range(n_dup):
        s = rng.randrange(n_orig)
        src, how = pool[s], rng.choice(DUP_KINDS)
        system = _other(rng, len(SYSTEMS), src.system, -1) if how == "retemplate+system" else src.system
        add(Row(system, _other(rng, len(QUESTIONS), src.template), src.subject,
                _light_edit(rng, src.answer, replacements)), s, how)
    copied = rng.sample(range(n_eval), min(n_eval, 2 * n_contam))
    for j, e in enumerate(copied[:n_contam]):
        ev, how = eval_rows[e], CONTAM_KINDS[j % len(CONTAM_KINDS)]
        row = Row(ev.system, ev.template, ev.subject, ev.answer)
        if how == "system":
            row.system = _other(rng, len(SYSTEMS), ev.system, -1)
        elif how == "template":
            row.template = _other(rng, len(QUESTIONS), ev.template)
        elif how == "boilerplate":
            extra = [b for b in BOILERPLATE if b not in ev.answer]
            row.answer = f"{ev.answer}\n\n{rng.choice(extra)}"
        add(row, -1, how, e)
    for k, e in enumerate(copied[n_contam:]):             # clean: an eval subject, another template and answer
        ev = eval_rows[e]
        other = spare[n_sib + k].answer
        add(Row(_system(rng), _other(rng, len(QUESTIONS), ev.template), ev.subject, _with_boilerplate(rng, other)),
            -1, "neighbour")
    return _shuffled(rng, ChatSet(pool, eval_rows, copy_of, kind, eval_of))


def _shuffled(rng: random.Random, data: ChatSet) -> ChatSet:
    order = list(range(len(data.pool)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    return ChatSet([data.pool[o] for o in order], data.evals,
                   [position[data.copy_of[o]] if data.copy_of[o] >= 0 else -1 for o in order],
                   [data.kind[o] for o in order], [data.eval_of[o] for o in order])


def truth(data: ChatSet) -> dict:
    """What the scorer needs: copy_of and kind per pool row, the contaminated rows and their kind."""
    return {"copy_of": data.copy_of, "kind": data.kind, "eval_of": data.eval_of,
            "contaminated": [i for i, e in enumerate(data.eval_of) if e >= 0]}
