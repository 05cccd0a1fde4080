"""Phonemes: the sound of the agent's words, as a second input stream beside its text.

The tiny model's text stream is bytes, and a byte says little about the sound it stands for
("ough" in though / through / tough). With ten hours of speech a tiny model cannot learn English
spelling, so the words are also given as phonemes (DESIGN.md, "The latent": phoneme input aligns
faster than characters on small data). espeak-ng phonemizes each word offline: the copy that
piper-tts bundles (`piper.phonemize_espeak`, in-process, no subprocess, ~0.4 ms a word).

Symbols are the Unicode code points espeak-ng writes (IPA letters, stress and length marks, the
word's trailing punctuation), numbered by piper's fixed phoneme table (`PHONEME_IDS`, 0 unused
here); spaces are dropped. Ids are < `NUM_PHONEME_IDS`.

Two ways onto the tick axis (`data.align`), both from when each phoneme starts in the audio:
- slots: the phonemes that begin in a tick, at most `phone_slots`; the advance head says how
  many the next tick takes from the queue (`PhonemeQueue`).
- frames: the phoneme sounding in each of the tick's 8 frames of 10 ms (the latent's own frames,
  `model.melpca`), `FRAME_START` added where one begins; the advance head says, per frame of the
  next tick, whether a new one begins there (`FrameQueue`). A latent whose frames change
  phoneme mid-tick is told where.
"""
from __future__ import annotations

import re
import threading
import unicodedata
from collections import deque
from functools import lru_cache

NUM_PHONEME_IDS = 256  # the embedding table's size: piper's ids (< 166) with room to spare
PHONE_SLOTS = 4  # phonemes a tick holds at most (piper-joe: 12 a second, ~1 a tick)
NO_PHONE = 0  # an empty slot; silence in a frame (piper's id 0 is its pad "_", never written)
FRAMES_PER_TICK = 8  # frame labels of a tick: the latent's 10 ms frames
FRAME_START = NUM_PHONEME_IDS  # added to a frame's label where its phoneme (or a silence) begins
MAX_HOLD_TICKS = 4  # a queue the model holds longer than this takes its next phoneme anyway
# Frames of silence before a phoneme that follows silence, paced by durations: every training clip
# opens with a breath of silence (piper's, 0.1 s and more) before its first phoneme.
LEAD_FRAMES = 10
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


