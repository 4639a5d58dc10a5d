"""The label-free answer-quality signals (select/quality.py): each flags its planted defect and leaves a plain,
complete, on-language answer alone."""
import numpy as np

from dpsel.select import quality

QUESTION = "What does the coreutils manual say about the sort command and its options?"
GOOD = ("The sort command sorts, merges or compares the lines of the given files, or of standard input, and "
        "writes the result to standard output.")
OTHERS = ["The wc command counts the bytes, words and lines of each file it is given.",
          "The cut command prints selected parts of each line, by byte, character or field.",
          "Use tail to print the last lines of a file; with -f it follows the file as it grows."]


def test_repetition_flags_loops_and_duplicated_lines_not_prose():
    loop = " ".join(["The sort command sorts lines."] * 6)
    lines = "sort the lines\nsort the lines\nsort the lines\nthen stop"
    scores = quality.repetition([GOOD, loop, lines])
    assert scores[0] < 0.1 and scores[1] > 0.8 and scores[2] > 0.6
    assert quality.duplicate_line_fraction([lines])[0] > 0.7
    assert quality.compression_badness([loop])[0] > quality.compression_badness([GOOD])[0] + 0.3


def test_debris_flags_markup_and_symbol_junk():
    scraped = "<div class='nav'>Home | Docs</div> &nbsp; <p>sort lines</p> https://example.com #### **** [1]"
    scores = quality.debris([GOOD, scraped, ""])
    assert scores[0] < 0.05 and scores[1] > 0.4 and scores[2] == 1.0


def test_language_mismatch_flags_an_answer_in_another_language():
    german = ("Der Befehl sortiert die Zeilen der angegebenen Dateien und schreibt das Ergebnis auf die "
              "Standardausgabe.")
    scores = quality.language_mismatch([QUESTION] * 3, [GOOD, german, "ok"])
    assert scores[0] < 0.2 and scores[1] > 0.8
    assert scores[2] == 0.0  # too short to say: no mismatch claimed
    # plainly English pairs never ask langid; the German answer (and an English answer to a French question) do
    assert quality.plainly_english(QUESTION) and quality.plainly_english(GOOD) and not quality.plainly_english(german)
    french = "Quelle est la commande qui trie les lignes d'un fichier texte et comment l'utiliser ?"
    assert not quality.plainly_english(french) and quality.language_mismatch([french], [GOOD])[0] > 0.8


def test_incompleteness_flags_cut_answers_and_open_fences():
    cut = "The sort command sorts, merges or compares the lines of the given"
    fence = "Run it like this:\n```\nsort -n file."
    scores = quality.incompleteness([GOOD, cut, fence, "See f(x."])
    assert scores[0] == 0.0 and scores[1] >= 0.5 and scores[2] >= 0.5 and scores[3] >= 0.25


def test_echo_flags_an_answer_that_restates_the_question():
    scores = quality.echo([QUESTION] * 3, [GOOD, f"You asked: {QUESTION}", ""])
    assert scores[0] < 0.15 and scores[1] > 0.8 and scores[2] == 0.0


def test_template_frequency_flags_one_template_with_the_subject_swapped_in():
    topics = ["sort", "wc", "cut", "tail", "head", "uniq"]
    questions = [f"What does the {t} command do?" for t in topics]
    generic = [f"The {t} command is a useful tool that helps you get things done more quickly and reliably."
               for t in topics[:3]]
    answers = generic + [GOOD, *OTHERS[:2]]
    scores = quality.template_frequency(questions, answers)
    assert scores[:3].min() > scores[3:].max()
    extra_only = quality.template_frequency(questions[:1], generic[:1], (questions[1:3], generic[1:3]))
    assert extra_only[0] > 0.5  # `extra` rows count: a meta answer is judged against the pool


def test_genericness_flags_answers_close_to_each_other_and_far_from_their_question():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    q = unit(rng.standard_normal((40, 16)))
    a = unit(q + 0.3 * rng.standard_normal((40, 16)))             # specific: near its own question
    template = unit(rng.standard_normal((1, 16)))
    a[:5] = unit(template + 0.05 * rng.standard_normal((5, 16)))  # generic: all alike, near no question
    scores = quality.genericness(q, a, k=3)
    assert scores[:5].min() > scores[5:].max()
    # read a few rows at a time (bounded memory on a large pool): the same scores, itself never a neighbour
    np.testing.assert_allclose(quality.genericness(q, a, k=3, chunk=7), scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(quality.genericness(q, a, k=1, sample=40, chunk=3),
                               quality.genericness(q, a, k=1, sample=40, chunk=40), rtol=1e-5, atol=1e-6)


def test_text_signals_names_every_signal_for_every_row():
    out = quality.text_signals([QUESTION] * 2, [GOOD, OTHERS[0]])
    assert set(out) == set(quality.TEXT_SIGNALS)
    assert all(v.shape == (2,) and np.all(np.isfinite(v)) for v in out.values())


def test_signals_and_fluency_read_through_text_views_equal_the_lists():
    """The bads prior reads a pool's questions and answers through `TextView`s over its Arrow conversations
    (no list of texts held): every text signal and the fluency score come out as from the lists."""
    import pyarrow as pa

    from dpsel.data.conversations import Conversations
    from dpsel.select.bads.quality_evidence import quality_signals
    from dpsel.select.consistency import TextView, answer_text
    from dpsel.select.fluency import bigram_fluency
    answers = [GOOD, *OTHERS, " ".join(["The sort command sorts lines."] * 6), "<div>Home</div> ####", "The", ""]
    rows = [[{"role": "user", "content": f"{QUESTION} ({i})"}, {"role": "assistant", "content": a}]
            for i, a in enumerate(answers)]
    pool = Conversations.spilled(pa.array(rows))
    meta = rows[1:4]
    listed, viewed = quality_signals(rows, meta), quality_signals(pool, meta)
    for held, lazy in zip(listed, viewed):
        assert held.keys() == lazy.keys() and len(held) == len(quality.TEXT_SIGNALS)
        for name in held:
            np.testing.assert_array_equal(held[name], lazy[name])
    view = TextView(pool, answer_text)
    assert list(view) == answers and view[2] == answers[2] and view[1:3] == answers[1:3]
    np.testing.assert_array_equal(bigram_fluency(view, answers[:2]), bigram_fluency(answers, answers[:2]))
