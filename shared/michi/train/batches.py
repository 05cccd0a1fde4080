"""Training batches: audio crops and whole utterances (codec stage), tick sequences from shards
(speak and joint stages) and pure text (text stages). Every draw takes a torch.Generator, so each
torchrun rank draws its own batches from its own seed."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..audio.io import read_wav
from ..config import SAMPLE_RATE_HZ
from ..data.shards import Utterance, iter_utterances
from ..model.phonemes import FRAME_START, NO_PHONE


def load_segments(corpus_dir: str | Path, splits: Sequence[str] = ("train",),
                  speakers: Sequence[str] | None = None) -> list[dict]:
    """The corpus's segments of these splits (and speakers)."""
    from ..data.corpus import load_segments as all_segments

    return [s for s in all_segments(corpus_dir) if s["split"] in splits
            and (speakers is None or s["speaker"] in speakers)]


def _read_int16(path: str) -> np.ndarray:
    pcm, _ = read_wav(path, rate_out_hz=SAMPLE_RATE_HZ)
    return (np.clip(pcm, -1, 1) * 32767).astype(np.int16)


def read_audio(corpus_dir: str | Path, segments: list[dict], workers: int | None = None) -> list[np.ndarray]:
    """Decode the segments' audio (24 kHz int16) in parallel processes: hours of compressed audio
    take minutes on one core."""
    paths = [str(Path(corpus_dir) / seg["audio"]) for seg in segments]
    workers = workers or min(16, os.cpu_count() or 1)
    if workers == 1 or len(paths) < 64:
        return [_read_int16(p) for p in paths]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_read_int16, paths, chunksize=16))


