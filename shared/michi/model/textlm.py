"""A character n-gram language model of normalised English (`michi.eval.wer.normalize_text`: a-z,
apostrophe, space) and a streaming CTC prefix beam search over the listen text head's slots that
uses it (`BeamDecoder`).

The head spells what it hears; a handful of its letters are wrong on a voice it never heard. The
LM knows which spellings are English: among the beams of the search, the hypothesis with the best
acoustic score + alpha * LM log-probability + beta per character wins. Stable text is what every
beam shares: a prefix search only extends its beams, so that text can never change, and it is
what the transcript streams; the best beam's rest is the interim guess.

The LM: interpolated absolute discounting (D = 0.75) over orders 1..n, n-grams seen once dropped
above order 3; stored beside the model as `text_lm.json.gz` (n-gram counts, and the words of its
texts: a lexicon, so that a word the texts never had can cost a penalty, `BeamDecoder.oov`).
"""
from __future__ import annotations

import gzip
import inspect
import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

ALPHABET = "abcdefghijklmnopqrstuvwxyz' "
LM_FILE = "text_lm.json.gz"
NEG_INF = float("-inf")


def _lae(a: float, b: float) -> float:
    """log(exp(a) + exp(b))."""
    if a < b:
        a, b = b, a
    return a if b == NEG_INF else a + math.log1p(math.exp(b - a))


class CharLM:
    def __init__(self, counts: dict[str, int], order: int, discount: float = 0.75,
                 decoder: dict[str, float] | None = None, words: Iterable[str] = ()):
        """`decoder`: the `BeamDecoder` settings this LM is used with (alpha, beta, beam, ...);
        `words`: the lexicon (empty: none)."""
        self.counts, self.order, self.discount = counts, order, discount
        self.words = frozenset(words)
        self.decoder = dict(decoder or {})
        self.total: dict[str, int] = {}  # context -> count of its continuations
        self.types: dict[str, int] = {}  # context -> distinct continuations
        for gram, count in counts.items():
            context = gram[:-1]
            self.total[context] = self.total.get(context, 0) + count
            self.types[context] = self.types.get(context, 0) + 1
        self._cache: dict[str, float] = {}

    @classmethod
    def train(cls, texts: Iterable[str], order: int = 6, min_count: int = 2) -> "CharLM":
        """Counts over normalised texts, each framed by spaces; n-grams above order 3 seen fewer
        than `min_count` times are dropped."""
        from ..eval.wer import normalize_text

        counts: Counter[str] = Counter()
        words: set[str] = set()
        for text in texts:
            text = normalize_text(text)
            words.update(text.split())
            text = f" {text} "
            for n in range(1, order + 1):
                counts.update(text[i:i + n] for i in range(len(text) - n + 1))
        return cls({g: c for g, c in counts.items() if len(g) <= 3 or c >= min_count}, order, words=words)

    def logp(self, history: str, char: str) -> float:
        """log P(char | the last order - 1 characters of history)."""
        history = history[len(history) - self.order + 1:] if len(history) >= self.order else history
        key = history + "\0" + char
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        p = 1.0 / len(ALPHABET)
        for k in range(len(history) + 1):
            context = history[len(history) - k:]
            total = self.total.get(context)
            if not total:
                break
            p = (max(self.counts.get(context + char, 0) - self.discount, 0.0)
                 + self.discount * self.types[context] * p) / total
        if len(self._cache) > 500_000:
            self._cache.clear()
        value = self._cache[key] = math.log(p)
        return value

    @property
    def context_chars(self) -> int:
        """How much of the text before a word its probability depends on."""
        return self.order - 1

    def word_logp(self, context: str, word: str) -> float:
        """log P(word and the space after it | the text `context`)."""
        text = context + word + " "
        return sum(self.logp(text[:i], text[i]) for i in range(len(context), len(text)))

    def unigram_logp(self, word: str) -> float:
        """log P(word) at the start of a text: what the phoneme decoder's look-ahead hopes for."""
        return self.word_logp(" ", word)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump({"order": self.order, "discount": self.discount, "decoder": self.decoder,
                       "counts": self.counts, "words": sorted(self.words)}, f)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CharLM":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        return cls(data["counts"], data["order"], data["discount"], data.get("decoder"), data.get("words", ()))


class SlotDecoder:
    """A streaming CTC search: `step` reads a tick's slots one at a time (`_slot`) and returns the
    text that became stable (`_commit`)."""

    def step(self, log_probs: torch.Tensor) -> str:
        for slot in log_probs.float():
            self._slot(slot)
        return self._commit()


