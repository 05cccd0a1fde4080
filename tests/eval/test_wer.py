"""WER: normalisation and alignment counts, checked against hand-computed cases."""
import pytest

from michi.eval.wer import (
    ErrorCounts,
    align,
    cer,
    char_errors,
    corpus_counts,
    corpus_wer,
    normalize_text,
    number_to_words,
    ordinal_words,
    summary,
    wer,
    word_errors,
)


@pytest.mark.parametrize("raw, expected", [
    ("Hello, World!", "hello world"),
    ("Call-Forward on No Answer.", "call forward on no answer"),
    ("[ascending tones]", ""),
    ("(10 seconds of silence)", ""),
    ("Please press 1 to mute, 2 to lock.", "please press one to mute two to lock"),
    ("Waldo's premier provider", "waldo's premier provider"),
    ("\u201cDon\u2019t\u201d stop", "don't stop"),
    ("'quoted' words", "quoted words"),
    ("3.5% of 1,000,000", "three point five percent of one million"),
    ("the 20th and 21st", "the twentieth and twenty first"),
    ("Caf\u00e9  au   lait", "cafe au lait"),
    ("R&D", "r and d"),
    ("  ", ""),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_numbers():
    assert number_to_words(0) == "zero"
    assert number_to_words(13) == "thirteen"
    assert number_to_words(40) == "forty"
    assert number_to_words(105) == "one hundred five"
    assert number_to_words(2024) == "two thousand twenty four"
    assert number_to_words(1_000_001) == "one million one"
    assert ordinal_words(1) == "first" and ordinal_words(12) == "twelfth" and ordinal_words(30) == "thirtieth"
    assert ordinal_words(103) == "one hundred third"
    # A digit and its spelled-out form are the same word after normalisation.
    assert wer("Press 5 for the operator", "press five for the operator.") == 0.0


def test_alignment_counts_by_hand():
    # one deletion: "the cat sat on (the) mat"
    assert word_errors("the cat sat on the mat", "the cat sat on mat") == ErrorCounts(6, 5, 0, 1, 0)
    # one substitution
    assert word_errors("the cat sat", "the dog sat") == ErrorCounts(3, 2, 1, 0, 0)
    # insertions at both ends
    assert word_errors("a b c", "x a b c d") == ErrorCounts(3, 3, 0, 0, 2)
    # everything deleted / nothing to delete
    assert word_errors("a b", "") == ErrorCounts(2, 0, 0, 2, 0)
    c = word_errors("", "a b")
    assert c == ErrorCounts(0, 0, 0, 0, 2) and c.wer == 2.0  # empty reference: denominator 1
    assert word_errors("", "").wer == 0.0
    # "a b c d" -> "a x c": b->x substituted, d deleted: 2 errors / 4 words
    c = word_errors("a b c d", "a x c")
    assert (c.substitutions, c.deletions, c.insertions, c.errors) == (1, 1, 0, 2)
    assert c.wer == pytest.approx(0.5)
    # WER can exceed 1
    assert wer("yes", "no no no") == pytest.approx(3.0)
    # Punctuation and case never count as errors
    assert wer("Hello there, General Kenobi!", "hello there general kenobi") == 0.0


def test_alignment_is_minimal():
    # Levenshtein distance of classic pairs, on characters.
    assert align(list("kitten"), list("sitting")).errors == 3
    assert align(list("flaw"), list("lawn")).errors == 2
    c = align(list("abc"), list("abc"))
    assert c.hits == 3 and c.errors == 0


def test_corpus_wer_is_total_errors_over_total_words():
    pairs = [("a b c d", "a b c d"),  # 0 / 4
             ("one two", "one")]  # 1 / 2
    assert corpus_wer(pairs) == pytest.approx(1 / 6)  # not the mean of 0 and 0.5
    total = corpus_counts(pairs)
    assert (total.ref_words, total.deletions, total.hits) == (6, 1, 5)
    s = summary([{"ref": r, "hyp": h} for r, h in pairs])
    assert s["wer"] == pytest.approx(1 / 6) and s["items"] == 2 and s["counts"]["errors"] == 1
    assert summary([])["wer"] is None


def test_cer():
    assert cer("abc", "abd") == pytest.approx(1 / 3)
    assert char_errors("Hi there", "hi there!").errors == 0