class AudioBank:
    """Segment audio held in memory as int16 at 24 kHz (an hour is 173 MB)."""

    def __init__(self, corpus_dir: str | Path, segments: list[dict], workers: int | None = None):
        self.segments = segments
        self.audio = read_audio(corpus_dir, segments, workers)
        if not self.audio:
            raise ValueError(f"{corpus_dir}: no audio segments to train on")
        self.seconds = sum(len(a) for a in self.audio) / SAMPLE_RATE_HZ

    def crops(self, batch: int, samples: int, gen: torch.Generator) -> torch.Tensor:
        """[batch, samples] float32 random crops (zero-padded when a segment is shorter)."""
        out = np.zeros((batch, samples), dtype=np.float32)
        picks = torch.randint(len(self.audio), (batch,), generator=gen).tolist()
        for row, i in enumerate(picks):
            a = self.audio[i]
            start = int(torch.randint(max(1, len(a) - samples + 1), (1,), generator=gen))
            piece = a[start:start + samples]
            out[row, : len(piece)] = piece / 32768.0
        return torch.from_numpy(out)

    def utterances(self, batch: int, max_samples: int, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Whole segments (cut at max_samples): audio [B, T], lengths in samples [B], texts."""
        picks = torch.randint(len(self.audio), (batch,), generator=gen).tolist()
        pieces = [self.audio[i][:max_samples] for i in picks]
        out = np.zeros((batch, max(len(p) for p in pieces)), dtype=np.float32)
        for row, p in enumerate(pieces):
            out[row, : len(p)] = p / 32768.0
        texts = [self.segments[i]["text"] if len(self.audio[i]) <= max_samples else _words_before(
            self.segments[i], max_samples / SAMPLE_RATE_HZ) for i in picks]
        return torch.from_numpy(out), torch.tensor([len(p) for p in pieces]), texts


def _words_before(segment: dict, seconds: float) -> str:
    """The words of a cut segment that end before the cut."""
    return " ".join(w for w, _start, end in segment.get("words", []) if end <= seconds)


@dataclass
class SequenceBatch:
    tokens: torch.Tensor  # [B, n] agent text targets
    latents: torch.Tensor  # [B, n, D] raw agent latent targets
    prev_tokens: torch.Tensor  # [B, n] the agent text input of each tick (the target before it)
    prev_latents: torch.Tensor  # [B, n, D] raw
    prev_valid: torch.Tensor  # [B, n] False where there is no previous latent (first tick)
    mask: torch.Tensor  # [B, n] real ticks
    # The phonemes of each tick's audio (an input, like prev_latents; `model.phonemes`): slots
    # [B, n, slots] or frame labels [B, n, 8]
    phones: torch.Tensor
    next_phone: torch.Tensor  # [B, n] the first phoneme after the tick's (NO_PHONE: none)
    # The advance head's target: slots, how many phonemes the next tick takes [B, n]; frames,
    # which of the next tick's frames begin one [B, n, 8] (float, 0 or 1)
    phone_take: torch.Tensor


class SequenceBank:
    """Tick sequences from a corpus's shards (`michi data latents`)."""

    def __init__(self, corpus_dir: str | Path, split: str = "train", speakers: Sequence[str] | None = None,
                 pad_token: int = 0):
        self.utterances: list[Utterance] = [u for u in iter_utterances(corpus_dir, split)
                                            if speakers is None or u.speaker in speakers]
        if not self.utterances:
            raise ValueError(f"{corpus_dir}: no {split} utterances in its shards"
                             + (f" for speakers {list(speakers)}" if speakers else ""))
        self.pad = pad_token
        self.ticks = sum(len(u.tokens) for u in self.utterances)
        self.next_phones = [next_phones(u.frames) for u in self.utterances]
        self.slots = [u.phones for u in self.utterances]

    def phone_stream(self, i: int, frames: bool) -> np.ndarray:
        """Utterance i's phoneme stream (`model.phonemes`): frame labels [n, 8] or slots."""
        return self.utterances[i].frames if frames else self.slots[i]

    def latent_stats(self) -> tuple[np.ndarray, np.ndarray]:
        allv = np.concatenate([u.latents for u in self.utterances])
        return allv.mean(0), allv.std(0) + 1e-5

    def batch(self, batch: int, max_ticks: int, gen: torch.Generator, pack: bool = False,
              phone_frames: bool = False) -> SequenceBatch:
        """`batch` rows of tick windows: each a random window of one utterance (rows padded to the
        longest, `mask` marks the real ticks), or with `pack` every row filled to `max_ticks` with
        utterances one after another (the first from a random tick, the next ones whole), so no
        compute goes to padding; a packed row's later utterances have the earlier ones as context.
        The phoneme stream is the one a model with (`phone_frames`) or without frames reads."""
        rows = [self._row(max_ticks, gen, pack) for _ in range(batch)]
        n = max(sum(b - a for _, a, b in pieces) for pieces in rows)
        dim = self.utterances[0].latents.shape[1]
        width = self.phone_stream(0, phone_frames).shape[1]
        tokens = np.full((batch, n), self.pad, np.int64)
        prev_tokens = np.full((batch, n), self.pad, np.int64)
        latents = np.zeros((batch, n, dim), np.float32)
        prev_latents = np.zeros((batch, n, dim), np.float32)
        prev_valid = np.zeros((batch, n), bool)
        mask = np.zeros((batch, n), bool)
        phones = np.full((batch, n, width), NO_PHONE, np.int64)
        next_phone = np.full((batch, n), NO_PHONE, np.int64)
        phone_take = (np.zeros((batch, n, width), np.float32) if phone_frames else np.zeros((batch, n), np.int64))
        for row, pieces in enumerate(rows):
            at = 0
            for i, a, b in pieces:
                u, k = self.utterances[i], b - a
                cols = slice(at, at + k)
                tokens[row, cols] = u.tokens[a:b]
                latents[row, cols] = u.latents[a:b]
                mask[row, cols] = True
                first = 1 if a == 0 else 0  # tick 0 of an utterance has no tick before it
                prev_tokens[row, at + first:at + k] = u.tokens[a - 1 + first:b - 1]
                prev_latents[row, at + first:at + k] = u.latents[a - 1 + first:b - 1]
                prev_valid[row, at + first:at + k] = True
                stream = self.phone_stream(i, phone_frames)
                phones[row, cols] = stream[a:b]
                next_phone[row, cols] = self.next_phones[i][a:b]
                after = stream[a + 1:b + 1]  # the next ticks (after the utterance's end: nothing)
                taken = after >= FRAME_START if phone_frames else (after != NO_PHONE).sum(1)
                phone_take[row, at:at + len(taken)] = taken
                at += k
        t = torch.from_numpy
        return SequenceBatch(t(tokens), t(latents), t(prev_tokens), t(prev_latents), t(prev_valid), t(mask),
                             t(phones), t(next_phone), t(phone_take))

    def _row(self, max_ticks: int, gen: torch.Generator, pack: bool) -> list[tuple[int, int, int]]:
        """(utterance, first tick, end tick) pieces of one row."""
        i = int(torch.randint(len(self.utterances), (1,), generator=gen))
        length = len(self.utterances[i].tokens)
        start = int(torch.randint(max(1, length - max_ticks + 1), (1,), generator=gen))
        pieces = [(i, start, min(length, start + max_ticks))]
        filled = pieces[0][2] - start
        while pack and filled < max_ticks:
            i = int(torch.randint(len(self.utterances), (1,), generator=gen))
            end = min(len(self.utterances[i].tokens), max_ticks - filled)
            pieces.append((i, 0, end))
            filled += end
        return pieces


def next_phones(frames: np.ndarray) -> np.ndarray:
    """[n, 8] frame labels -> [n]: the first phoneme that begins after each tick (what the
    engine's queue shows next), NO_PHONE after the last."""
    out = np.full(len(frames), NO_PHONE, np.int64)
    upcoming = NO_PHONE
    for tick in range(len(frames) - 1, -1, -1):
        out[tick] = upcoming
        begun = frames[tick][frames[tick] > FRAME_START]
        if len(begun):
            upcoming = begun[0] - FRAME_START
    return out


class TextBank:
    """Pure text for the LM: the passages as one token stream (EOS between them) in a numpy array;
    a sample is BOS + a random window of it."""

    def __init__(self, texts: Sequence[str], tokenizer, bos: int, eos: int):
        pieces = [np.asarray(tokenizer.encode(t) + [eos], dtype=np.int32) for t in texts if t.strip()]
        if not pieces:
            raise ValueError("no text to train on")
        self.stream = np.concatenate(pieces)
        self.bos = bos
        self.tokens = len(self.stream)

    def batch(self, batch: int, max_tokens: int, gen: torch.Generator, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, 1 + max_tokens] (BOS + window) and a mask of real positions."""
        width = min(max_tokens, len(self.stream))
        starts = torch.randint(len(self.stream) - width + 1, (batch,), generator=gen).tolist()
        out = torch.full((batch, width + 1), self.bos, dtype=torch.long)
        for row, s in enumerate(starts):
            out[row, 1:] = torch.from_numpy(self.stream[s:s + width].astype(np.int64))
        return out, torch.ones_like(out, dtype=torch.bool)
