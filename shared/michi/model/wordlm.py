"""A word trigram LM for the phoneme decoder: which word comes next, given the two before it.

The character LM (`michi.model.textlm.CharLM`) sees five characters back: for a word it knows
about one word of context, so among words that sound alike (the phoneme decoder's choice) it
mostly prefers the frequent spelling. `WordLM` gives each word its probability after the two words
before it: interpolated Kneser-Ney over the training texts' word trigrams, bigrams and
continuation unigrams; a word its texts never had (the lexicon has 157k words, the texts some 25k)
takes the rest of the unigram mass, spelled by the character LM. Stored beside the model as
`word_lm.json.gz`; `PhoneBeamDecoder` scores words with it where it is there.
"""
from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterable

from .textlm import CharLM

WORD_LM_FILE = "word_lm.json.gz"
START, END = "<s>", "</s>"


def words_of(text: str) -> list[str]:
    """A text's words as the LMs count them (`michi.eval.wer.normalize_text`)."""
    from ..eval.wer import normalize_text

    return normalize_text(text).split()


def _totals(grams: dict[tuple[str, ...], int]) -> dict[tuple[str, ...], tuple[int, int]]:
    """Per context (a gram less its last word): the count of what follows it, and how many
    distinct words do."""
    out: dict[tuple[str, ...], tuple[int, int]] = {}
    for gram, n in grams.items():
        total, distinct = out.get(gram[:-1], (0, 0))
        out[gram[:-1]] = (total + n, distinct + 1)
    return out


class WordLM:
    context_chars = 80  # the stable text the decoder keeps: two words, whole

    def __init__(self, bigrams: dict[tuple[str, str], int], trigrams: dict[tuple[str, str, str], int],
                 spell: CharLM, discount: float = 0.75, unknown: float = 0.05):
        """`bigrams`, `trigrams`: counts, each sentence framed by two `START`s and an `END` (the
        trigrams may leave out rare ones); `spell`: scores the letters of a word the texts never
        had; `unknown`: the unigram mass those words share."""
        self.bigrams, self.trigrams, self.spell = bigrams, trigrams, spell
        self.discount, self.unknown = discount, unknown
        self.continuations = Counter(w for _v, w in self.bigrams)  # distinct words before each word
        self.types_total = sum(self.continuations.values())
        self.after1, self.after2 = _totals(bigrams), _totals(trigrams)
        self._cache: dict[tuple[str, str, str], float] = {}

    @classmethod
    def train(cls, texts: Iterable[str], spell: CharLM, min_trigram: int = 2, **kwargs) -> "WordLM":
        """Counts over the texts; trigrams seen fewer than `min_trigram` times are left out (most
        are seen once: 5x smaller, within half a point of WER on the dev set)."""
        bigrams: Counter[tuple[str, str]] = Counter()
        trigrams: Counter[tuple[str, str, str]] = Counter()
        for text in texts:
            words = [START, START, *words_of(text), END]
            bigrams.update(zip(words[1:], words[2:]))
            trigrams.update(zip(words, words[1:], words[2:]))
        return cls(dict(bigrams), {g: n for g, n in trigrams.items() if n >= min_trigram}, spell, **kwargs)

    @property
    def words(self) -> frozenset[str]:
        return frozenset(self.continuations) - {END}

    def unigram(self, word: str) -> float:
        """P(word) with no context: its share of the distinct words seen before it, or, for a word
        the texts never had, the unknown mass times its spelling's probability."""
        spelled = math.exp(self.spell.word_logp(" ", word))
        return (1 - self.unknown) * self.continuations.get(word, 0) / self.types_total + self.unknown * spelled

    def unigram_logp(self, word: str) -> float:
        return math.log(self.unigram(word))

    def logp(self, u: str, v: str, word: str) -> float:
        """log P(word | u v)."""
        key = (u, v, word)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        p = self.unigram(word)
        for context, totals, seen in (((v,), self.after1, self.bigrams.get((v, word), 0)),
                                      ((u, v), self.after2, self.trigrams.get((u, v, word), 0))):
            if context in totals:
                total, distinct = totals[context]
                p = (max(seen - self.discount, 0.0) + self.discount * distinct * p) / total
        if len(self._cache) > 500_000:
            self._cache.clear()
        value = self._cache[key] = math.log(p)
        return value

    def word_logp(self, context: str, word: str) -> float:
        """log P(word) after the text `context` (its last two words; the start of a text before
        them), as `CharLM.word_logp` takes it."""
        before = [START, START, *context.split()][-2:]
        return self.logp(before[0], before[1], word)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump({"discount": self.discount, "unknown": self.unknown,
                       "bigrams": [[*gram, n] for gram, n in sorted(self.bigrams.items())],
                       "trigrams": [[*gram, n] for gram, n in sorted(self.trigrams.items())]}, f)
        return path

    @classmethod
    def load(cls, path: str | Path, spell: CharLM) -> "WordLM":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        return cls({(v, w): n for v, w, n in data["bigrams"]}, {(u, v, w): n for u, v, w, n in data["trigrams"]},
                   spell, data["discount"], data["unknown"])