def speakable(text: str) -> str:
    """`text` without control characters (NUL and the like: a model may emit any byte, and espeak
    refuses them)."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")


@lru_cache(maxsize=65536)
def word_phonemes(word: str) -> tuple[int, ...]:
    """Phoneme ids of one word (with its punctuation), spaces dropped; () for no sound."""
    word = speakable(word).strip()
    if not word:
        return ()
    phonemizer, _ = _tables()
    with _LOCK:
        sentences = phonemizer.phonemize(VOICE, word)
    return tuple(p for sent in sentences for s in sent if (p := phoneme_id(s)) is not None)


def phoneme_id(symbol: str) -> int | None:
    """The id of one symbol espeak-ng writes, None for what the stream leaves out (spaces)."""
    _, ids = _tables()
    return None if symbol.isspace() or symbol in ("^", "$", "_") else ids.get(symbol)


def _ids(symbols_: str) -> tuple[int, ...]:
    return tuple(p for s in symbols_ if (p := phoneme_id(s)) is not None)


@lru_cache(maxsize=4096)
def text_phonemes(text: str) -> tuple[tuple[int, ...], ...]:
    """Each whitespace-separated word's phoneme ids, in order, phonemized in its sentence, as
    piper speaks (and so as the training labels were made): espeak-ng reduces and joins function
    words in context ("for the" is one word, fɚðə; "to" is tə, "a" is ɐ), which word by word it
    would not (a quarter of the words differ). espeak's words are matched to the text's
    (`match_words`); a group of text words espeak joined gives its phonemes to the first of them."""
    words = _WORD.findall(text)
    if not words:
        return ()
    phonemizer, _ = _tables()
    with _LOCK:
        sentences = phonemizer.phonemize(VOICE, " ".join(w for w in map(speakable, words) if w))
    spoken = [ids for w in " ".join("".join(s) for s in sentences).split() if (ids := _ids(w))]
    return tuple(match_words([word_phonemes(w) for w in words], spoken))


def match_words(alone: list[tuple[int, ...]], spoken: list[tuple[int, ...]],
                most: int = 4, band: int = 8) -> list[tuple[int, ...]]:
    """Give espeak's sentence words (`spoken`) to the text's words, whose own phonemes (`alone`,
    each word by itself) guide the match: a monotone alignment of groups, k text words to one
    spoken word or one text word to k spoken ones (k <= most), of the least edit distance. The
    text word that opens a group gets the group's phonemes, the others none. The search keeps
    within `band` words of the diagonal, so a long text costs linear time."""
    n, m = len(alone), len(spoken)
    inf = float("inf")
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    back: list[list[tuple[int, int] | None]] = [[None] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    for i in range(n + 1):
        for j in range(m + 1):
            if cost[i][j] == inf or abs(j - i * m / n) > band:
                continue
            steps = [(k, 1) for k in range(1, most + 1)] + [(1, k) for k in range(2, most + 1)]
            for di, dj in steps:
                if i + di > n or j + dj > m:
                    continue
                a = sum(alone[i:i + di], ())
                b = sum(spoken[j:j + dj], ())
                c = cost[i][j] + _edit(a, b)
                if c < cost[i + di][j + dj]:
                    cost[i + di][j + dj], back[i + di][j + dj] = c, (di, dj)
    if cost[n][m] == inf:  # counts too far apart to pair: each word by itself
        return list(alone)
    out: list[tuple[int, ...]] = []
    i, j = n, m
    while i or j:
        di, dj = back[i][j]
        out[:0] = [sum(spoken[j - dj:j], ())] + [()] * (di - 1)
        i, j = i - di, j - dj
    return out


def _edit(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Levenshtein distance of two id sequences."""
    row = list(range(len(b) + 1))
    for x in a:
        prev, row[0] = row[0], row[0] + 1
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


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
        self.added = 0  # forced phonemes ever queued
        self.word_starts: deque[int] = deque()  # forced words not yet due: `added` at their start

    def add_text(self, text: str, forced: bool = False) -> list[int]:
        """Queue the text's phonemes; returns them."""
        added = []
        for ids in text_phonemes(text):
            if forced:
                self.word_starts.append(self.added)
                self.added += len(ids)
                self.forced += len(ids)
            self.queue.extend(ids)
            added += ids
        return added

    def words_due(self) -> int:
        """How many more forced words may be said now: those whose first phoneme is next in the
        queue or already taken. In training a word's text leads its sound by about a tick
        (`data.align`); forced text far ahead of its sound is a state the model never saw."""
        due = 0
        while self.word_starts and self.word_starts[0] <= self.added - self.forced:
            self.word_starts.popleft()
            due += 1
        return due

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


