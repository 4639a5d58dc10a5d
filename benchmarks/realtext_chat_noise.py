"""The noise kinds of the chat-shaped real-text set (realtext_chat.py): how each corrupted answer is made."""
from __future__ import annotations

import random

KINDS = ("generic", "repetition", "markup", "language", "truncated", "refusal", "echo", "neighbour")
GENERIC = ("{subject} is an important topic that many users find helpful.",
           "It provides a flexible way to handle common tasks.",
           "There are several options available, depending on your needs.",
           "In general, it is designed to be easy to use and efficient.",
           "{subject} offers a range of features that make your work simpler.",
           "You can configure it in different ways to suit your workflow.",
           "Many people rely on {subject} for everyday tasks.",
           "It works well in most situations and integrates with other tools.",
           "For more details, it is best to consult the relevant documentation.",
           "The exact behaviour may vary, but the basic idea is straightforward.",
           "Overall, {subject} is a useful part of the toolkit.",
           "It helps you get things done more quickly and reliably.",
           "This is a common question, and the answer depends on the context.",
           "{subject} is widely used and well supported.")
REFUSALS = ("I'm sorry, but I can't help with that request.", "As an AI language model, I cannot answer this.",
            "I am not able to provide information about that.", "Sorry, I don't know.",
            "I cannot assist with this question. Please consult the documentation.",
            "Unfortunately I don't have access to that documentation, so I can't say.")
ECHOES = ("You asked: {q} {q}", "{q} That is a good question. {q}", "So the question is: {q}",
          "Question: {q} Answer: {q}", "{q}")
SCRAPE_HEAD = ("Skip to main content | Home | Docs | Blog | Login", "<div class=\"nav\"><ul><li>Home</li><li>Docs</li></ul></div>",
               "Menu &#9776; Search... [Sign in] [Register]", "<html><head><title>Docs</title></head><body>",
               "Cookies: We use cookies &amp; similar technologies. [Accept] [Reject]")
SCRAPE_TAIL = ("[edit] | Share | Tweet | &copy; 2023 All rights reserved.", "</p></div><footer>Privacy | Terms</footer>",
               "<!-- tracking --> <script>var _gaq=[];</script>", "Was this page helpful? [Yes] [No] &raquo; Next",
               "{{ page.footer }} | Powered by Docs &nbsp;&nbsp; v2.1")


def _sentences(text: str) -> list[str]:
    parts = [s.strip() for s in text.replace("? ", "?\n").replace(". ", ".\n").splitlines() if s.strip()]
    return parts or [text]


def _repetition(answer: str, rng: random.Random) -> str:
    first = _sentences(answer)[0]
    words = first.split()
    if rng.random() < 0.5 or len(words) < 6:   # a whole sentence looped
        return " ".join([first] * rng.randint(4, 7))
    clause = " ".join(words[:rng.randint(3, 6)])  # the answer starts, then a clause loops
    return first + " " + " ".join([clause] * rng.randint(5, 9))


def _markup(answer: str, rng: random.Random) -> str:
    inner = " ".join(f"<span>{w}</span>" if rng.random() < 0.3 else w for w in answer.split())
    return f"{rng.choice(SCRAPE_HEAD)} <p>{inner}</p> {rng.choice(SCRAPE_TAIL)}"


def _language(foreign: list[str], rng: random.Random) -> str:
    start = rng.randrange(len(foreign) - 3)
    return " ".join(foreign[start:start + rng.randint(1, 3)])


def corrupt(kind: str, item: dict, question: str, by_source: dict, foreign: list[str], rng: random.Random) -> str:
    """The corrupted answer of `kind` for `item` asked as `question`."""
    answer = item["answer"]
    if kind == "generic":
        subject = rng.choice([item["name"], item["topic"].strip('"')])
        picked = rng.sample(GENERIC, rng.randint(2, 4))
        return " ".join(s.format(subject=subject) for s in picked)
    if kind == "repetition":
        return _repetition(answer, rng)
    if kind == "markup":
        return _markup(answer, rng)
    if kind == "language":
        return _language(foreign, rng)
    if kind == "truncated":
        words = answer.split()
        return " ".join(words[:max(3, int(len(words) * rng.uniform(0.25, 0.6)))])
    if kind == "refusal":
        return rng.choice(REFUSALS)
    if kind == "echo":
        return rng.choice(ECHOES).format(q=question)
    if kind == "neighbour":
        section = by_source[item["source"]]
        k = section.index(item)
        return section[k + 1 if k + 1 < len(section) else k - 1]["answer"]
    raise ValueError(f"unknown noise kind {kind!r}")
