"""A second real-text dev set, chat-shaped (system + user + assistant), from text that ships offline and that no
outside check uses: the long descriptions in installed packages' METADATA (importlib.metadata) and the GNU info
manuals under /usr/share/info. Not manual pages, not Python's standard library.

Each item is one section of a document: the question asks what the document says about the section's heading,
the answer is the section's first prose paragraph. A shared set of system prompts is drawn for every row, clean or
not, so the system turn gives nothing away. A `noise` share of the training rows is corrupted, in equal parts:

- `generic`: a vague answer that names the subject and fits any question;
- `repetition`: a degenerate loop (a sentence or clause of the right answer repeated);
- `markup`: the answer buried in scraped navigation, tags and entities;
- `language`: an answer in another language (long translated strings from the installed .mo catalogues);
- `truncated`: cut mid-sentence; `refusal`; `echo`: the question restated;
- `neighbour`: the right document's answer to the neighbouring section (plausible, about something else).

Meta and test rows are clean and drawn from items the training rows do not use. Deterministic by seed for a given
set of installed packages and manuals.

    python benchmarks/realtext_chat.py --out DIR [--rows 1500] [--noise 0.3] [--meta-rows 150] [--seed 0]
"""
from __future__ import annotations

import gettext
import gzip
import re
from pathlib import Path

from realtext import draw, main, write as write_tables
from realtext_chat_noise import KINDS, corrupt

INFO_DIR = Path("/usr/share/info")
MO_GLOB = "/usr/share/vim/vim*/lang/*/LC_MESSAGES/*.mo"
SYSTEMS = ("You are a helpful assistant.", "You are a concise technical writer. Answer in one paragraph.",
           "You answer questions about software documentation accurately.",
           "You are a support engineer. Be clear and specific.", "Answer the user's question about the manual.")
QUESTIONS = ("What does {doc} say about {topic}?", "In {doc}, what is {topic}?",
             "Explain {topic} in {doc}.", "Can you summarise the part of {doc} on {topic}?",
             "I'm reading about {doc}. What should I know about {topic}?")
MD_HEADING = re.compile(r"^#{1,4}\s+(.+?)\s*#*$")
RST_UNDERLINE = re.compile(r"^([=\-~^*#+])\1{2,}$")
LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


def _prose(text: str) -> bool:
    """A paragraph worth asking about: 12+ words, mostly letters, not a table, list, directive or code."""
    words = text.split()
    letters = sum(ch.isalpha() for ch in text)
    return (len(words) >= 12 and letters / max(len(text), 1) > 0.7 and not text.startswith(("|", "-", "*", "..",
            ">>>", "$", "+", "```", ":", "#", "<", "[", "!")) and "://" not in text and "::" not in text[-3:])


def _clean(paragraph: list[str], limit: int = 480) -> str:
    text = LINK.sub(r"\1", re.sub(r"\s+", " ", " ".join(paragraph))).replace("**", "").replace("``", "`").strip()
    if len(text) > limit:
        cut = text[:limit].rfind(". ")
        text = text[:cut + 1] if cut > 80 else text[:limit].rsplit(" ", 1)[0] + "."
    return text


def sections(lines: list[str], doc: str) -> list[tuple[str, str]]:
    """(heading, first prose paragraph) per section of a Markdown, reST or info text (`doc` for untitled ones)."""
    out, heading, paragraph, done = [], doc, [], False

    def flush():
        nonlocal paragraph, done
        text = _clean(paragraph) if paragraph else ""
        if not done and _prose(text):
            out.append((heading, text))
            done = True
        paragraph = []

    for k, line in enumerate(lines):
        stripped = line.strip()
        nxt = lines[k + 1].strip() if k + 1 < len(lines) else ""
        title = MD_HEADING.match(stripped)
        underlined = stripped and RST_UNDERLINE.match(nxt) and abs(len(nxt) - len(stripped)) <= 2
        if title or (underlined and len(stripped) < 70 and not stripped[0].islower()):
            flush()
            heading, done = (title.group(1) if title else stripped).strip("`* "), False
        elif RST_UNDERLINE.match(stripped) or not stripped:
            flush()
        elif not line.startswith(("    ", "\t")):
            paragraph.append(stripped)
    flush()
    return out


