"""Phonemes: the sound of the agent's words, as a second input stream beside its text.

The tiny model's text stream is bytes, and a byte says little about the sound it stands for
("ough" in though / through / tough). With ten hours of speech a tiny model cannot learn English
spelling, so the words are also given as phonemes (DESIGN.md, "The latent": phoneme input aligns
faster than characters on small data). espeak-ng phonemizes each word offline: the copy that
piper-tts bundles (`piper.phonemize_espeak`, in-process, no subprocess, ~0.4 ms a word).

Symbols are the Unicode code points espeak-ng writes (IPA letters, stress and length marks, the
word's trailing punctuation), numbered by piper's fixed phoneme table (`PHONEME_IDS`, 0 unused
here); spaces are dropped. Ids are < `NUM_PHONEME_IDS`.

On the tick axis a word's phonemes are spread evenly over the ticks its audio spans
(`data.align.align_phonemes`), at most `phone_slots` a tick; at inference the model's advance
head says how many the next tick takes from a queue (`engine.BackboneEngine`).
"""
from __future__ import annotations

import re
from collections import deque
import threading
from functools import lru_cache

NUM_PHONEME_IDS = 256  # the embedding table's size: piper's ids (< 166) with room to spare
PHONE_SLOTS = 4  # phonemes a tick holds at most (piper-joe: 12 a second, ~1 a tick)
NO_PHONE = 0  # an empty slot (piper's id 0 is its pad symbol "_", which espeak never writes)
MAX_HOLD_TICKS = 4  # a queue the model holds longer than this takes its next phoneme anyway
VOICE = "en-us"
_LOCK = threading.Lock()  # espeak-ng is one global state per process
_WORD = re.compile(r"\S+")


class PhonemizerError(RuntimeError):
    pass


@lru_cache(maxsize=1)
def _tables():
    try:
        from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP
        from piper.phonemize_espeak import EspeakPhonemizer
    except ImportError as e:
        raise PhonemizerError(f"phonemes need the package piper-tts (its bundled espeak-ng): {e}") from None
    ids = {sym: v[0] for sym, v in DEFAULT_PHONEME_ID_MAP.items()}
    if max(ids.values()) >= NUM_PHONEME_IDS:
        raise PhonemizerError("piper's phoneme table outgrew NUM_PHONEME_IDS")
    return EspeakPhonemizer(), ids


@lru_cache(maxsize=65536)
def word_phonemes(word: str) -> tuple[int, ...]:
    """Phoneme ids of one word (with its punctuation), spaces dropped; () for no sound."""
    word = word.strip()
    if not word:
        return ()
    phonemizer, ids = _tables()
    with _LOCK:
        sentences = phonemizer.phonemize(VOICE, word)
    return tuple(ids[s] for sent in sentences for s in sent if s in ids and not s.isspace())


def text_phonemes(text: str) -> list[tuple[int, ...]]:
    """Each whitespace-separated word's phoneme ids, in order."""
    return [word_phonemes(w) for w in _WORD.findall(text)]


def symbols(phone_ids) -> str:
    """Ids back to their symbols (for logs and tests)."""
    _, ids = _tables()
    inverse = {v: k for k, v in ids.items()}
    return "".join(inverse.get(int(i), "?") for i in phone_ids if int(i) != NO_PHONE)


class PhonemeQueue:
    """One call's agent phonemes waiting to be spoken, and the pace the model asks for.

    Forced text (a TTS prompt, a reply the gateway hands in) is phonemized whole when it is
    forced: its words are known ahead of their audio, as in training, where a word's phonemes
    start with its audio while its text leads. The agent's own sampled text is phonemized word by
    word as each word ends (a space or a stream token after it), so its sound lags its text by
    one tick more. Each tick takes `take` phonemes (set from the advance head's last answer by
    `pace`); if the model holds for more than `max_hold` ticks while phonemes wait, the next one
    is taken anyway.
    """

    def __init__(self, decode, slots: int, max_hold: int = MAX_HOLD_TICKS):
        self.decode, self.slots, self.max_hold = decode, slots, max_hold
        self.queue: deque[int] = deque()
        self.forced = 0  # how many at the queue's front came from forced text (what TTS waits for)
        self.word: list[int] = []  # token ids of the agent's own word in progress
        self.take = 0
        self.held = 0
        self.credit = 0.0  # expected phonemes asked for and not yet taken (see `pace`)

    def add_text(self, text: str, forced: bool = False) -> None:
        for ids in text_phonemes(text):
            self.queue.extend(ids)
            self.forced += len(ids) if forced else 0

    def own_token(self, token: int, is_text: bool) -> None:
        if is_text:
            if self.word and self.decode([token])[:1].isspace():
                self._flush()
            self.word.append(token)
        elif self.word:
            self._flush()

    def _flush(self) -> None:
        self.add_text(self.decode(self.word))
        self.word = []

    def pace(self, probs) -> None:
        """The advance head's distribution over 0..slots phonemes for the next tick. The tick
        takes the expected count, rounded, the remainder carried on: a head that gives a 40 %
        chance of moving on each tick moves on two ticks in five, at the pace it was trained
        on, where its argmax would hold every time (until max_hold)."""
        if not self.queue:  # nothing waits: no credit carried into the next text
            self.take, self.credit = 0, 0.0
            return
        self.credit += sum(k * float(p) for k, p in enumerate(probs))
        self.take = int(self.credit + 0.5)
        self.credit -= self.take

    def next_tick(self) -> tuple[list[int], int]:
        """This tick's phonemes (padded to `slots`) and the next one waiting (NO_PHONE: none)."""
        take = self.take
        if self.queue and take == 0:
            self.held += 1
            take = int(self.held > self.max_hold)
        n = min(take, len(self.queue), self.slots)
        if n:
            self.held = 0
            self.forced = max(0, self.forced - n)
        phones = [self.queue.popleft() for _ in range(n)] + [NO_PHONE] * (self.slots - n)
        return phones, self.queue[0] if self.queue else NO_PHONE
