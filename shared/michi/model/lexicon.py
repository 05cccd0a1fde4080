"""Words from phonemes: the lexicon and the beam search that turn the listen head's phoneme CTC
into text.

The byte CTC of the listen text head must learn English spelling from the few thousand sentences
the synthetic corpus reads, and on unheard sentences it spells poorly. Phonemes are what the audio
shows, the same in every sentence; spelling is the lexicon's job. So the head also emits phonemes
(`ListenTextHead.phone_logits`), and `PhoneBeamDecoder` searches them for word sequences: a CTC
prefix beam search whose phoneme paths must follow a word of the `Lexicon` (a trie of each word's
`word_ctc_phonemes`), ending a word where its phonemes end and the next word's begin, with an LM
scoring each word that ends: the word trigram LM (`michi.model.wordlm.WordLM`) where the model has
one, else the character LM (`michi.model.textlm.CharLM`). Words outside the lexicon
cannot be heard; the lexicon is the LM's own word list (the corpus's training texts and the
Asterisk "train" prompts) and a dictionary's (`michi.train.hearing.hearing_lexicon`: 157k words),
stored beside the model as `lexicon.json.gz` with its decoder settings.
"""
from __future__ import annotations

import gzip
import inspect
import json
import math
from array import array
from pathlib import Path
from typing import Callable, Iterable

import torch

from .phonemes import NUM_PHONEME_IDS, word_ctc_phonemes
from .textlm import NEG_INF, CharLM, SlotDecoder, _lae
from .wordlm import WordLM

LEXICON_FILE = "lexicon.json.gz"
# The decoder settings a lexicon is saved with, unless given (dev-set sweeps: the model card).
PHONE_DECODER = {"alpha": 0.5, "beta": 0.5, "beam": 16, "blank_skip": 0.95, "settle": 10, "commit_margin": 1.0}


class Lexicon:
    """Words and their phonemes, as a trie: node 0 is the root; `child(n, p)` is the node phoneme
    p leads to from n (None: no word goes on so), `ends[n]` lists the words whose phonemes end at
    n, `phone[n]` is the phoneme that leads to n. (One dict of edges, not one per node: 150k
    words are ~380k nodes.)"""

    def __init__(self, pronunciations: dict[str, Iterable[int]], decoder: dict[str, float] | None = None):
        self.pronunciations = {w: tuple(p) for w, p in pronunciations.items() if p}
        self.decoder = dict(PHONE_DECODER if decoder is None else decoder)
        self.edges: dict[int, int] = {}  # node * NUM_PHONEME_IDS + phoneme -> node
        self.ends: dict[int, list[str]] = {}
        self.phone = array("h", [-1])
        for word, phones in sorted(self.pronunciations.items()):
            node = 0
            for p in phones:
                key = node * NUM_PHONEME_IDS + p
                child = self.edges.get(key)
                if child is None:
                    child = self.edges[key] = len(self.phone)
                    self.phone.append(p)
                node = child
            self.ends.setdefault(node, []).append(word)

    def child(self, node: int, phone: int) -> int | None:
        return self.edges.get(node * NUM_PHONEME_IDS + phone)

    def lookahead(self, lm: CharLM | WordLM) -> array:
        """Per node, the best LM log probability with no context (`lm.unigram_logp`) of the
        words at or below it: what a hypothesis in the middle of a word can still hope for, so
        that it does not outrank hypotheses that have paid for their words. Computed once per LM
        (a few seconds for 150k words)."""
        if getattr(self, "_lookahead_lm", None) is not lm:
            best = array("f", [NEG_INF]) * len(self.phone)
            parent = array("i", [0]) * len(self.phone)
            for key, child in self.edges.items():
                parent[child] = key // NUM_PHONEME_IDS
            for node, words in self.ends.items():
                score = max(lm.unigram_logp(w) for w in words)
                while score > best[node]:  # up to the root, while it improves
                    best[node] = score
                    if node == 0:
                        break
                    node = parent[node]
            self._lookahead, self._lookahead_lm = best, lm
        return self._lookahead

    def __len__(self) -> int:
        return len(self.pronunciations)

    @classmethod
    def build(cls, words: Iterable[str], decoder: dict[str, float] | None = None,
              log: Callable[[str], None] | None = None) -> "Lexicon":
        """Phonemize each word (espeak-ng, ~0.4 ms a word)."""
        words = sorted(set(words))
        pronunciations = {}
        for i, word in enumerate(words):
            pronunciations[word] = word_ctc_phonemes(word)
            if log and (i + 1) % 10000 == 0:
                log(f"[lexicon] {i + 1}/{len(words)} words phonemized")
        return cls(pronunciations, decoder)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump({"decoder": self.decoder, "words": {w: list(p) for w, p in sorted(self.pronunciations.items())}}, f)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Lexicon":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        return cls(data["words"], data.get("decoder"))