class FrameQueue(PhonemeQueue):
    """`PhonemeQueue` for the frame stream: a tick reads 8 frame labels, the phoneme sounding in
    each (`FRAME_START` added where one begins). A start after the last queued phoneme begins a
    silence. Two ways to pace:
    - with `durations` (a `model.durations.DurationPredictor.frames`): each text's phonemes get
      their lengths in frames when queued, and each begins once the one before has sounded its
      length (fractions carried on, so a phoneme shorter than half a frame is passed over, as
      in the training labels); after silence, the next one waits `LEAD_FRAMES` first;
    - without: the advance head gives, per frame of the next tick, the chance that a new phoneme
      begins there; the tick takes the expected number of starts (rounded, remainder carried, as
      `PhonemeQueue.pace`), at its most likely frames."""

    def __init__(self, decode, max_hold: int = MAX_HOLD_TICKS, durations=None):
        super().__init__(decode, FRAMES_PER_TICK, max_hold)
        self.current = NO_PHONE  # what sounds now
        self.probs: list[float] = [0.0] * FRAMES_PER_TICK
        self.durations = durations
        self.lengths: deque[float] = deque()  # frames of each queued phoneme (with durations)
        self.left = 0.0  # frames the current phoneme has still to sound (with durations)
        self.silent = 0  # frames of silence so far (with durations)

    def add_text(self, text: str, forced: bool = False) -> list[int]:
        added = super().add_text(text, forced)
        if self.durations is not None:
            self.lengths.extend(self.durations(added))
        return added

    def pace(self, probs) -> None:
        self.probs = [float(p) for p in probs]

    def next_tick(self) -> tuple[list[int], int]:
        waiting = len(self.queue) + (self.current != NO_PHONE)  # starts that change something
        if not waiting:
            self.credit = 0.0
            self.silent += FRAMES_PER_TICK
            return [NO_PHONE] * FRAMES_PER_TICK, NO_PHONE
        if self.durations is not None:
            return self._timed_tick()
        self.credit += sum(self.probs)
        take = min(int(self.credit + 0.5), waiting, FRAMES_PER_TICK)
        self.credit -= take
        if take == 0 and self.queue:
            self.held += 1
            take = int(self.held > self.max_hold)
        at = set(sorted(range(FRAMES_PER_TICK), key=lambda j: -self.probs[j])[:take])
        labels = []
        for j in range(FRAMES_PER_TICK):
            if j in at:
                self.held = 0
                self.current = self.queue.popleft() if self.queue else NO_PHONE
                self.forced = max(0, self.forced - (self.current != NO_PHONE))
            labels.append(self.current + FRAME_START * (j in at))
        return labels, self.queue[0] if self.queue else NO_PHONE

    def _timed_tick(self) -> tuple[list[int], int]:
        labels = []
        for _ in range(FRAMES_PER_TICK):
            start = False
            while self.queue and (self.left < 0.5 if self.current != NO_PHONE else self.silent >= LEAD_FRAMES):
                if self.current == NO_PHONE:  # from silence: the phoneme begins now
                    self.left = 0.0
                self.current = self.queue.popleft()
                self.forced = max(0, self.forced - 1)
                self.left += self.lengths.popleft()
                start = True
            if not start and self.current != NO_PHONE and self.left < 0.5:  # the last one ends
                self.current, self.left, start = NO_PHONE, 0.0, True
            labels.append(self.current + FRAME_START * start)
            self.left -= 1.0
            self.silent = self.silent + 1 if self.current == NO_PHONE else 0
        return labels, self.queue[0] if self.queue else NO_PHONE


UNHEARD = "ˈˌ"  # stress marks: the listen head's phoneme targets leave them out


@lru_cache(maxsize=131072)
def word_ctc_phonemes(word: str) -> tuple[int, ...]:
    """A word's phonemes as the listen head's phoneme CTC spells it (`ctc_phonemes`): espeak-ng's
    for the word alone, without stress marks. Alone, not in context, so that the same word is the
    same sequence in every sentence and in the lexicon the transcriber decodes with
    (`michi.model.lexicon`): the head learns the reduced forms of function words ("to" spoken tə is
    spelled tuː) from their many examples."""
    unheard = {phoneme_id(s) for s in UNHEARD}
    return tuple(p for p in word_phonemes(word) if p not in unheard)


def ctc_phonemes(text: str) -> list[int]:
    """The listen head's phoneme CTC targets for a (normalised) text: its words' phonemes in
    order (`word_ctc_phonemes`), no word boundary."""
    return [p for w in _WORD.findall(text) for p in word_ctc_phonemes(w)]
