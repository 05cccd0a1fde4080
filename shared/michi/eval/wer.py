"""Word error rate: text normalisation, word-level Levenshtein alignment with error counts, corpus WER.

The same normalisation is applied to the reference and to the hypothesis, so what matters is that it
is consistent, not that it is linguistically complete:

- Unicode NFKC, lower case, curly quotes made straight;
- bracketed or parenthesised spans are dropped: "[ascending tones]" in the Asterisk transcripts and
  "[BLANK_AUDIO]" / "(music)" in Whisper's output are not words that were spoken;
- "&" -> "and", "%" -> "percent"; hyphens, slashes and other punctuation become word breaks;
  apostrophes inside a word are kept ("party's", "don't"), quotes around words are dropped;
- a plain integer is spelled out ("press 1" and "press one" are the same words, "22" -> "twenty
  two"), an ordinal too ("20th" -> "twentieth"), a decimal as "three point five"; "1,000" is read
  as one thousand. Currencies, times and years read as "nineteen eighty" are out of scope (Whisper
  is not consistent either).

WER = (substitutions + deletions + insertions) / reference words. A corpus WER is the total number
of errors over the total number of reference words (not the mean of per-item WERs). An item whose
normalised reference is empty has WER = its insertions (the denominator is taken as 1), and adds
nothing to a corpus's reference words.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10 ** 12, "trillion"), (10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"))


def number_to_words(n: int) -> str:
    """0 <= n < 10**15 in words, without "and": 105 -> "one hundred five"."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for scale, name in _SCALES:
        if n >= scale:
            high, rest = divmod(n, scale)
            return number_to_words(high) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


_BRACKETS = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>|\{[^}]*\}")
_ORDINAL = re.compile(r"(?<![\w.])(\d+)(st|nd|rd|th)\b")
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?![\w])")
_NOT_WORD = re.compile(r"[^a-z0-9' ]+")
_QUOTES = {"\u2018": "'", "\u2019": "'", "\u02bc": "'", "`": "'", "\u201c": '"', "\u201d": '"'}


_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}


def ordinal_words(n: int) -> str:
    """21 -> "twenty first", 100 -> "one hundredth"."""
    *head, last = number_to_words(n).split()
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])


def _spell_ordinal(match: re.Match) -> str:
    return f" {ordinal_words(int(match.group(1)))} " if len(match.group(1)) <= 15 else match.group(0)


def _spell_number(match: re.Match) -> str:
    whole, frac = match.group(1), match.group(2)
    digits = whole.replace(",", "")
    if len(digits) > 15:  # a long digit string (a phone number...): digit by digit
        words = " ".join(_ONES[int(d)] for d in digits)
    else:
        words = number_to_words(int(digits))
    if frac:
        words += " point " + " ".join(_ONES[int(d)] for d in frac)
    return f" {words} "


def normalize_text(text: str) -> str:
    """Lower-case words separated by single spaces (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text)
    for a, b in _QUOTES.items():
        text = text.replace(a, b)
    text = _BRACKETS.sub(" ", text.lower())
    text = text.replace("&", " and ").replace("%", " percent ")
    text = _ORDINAL.sub(_spell_ordinal, text)
    text = _NUMBER.sub(_spell_number, text)
    # Accented letters keep their base letter ("café" -> "cafe"); anything else is a word break.
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = _NOT_WORD.sub(" ", text)
    words = [w.strip("'") for w in text.split()]
    return " ".join(w for w in words if w)


def normalize_words(text: str) -> list[str]:
    return normalize_text(text).split()


@dataclass
class ErrorCounts:
    """Alignment of a hypothesis to a reference."""

    ref_words: int = 0
    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        return self.errors / max(self.ref_words, 1)

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(*(a + b for a, b in zip(_fields(self), _fields(other))))

    def to_dict(self) -> dict:
        return {**asdict(self), "errors": self.errors, "wer": self.wer}


def _fields(c: ErrorCounts) -> tuple[int, ...]:
    return c.ref_words, c.hits, c.substitutions, c.deletions, c.insertions


def align(ref: Sequence, hyp: Sequence) -> ErrorCounts:
    """Levenshtein alignment (unit costs) of two token sequences; among the alignments of minimal
    cost, the backtrace prefers a hit or substitution, then a deletion, then an insertion."""
    n, m = len(ref), len(hyp)
    # cost[i][j]: edit distance between ref[:i] and hyp[:j]
    cost = [list(range(m + 1))] + [[i] + [0] * m for i in range(1, n + 1)]
    for i in range(1, n + 1):
        row, prev, r = cost[i], cost[i - 1], ref[i - 1]
        for j in range(1, m + 1):
            row[j] = min(prev[j - 1] + (r != hyp[j - 1]), prev[j] + 1, row[j - 1] + 1)
    counts = ErrorCounts(ref_words=n)
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and cost[i][j] == cost[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            if ref[i - 1] == hyp[j - 1]:
                counts.hits += 1
            else:
                counts.substitutions += 1
            i, j = i - 1, j - 1
        elif i > 0 and cost[i][j] == cost[i - 1][j] + 1:
            counts.deletions += 1
            i -= 1
        else:
            counts.insertions += 1
            j -= 1
    return counts


def word_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Word alignment counts after normalising both texts."""
    return align(normalize_words(reference), normalize_words(hypothesis))


def char_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Character alignment (spaces included) of the normalised texts; `ref_words` counts characters.
    Useful where WER saturates at 1 (an early listen text head that gets letters but not words)."""
    return align(list(normalize_text(reference)), list(normalize_text(hypothesis)))


def wer(reference: str, hypothesis: str) -> float:
    return word_errors(reference, hypothesis).wer


def cer(reference: str, hypothesis: str) -> float:
    return char_errors(reference, hypothesis).wer


def corpus_counts(pairs: Iterable[tuple[str, str]]) -> ErrorCounts:
    total = ErrorCounts()
    for reference, hypothesis in pairs:
        total = total + word_errors(reference, hypothesis)
    return total


def corpus_wer(pairs: Iterable[tuple[str, str]]) -> float:
    """Total errors / total reference words over (reference, hypothesis) pairs."""
    return corpus_counts(pairs).wer


def summary(rows: Sequence[dict], ref_key: str = "ref", hyp_key: str = "hyp") -> dict:
    """Corpus WER and CER with their counts, from rows holding a reference and a hypothesis."""
    words = ErrorCounts()
    chars = ErrorCounts()
    for row in rows:
        words = words + word_errors(row[ref_key], row[hyp_key])
        chars = chars + char_errors(row[ref_key], row[hyp_key])
    return {"wer": words.wer if rows else None, "cer": chars.wer if rows else None, "items": len(rows),
            "counts": words.to_dict()}