class PhoneBeamDecoder(SlotDecoder):
    """Streaming lexicon-constrained CTC beam search over phoneme slots, for one stream.

    Same interface as `textlm.BeamDecoder`: `step(log_probs)` takes slots [n, phonemes + 1]
    (log-softmax, blank last) and returns the words that became stable (each as " word");
    `interim` is the best hypothesis's words after them; `finish()` returns the rest, the word in
    progress included where it is a whole word, and starts over.

    A hypothesis is the words it has ended since the last stable text and a node of the lexicon
    trie (the word in progress); its score is the CTC log probability of its phoneme paths plus
    `alpha` times the LM log probability of its ended words and the best the word in progress
    may reach (`Lexicon.lookahead`), plus `beta` per word."""

    def __init__(self, lm: CharLM | WordLM, lexicon: Lexicon, blank: int, alpha: float = 0.6, beta: float = 2.0,
                 beam: int = 16, prune: float = -8.0, margin: float = 12.0, blank_skip: float = 0.95,
                 settle: int = 10, homophones: int = 4, commit_margin: float = 2.0):
        """`prune`: phonemes less likely than this (log) in a slot are not tried; `margin`:
        hypotheses this far below the best are dropped; `blank_skip`: a slot whose blank is at
        least this likely only extends by a blank; `settle`: after this many such slots in a row
        (a pause) hypotheses may end their words there, and after twice as many the best one
        does and becomes stable (`_end_words`); `homophones`: of the words
        that end at one node, those the LM likes best that are tried; `commit_margin`: words
        become stable once the hypotheses within this of the best agree on them (the others are
        dropped): lower is sooner, and sometimes wrong."""
        self.lm, self.lexicon, self.blank = lm, lexicon, blank
        self.alpha, self.beta, self.beam, self.prune, self.margin = alpha, beta, beam, prune, margin
        self.blank_skip, self.settle, self.homophones = math.log(blank_skip), settle, homophones
        self.commit_margin = commit_margin
        self._word_cache: dict[tuple[str, str], float] = {}
        self.hope = lexicon.lookahead(lm)
        self.reset()

    def reset(self) -> None:
        self.history = " "  # the stable text's tail: the LM's context for what follows
        # (words since the stable text, trie node) -> [log p ending in blank, in a phoneme, LM score]
        self.beams: dict[tuple[tuple[str, ...], int], list[float]] = {((), 0): [0.0, NEG_INF, 0.0]}
        self.quiet = 0

    def _context(self, words: tuple[str, ...]) -> str:
        return (self.history + "".join(w + " " for w in words))[-self.lm.context_chars:]

    def word_logp(self, words: tuple[str, ...], word: str) -> float:
        """LM log probability of `word` (and the space after it), following the stable text and `words`."""
        context = self._context(words)
        key = (context, word)
        cached = self._word_cache.get(key)
        if cached is None:
            cached = self.lm.word_logp(context, word)
            if len(self._word_cache) > 200_000:
                self._word_cache.clear()
            self._word_cache[key] = cached
        return cached

    def _endings(self, words: tuple[str, ...], node: int) -> list[tuple[str, float]]:
        """The words that may end at `node`, with their LM scores, best first (`homophones` of them)."""
        scored = sorted(((w, self.word_logp(words, w)) for w in self.lexicon.ends.get(node, ())), key=lambda x: -x[1])
        return scored[: self.homophones]

    def _score(self, key: tuple[tuple[str, ...], int], entry: list[float]) -> float:
        words, node = key
        hope = self.hope[node] if node else 0.0  # the word in progress, at its best
        return _lae(entry[0], entry[1]) + self.alpha * (entry[2] + hope) + self.beta * (len(words) + (node != 0))

    def _slot(self, log_probs: torch.Tensor) -> None:
        blank = float(log_probs[self.blank])
        if blank > self.blank_skip:
            for entry in self.beams.values():
                entry[0], entry[1] = _lae(entry[0], entry[1]) + blank, NEG_INF
            self.quiet += 1
            if self.quiet in (self.settle, 2 * self.settle):
                self._end_words("branch" if self.quiet == self.settle else "collapse")
            return
        self.quiet = 0
        phones = log_probs[:self.blank]
        tried = (phones > self.prune).nonzero().flatten().tolist()
        likely = phones[tried].tolist()
        child_of, phone_of = self.lexicon.child, self.lexicon.phone
        new: dict[tuple[tuple[str, ...], int], list[float]] = {}

        def add(key, lm, p):
            target = new.get(key)
            if target is None:
                target = new[key] = [NEG_INF, NEG_INF, lm]
            target[1] = _lae(target[1], p)

        for (words, node), (pb, pnb, lm) in self.beams.items():
            total = _lae(pb, pnb)
            entry = new.setdefault((words, node), [NEG_INF, NEG_INF, lm])
            entry[0] = _lae(entry[0], total + blank)
            last = phone_of[node]
            if node:
                entry[1] = _lae(entry[1], pnb + float(log_probs[last]))  # the same phoneme, held
            endings = self._endings(words, node) if node in self.lexicon.ends else ()
            for p, lp in zip(tried, likely):
                from_here = (pb if p == last else total) + lp  # a repeat needs a blank between
                if from_here == NEG_INF:
                    continue
                child = child_of(node, p)
                if child is not None:  # the word goes on
                    add((words, child), lm, from_here)
                first = child_of(0, p)
                if first is not None:  # the word ends here, and the next begins with p
                    for word, word_lp in endings:
                        add((words + (word,), first), lm + word_lp, from_here)
        self._prune(new)

    def _prune(self, beams: dict) -> None:
        scored = sorted(((self._score(k, e), k, e) for k, e in beams.items()), key=lambda x: x[0], reverse=True)
        floor = scored[0][0] - self.margin
        self.beams = {k: e for score, k, e in scored[: self.beam] if score >= floor}

    def _end_words(self, how: str) -> None:
        """Where a hypothesis's phonemes so far are a whole word, end it (with the words the LM
        likes there). `how`:
        - "branch" (a short pause): beside going on with the word, for a word's phonemes may
          pause (a stop's burst, a slow voice's last consonant); the scores decide later;
        - "collapse" (a long pause): only the best hypothesis is kept, its whole word ended, so its
          text becomes stable; one in the middle of a word keeps it (its burst came early);
        - "final" (the end of the stream): the same, but a word in progress that is no word is
          dropped, heavily penalised."""
        grown: dict[tuple[tuple[str, ...], int], list[float]] = dict(self.beams) if how == "branch" else {}
        for (words, node), (pb, pnb, lm) in self.beams.items():
            endings = self._endings(words, node)
            if endings:
                options = [((words + (w,), 0), lm + lp) for w, lp in endings]
            elif how == "branch":
                options = []
            else:
                options = [((words, 0), lm - 1e3) if how == "final" and node else ((words, node), lm)]
            for key, score in options:
                if key not in grown or self._score(key, [pb, pnb, score]) > self._score(key, grown[key]):
                    grown[key] = [pb, pnb, score]
        if how == "branch":
            self._prune(grown)
        else:
            self.beams = dict([max(grown.items(), key=lambda kv: self._score(*kv))])

    def _commit(self) -> str:
        """The words that every hypothesis within `commit_margin` of the best shares become
        stable; they leave the hypotheses for the history, and hypotheses that disagree are dropped."""
        best = max(self._score(k, e) for k, e in self.beams.items())
        keys = [k for k, e in self.beams.items() if self._score(k, e) >= best - self.commit_margin]
        shared = keys[0][0]
        for words, _ in keys[1:]:
            n = 0
            while n < min(len(shared), len(words)) and shared[n] == words[n]:
                n += 1
            shared = shared[:n]
        if not shared:
            return ""
        self.history = self._context(shared)
        # The LM scores of the stable words stay in every entry: equal for all, they rank nothing.
        self.beams = {(words[len(shared):], node): e for (words, node), e in self.beams.items()
                      if words[:len(shared)] == shared}
        return "".join(" " + w for w in shared)

    @property
    def interim(self) -> str:
        (words, _), _ = max(self.beams.items(), key=lambda kv: self._score(*kv))
        return " ".join(words)

    def finish(self) -> str:
        self._end_words("final")
        rest = self._commit()
        self.reset()
        return rest


def phone_decoder_settings() -> set[str]:
    """The settings `PhoneBeamDecoder` takes (all its arguments but the LM, lexicon and blank id)."""
    return set(inspect.signature(PhoneBeamDecoder).parameters) - {"lm", "lexicon", "blank"}