def metadata_items() -> list[dict]:
    """Sections of every installed distribution's long description (one entry per distinct answer)."""
    import importlib.metadata as md
    items = []
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = dist.metadata["Name"]
        body = dist.metadata.get_payload() or dist.metadata["Description"] or ""
        for heading, answer in sections(body.splitlines(), name):
            topic = name if heading == name else f"\"{heading}\""
            items.append({"doc": f"the {name} documentation", "name": name, "topic": topic, "answer": answer, "source": f"metadata:{name}"})
    return items


def info_items(folder: Path = INFO_DIR) -> list[dict]:
    """Sections of the GNU info manuals: one per node (its title the topic, its first prose paragraph)."""
    items = []
    for path in sorted(folder.glob("*.info*.gz")):
        manual = path.name.split(".info")[0]
        text = gzip.open(path, "rt", errors="replace").read()
        for node in text.split("\x1f")[1:]:
            head = re.search(r"Node: ([^,\n]+)", node)
            if not head or head.group(1).strip() == "Top":
                continue
            body = node.splitlines()[1:]
            body = [line for line in body if not line.startswith(("* ", "File: ")) and "::" not in line]
            found = sections(body, head.group(1).strip())
            if found:
                items.append({"doc": f"the {manual} manual", "name": manual, "topic": f"\"{head.group(1).strip()}\"",
                              "answer": found[0][1], "source": f"info:{manual}"})
    return items


def foreign_texts(min_chars: int = 60) -> list[str]:
    """Long translated strings from the installed gettext catalogues (not English), for `language` answers."""
    import glob
    texts = []
    for path in sorted(glob.glob(MO_GLOB)):
        lang = Path(path).parts[-3].split(".")[0]
        if lang.startswith("en"):
            continue
        try:
            catalog = gettext.GNUTranslations(open(path, "rb"))._catalog
        except (OSError, UnicodeDecodeError, Exception):  # noqa: BLE001 - an odd catalogue just adds nothing
            continue
        texts += [re.sub(r"\s+", " ", v).strip() for k, v in catalog.items()
                  if isinstance(v, str) and k and len(v) >= min_chars and "%" not in v and sum(c.isalpha() for c in v) > 0.7 * len(v)]
    return sorted(set(texts))


def harvest() -> list[dict]:
    """Every item, metadata then info, one per distinct answer, in a fixed order."""
    seen, out = set(), []
    for item in metadata_items() + info_items():
        if item["answer"] not in seen:
            seen.add(item["answer"])
            out.append(item)
    return out


def build(rows: int = 1500, noise: float = 0.3, meta_rows: int = 150, test_rows: int = 200, seed: int = 0):
    """(train, meta, test, truth) as lists of dicts: system/instruction/input/output/source; truth: kind per row."""
    rng, by_source, _, train_items, meta_items, test_items, kinds = draw(
        harvest(), KINDS, rows, noise, meta_rows, test_rows, seed, "documentation sections")
    foreign = foreign_texts()

    def row(item, kind):
        question = rng.choice(QUESTIONS).format(doc=item["doc"], topic=item["topic"])
        answer = item["answer"] if kind == "clean" else corrupt(kind, item, question, by_source, foreign, rng)
        return {"system": rng.choice(SYSTEMS), "instruction": question, "input": "", "output": answer,
                "source": item["source"]}

    train = [row(i, k) for i, k in zip(train_items, kinds)]
    meta = [row(i, "clean") for i in meta_items]
    test = [row(i, "clean") for i in test_items]
    return train, meta, test, [{"row": n, "kind": k} for n, k in enumerate(kinds)]


def write(out: Path, **options) -> dict[str, Path]:
    return write_tables(out, build, **options)


if __name__ == "__main__":
    main(__doc__, build)