class BeamDecoder(SlotDecoder):
    """Streaming CTC prefix beam search with a `CharLM`, for one stream.

    `step(log_probs)` takes slots [n, vocab + 1] (the head's log-softmax, blank last) and returns
    the text that became stable; `interim` is the best beam's text after it; `finish()` returns
    the rest of the best beam and starts over. Token ids are bytes (the byte tokenizer)."""

    def __init__(self, lm: CharLM, blank: int, alpha: float = 0.5, beta: float = 1.0, beam: int = 8,
                 prune: float = -10.0, margin: float = 8.0, blank_skip: float = 0.95, settle: int = 10,
                 oov: float = 0.0):
        """`alpha`: the LM's weight; `beta`: a bonus per character (against the LM's pull towards
        short texts); `beam`: hypotheses kept; `prune`: characters less likely than this (log)
        in a slot are not tried; `margin`: hypotheses scoring this far (log) below the best are
        dropped, so that unlikely ones do not hold the stable text back; `blank_skip`: a slot whose
        blank is at least this likely only extends the beams by a blank (no LM insertions
        where the head is sure; lower values cost words: 0.5 gave 52 % dev WER where 0.95 gave 34 %;
        digital silence is muted before, `michi.transcript.mute`); `settle`: after this many sure
        blanks in a row (a pause: 10 slots are 200 ms) only the best beam is kept, so its text
        becomes stable; without it, beams that parted before the pause would hold the text back
        until the next words or `finish()`; `oov`: added to the LM score (so times alpha) of a
        hypothesis for each word it ends that is not in the LM's lexicon (0, or no lexicon: none)."""
        self.lm, self.blank, self.alpha, self.beta, self.beam = lm, blank, alpha, beta, beam
        self.prune, self.margin = prune, margin
        self.blank_skip, self.settle = math.log(blank_skip), settle
        self.oov = oov if lm.words else 0.0
        self.ids = torch.tensor([ord(c) for c in ALPHABET])
        self.reset()

    def reset(self) -> None:
        self.history = " "  # committed text's tail: the LM's context for what follows
        # prefix (after the committed text) -> [log p ending in blank, log p ending in a char, LM score]
        self.beams: dict[str, list[float]] = {"": [0.0, NEG_INF, 0.0]}
        self.quiet = 0  # sure blanks in a row
        self.word = ""  # the committed text's last word so far (a prefix may go on with it)

    def _score(self, prefix: str, entry: list[float]) -> float:
        return _lae(entry[0], entry[1]) + self.alpha * entry[2] + self.beta * len(prefix)

    def _slot(self, log_probs: torch.Tensor) -> None:
        blank = float(log_probs[self.blank])
        if blank > self.blank_skip:  # a sure blank: nothing new can start here (no LM insertions)
            for entry in self.beams.values():
                entry[0], entry[1] = _lae(entry[0], entry[1]) + blank, NEG_INF
            self.quiet += 1
            if self.quiet == self.settle:
                best = self.interim
                self.beams = {best: self.beams[best]}
            return
        self.quiet = 0
        chars = log_probs[self.ids].tolist()
        new: dict[str, list[float]] = {}
        for prefix, (pb, pnb, lm) in self.beams.items():
            total = _lae(pb, pnb)
            entry = new.setdefault(prefix, [NEG_INF, NEG_INF, lm])
            entry[0] = _lae(entry[0], total + blank)
            last = prefix[-1] if prefix else self.history[-1]
            for char, p in zip(ALPHABET, chars):
                if p < self.prune:
                    continue
                if char == last:
                    entry[1] = _lae(entry[1], pnb + p)  # the same character, not repeated
                    from_here = pb + p  # a repeat needs a blank between
                else:
                    from_here = total + p
                if from_here == NEG_INF:
                    continue
                grown = prefix + char
                target = new.get(grown)
                if target is None:
                    target = new[grown] = [NEG_INF, NEG_INF,
                                           lm + self.lm.logp(self.history + prefix, char) + self._oov(prefix, char)]
                target[1] = _lae(target[1], from_here)
        scored = sorted(((self._score(*kv), kv) for kv in new.items()), key=lambda x: x[0], reverse=True)
        floor = scored[0][0] - self.margin
        self.beams = dict(kv for score, kv in scored[: self.beam] if score >= floor)

    def _oov(self, prefix: str, char: str) -> float:
        """The penalty for the word that `char` (a space) ends after `prefix`, if not a word."""
        if char != " " or not self.oov:
            return 0.0
        word = (self.word + prefix).rsplit(" ", 1)[-1]
        return self.oov if word and word not in self.lm.words else 0.0

    def _commit(self) -> str:
        """The prefix every beam shares: stable; it leaves the beams for the history."""
        prefixes = list(self.beams)
        shared = prefixes[0]
        for p in prefixes[1:]:
            n = 0
            while n < min(len(shared), len(p)) and shared[n] == p[n]:
                n += 1
            shared = shared[:n]
        if shared:
            self.beams = {p[len(shared):]: entry for p, entry in self.beams.items()}
            self.history = (self.history + shared)[-self.lm.order:]
            self.word = (self.word + shared).rsplit(" ", 1)[-1]
        return shared

    @property
    def interim(self) -> str:
        return max(self.beams.items(), key=lambda kv: self._score(*kv))[0]

    def finish(self) -> str:
        rest = self.interim
        self.reset()
        return rest


def decoder_settings() -> set[str]:
    """The settings `BeamDecoder` takes (all its arguments but the LM and the blank id)."""
    return set(inspect.signature(BeamDecoder).parameters) - {"lm", "blank"}
