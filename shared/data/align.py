"""Text-to-tick alignment: word timestamps -> the agent text stream, one token per 80 ms tick.

Each word's tokens start at the tick where the word starts (a space before every word but the
first) and take one tick each; ticks without text carry PAD. Latents are extracted with the
model's audio delay prepended as silence (see `shards.extract_latents`), so on the training time
axis the text of a word leads its audio by `audio_delay_ticks`: the words are chosen before they
are spoken, as at inference. A word whose start tick is still taken by the previous word's tokens
starts late (text that runs faster than one token per tick lags its audio).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..config import FRAME_RATE_HZ, FRAME_SAMPLES
from ..model.tokenizer import StreamVocab, Tokenizer

FRAME_S = 1.0 / FRAME_RATE_HZ


def ticks_for_samples(num_samples_24k: int, delay_ticks: int) -> int:
    """Ticks of an utterance of this many 24 kHz samples, audio delay included."""
    return math.ceil(num_samples_24k / FRAME_SAMPLES) + delay_ticks


def align_words(words: Sequence[tuple[str, float, float]], n_ticks: int, tokenizer: Tokenizer,
                vocab: StreamVocab, stats: dict | None = None) -> np.ndarray:
    """words (word, start_s, end_s) in time order -> int64 [n_ticks] agent text targets.

    `stats`, if given, receives `tokens`, `late_ticks` (sum over words of how many ticks each
    started after its audio did) and `dropped` (tokens past the end of the utterance)."""
    tokens = np.full(n_ticks, vocab.pad, dtype=np.int64)
    cursor = late = dropped = placed = 0
    for index, (word, start_s, _end_s) in enumerate(words):
        word = word.strip()
        if not word:
            continue
        ids = tokenizer.encode(word if placed == 0 else " " + word)
        wanted = max(0, int(start_s / FRAME_S))
        tick = max(wanted, cursor)
        late += tick - wanted
        for token in ids:
            if tick >= n_ticks:
                dropped += 1
                continue
            tokens[tick] = token
            tick += 1
        cursor, placed = tick, placed + 1
    if stats is not None:
        stats.update(tokens=int(sum(1 for t in tokens if vocab.is_text(int(t)))), late_ticks=late,
                     dropped=dropped)
    return tokens


def align_phonemes(words: Sequence[tuple[str, float, float]], n_ticks: int, delay_ticks: int,
                   slots: int, stats: dict | None = None) -> np.ndarray:
    """words (word, start_s, end_s) in time order -> int64 [n_ticks, slots] phoneme ids per tick
    (`model.phonemes`; NO_PHONE in empty slots).

    Unlike the text, phonemes sit on the audio: each word's phonemes are spread evenly over the
    ticks its audio spans (delay included, as the latents are), so a tick's phonemes are the
    sounds of that tick's latent. A tick takes at most `slots`; the rest move to the next ticks,
    and a word never starts before the previous word's phonemes are placed. `stats`, if given,
    receives `phonemes` (placed) and `phonemes_dropped` (past the end)."""
    from ..model.phonemes import NO_PHONE, word_phonemes

    out = np.full((n_ticks, slots), NO_PHONE, dtype=np.int64)
    fill = np.zeros(n_ticks, dtype=np.int64)
    cursor = placed = dropped = 0
    for word, start_s, end_s in words:
        ids = word_phonemes(word)
        if not ids:
            continue
        first = int(start_s / FRAME_S) + delay_ticks
        span = max(1, round(end_s / FRAME_S) + delay_ticks - first)
        for i, pid in enumerate(ids):
            tick = max(cursor, first + (i * span) // len(ids))
            while tick < n_ticks and fill[tick] >= slots:
                tick += 1
            if tick >= n_ticks:
                dropped += 1
                continue
            out[tick, fill[tick]] = pid
            fill[tick] += 1
            cursor, placed = tick, placed + 1
    if stats is not None:
        stats.update(phonemes=placed, phonemes_dropped=dropped)
    return out
