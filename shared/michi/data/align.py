"""Text-to-tick alignment: word timestamps -> the agent text stream, one token per 80 ms tick.

Each word's tokens start at the tick where the word starts (a space before every word but the
first) and take one tick each; ticks without text carry PAD. Latents are extracted with the
model's audio delay prepended as silence (see `shards.extract_latents`), so on the training time
axis the text of a word leads its audio by `audio_delay_ticks`: the words are chosen before they
are spoken, as at inference. A word whose start tick is still taken by the previous word's tokens
starts late (text that runs faster than one token per tick lags its audio).

Phonemes sit on the audio, not ahead of it: one label per 10 ms frame of the latent
(`align_frames`), from the voice's own phoneme timings where it has them (piper) or from word
times (`word_phone_times`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..config import FRAME_RATE_HZ, FRAME_SAMPLES, TICK_S
from ..model.phonemes import FRAME_START, FRAMES_PER_TICK, NO_PHONE, word_phonemes
from ..model.tokenizer import StreamVocab, Tokenizer


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
    for word, start_s, _end_s in words:
        word = word.strip()
        if not word:
            continue
        ids = tokenizer.encode(word if placed == 0 else " " + word)
        wanted = max(0, int(start_s / TICK_S))
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


def word_phone_times(words: Sequence[tuple[str, float, float]]) -> list[tuple[int, float]]:
    """Phoneme timings from word times alone (voices that cannot tell their own): each word's
    phonemes spread evenly over its span, silence from its end to the next word's start."""
    out: list[tuple[int, float]] = []
    for i, (word, start_s, end_s) in enumerate(words):
        ids = word_phonemes(word)
        if not ids:
            continue
        out += [(pid, start_s + k * (end_s - start_s) / len(ids)) for k, pid in enumerate(ids)]
        following = words[i + 1][1] if i + 1 < len(words) else math.inf
        if following > end_s:
            out.append((NO_PHONE, end_s))
    return out


def align_frames(phone_times: Sequence[tuple[int, float]], n_ticks: int, delay_ticks: int,
                 stats: dict | None = None) -> np.ndarray:
    """(phoneme id, start s) in time order -> int64 [n_ticks, FRAMES_PER_TICK]: the phoneme
    sounding in each 10 ms frame of the latent (`model.phonemes`, "frames"), START added where one
    begins.

    A frame is labelled at the centre of its analysis window (`model.melpca`: frame f of the
    delayed stream spans samples [240 f - 720, 240 f + 240)), on the latents' time axis, the audio
    delay included. Silence is NO_PHONE; a silence after silence or before the first phoneme does
    not count as a start (at inference nothing is taken then). `stats`, if given, receives
    `phonemes` (placed) and `phonemes_dropped` (too short for a frame of their own, or past the
    end)."""
    hop = FRAME_SAMPLES // FRAMES_PER_TICK
    frames = np.arange(n_ticks * FRAMES_PER_TICK)
    centre_s = ((frames - 1) * hop - delay_ticks * FRAME_SAMPLES) / (FRAME_SAMPLES * FRAME_RATE_HZ)
    ids = np.array([p for p, _ in phone_times] or [NO_PHONE], np.int64)
    starts = np.array([t for _, t in phone_times] or [math.inf])
    entry = np.searchsorted(starts, centre_s, side="right") - 1  # -1: before the first
    label = np.where(entry >= 0, ids[np.maximum(entry, 0)], NO_PHONE)
    previous = np.concatenate([[-1], entry[:-1]])
    begins = (entry != previous) & (entry >= 0)
    begins &= ~((label == NO_PHONE) & (np.concatenate([[NO_PHONE], label[:-1]]) == NO_PHONE))
    if stats is not None:
        placed = int((begins & (label != NO_PHONE)).sum())
        stats.update(phonemes=placed, phonemes_dropped=int((ids != NO_PHONE).sum()) - placed)
    return (label + FRAME_START * begins).reshape(n_ticks, FRAMES_PER_TICK)


def frame_slots(frames: np.ndarray, slots: int) -> np.ndarray:
    """[n, FRAMES_PER_TICK] frame labels -> [n, slots]: the phonemes that begin in each tick, in
    order (NO_PHONE in empty slots; past `slots`, the rest of a tick's are left out)."""
    out = np.full((len(frames), slots), NO_PHONE, np.int64)
    for tick, j in zip(*np.nonzero(frames > FRAME_START)):
        free = np.flatnonzero(out[tick] == NO_PHONE)
        if len(free):
            out[tick, free[0]] = frames[tick, j] - FRAME_START
    return out
