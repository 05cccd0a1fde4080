"""Training shards: per-utterance latents and tick-aligned agent text, with a manifest.

A shard is one safetensors file holding every utterance of a slice of the corpus end to end:
`latents` [total_ticks, D] float16 (raw listen-encoder latents, audio delay already prepended),
`tokens` [total_ticks] int32 (agent text targets per tick: text ids or PAD), `frames`
[total_ticks, 8] int16 (the phoneme of each 10 ms frame of the audio, `align.align_frames`) and
`offsets` [utterances + 1] int64; the utterances' id, speaker, text and split travel in the metadata.
`manifest.json` beside the `shards/` folder lists the shards and how they were made.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from ..model.phonemes import FRAMES_PER_TICK, NO_PHONE, PHONE_SLOTS

MANIFEST_FILE = "manifest.json"
SHARD_FORMAT = "michi-shard-v3"  # v2: phoneme slots; v3: phoneme frames


@dataclass
class Utterance:
    id: str
    speaker: str
    text: str
    latents: np.ndarray  # float32 [n, D]: what the agent's audio is at each tick (raw)
    tokens: np.ndarray  # int64 [n]: the agent's text target at each tick
    split: str = "train"
    frames: np.ndarray | None = None  # int64 [n, 8]: the phoneme of each 10 ms frame of its audio

    def __post_init__(self) -> None:
        if self.latents.ndim != 2 or self.tokens.ndim != 1 or len(self.latents) != len(self.tokens):
            raise ValueError(f"utterance {self.id}: latents {self.latents.shape} and tokens "
                             f"{self.tokens.shape} must cover the same ticks")
        if self.frames is None:
            self.frames = np.full((len(self.tokens), FRAMES_PER_TICK), NO_PHONE, dtype=np.int64)
        if self.frames.shape != (len(self.tokens), FRAMES_PER_TICK):
            raise ValueError(f"utterance {self.id}: frames {self.frames.shape}, expected "
                             f"({len(self.tokens)}, {FRAMES_PER_TICK})")

    @property
    def phones(self) -> np.ndarray:
        """int64 [n, PHONE_SLOTS]: the phonemes that begin in each tick (the slot stream)."""
        from .align import frame_slots

        return frame_slots(self.frames, PHONE_SLOTS)


def write_shard(path: str | Path, utterances: list[Utterance]) -> Path:
    """Write atomically (temp file, then rename): a crash never leaves a half shard behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not utterances:
        raise ValueError(f"{path}: a shard needs at least one utterance")
    lengths = [len(u.tokens) for u in utterances]
    tensors = {
        "latents": np.concatenate([u.latents for u in utterances]).astype(np.float16),
        "tokens": np.concatenate([u.tokens for u in utterances]).astype(np.int32),
        "frames": np.concatenate([u.frames for u in utterances]).astype(np.int16),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }
    meta = [{"id": u.id, "speaker": u.speaker, "text": u.text, "split": u.split} for u in utterances]
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": SHARD_FORMAT, "utterances": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_shard(path: str | Path) -> list[Utterance]:
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: not a Michi shard (format {metadata.get('format')!r})")
    tensors = load_file(str(path))
    offsets = tensors["offsets"]
    out = []
    for i, meta in enumerate(json.loads(metadata["utterances"])):
        a, b = int(offsets[i]), int(offsets[i + 1])
        out.append(Utterance(meta["id"], meta["speaker"], meta["text"],
                             tensors["latents"][a:b].astype(np.float32),
                             tensors["tokens"][a:b].astype(np.int64), meta.get("split", "train"),
                             tensors["frames"][a:b].astype(np.int64)))
    return out


def write_manifest(corpus_dir: str | Path, info: dict[str, Any]) -> Path:
    path = Path(corpus_dir) / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)
    return path


def load_manifest(corpus_dir: str | Path) -> dict[str, Any]:
    path = Path(corpus_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{corpus_dir}: no {MANIFEST_FILE}; run `michi data latents` first")
    return json.loads(path.read_text())


def iter_utterances(corpus_dir: str | Path, split: str | None = "train") -> Iterator[Utterance]:
    """Utterances of one split ("train", "heldout_sentence", "heldout_voice"; None = all)."""
    corpus_dir = Path(corpus_dir)
    for shard in load_manifest(corpus_dir)["shards"]:
        if split is None or shard.get("split") in (None, split):
            for u in read_shard(corpus_dir / shard["path"]):
                if split is None or u.split == split:
                    yield u


@torch.inference_mode()
def extract_latents(model, pcm24k: np.ndarray) -> np.ndarray:
    """Raw listen-encoder latents [n, D] of mono 24 kHz audio, with the model's audio delay
    prepended as silence and the end padded to a whole tick: n = ticks_for_samples(len, delay)."""
    cfg = model.cfg
    frame = cfg.frame_samples
    delay = cfg.audio_delay_ticks * frame
    total = delay + -(-len(pcm24k) // frame) * frame
    audio = np.zeros(total, dtype=np.float32)
    audio[delay:delay + len(pcm24k)] = pcm24k
    device = next(model.parameters()).device
    latents = model.listen(torch.from_numpy(audio)[None].to(device)).latents[0]
    return latents.float().cpu().numpy()


def encode_segment(model, tokenizer, vocab, segment: dict, pcm24k: np.ndarray) -> tuple[Utterance, dict]:
    """One corpus segment (its record and 24 kHz audio) -> Utterance, and the alignment stats
    (`align_words`): the one place where audio becomes latents and words become ticks."""
    from .align import align_frames, align_words, ticks_for_samples, word_phone_times

    cfg = model.cfg
    n = ticks_for_samples(len(pcm24k), cfg.audio_delay_ticks)
    latents = extract_latents(model, pcm24k)
    if latents.shape != (n, cfg.latent_dim):
        raise RuntimeError(f"encoder gave {latents.shape}, expected ({n}, {cfg.latent_dim})")
    stats: dict = {}
    words = [tuple(w) for w in segment["words"]]
    tokens = align_words(words, n, tokenizer, vocab, stats)
    times = [tuple(p) for p in segment["phones"]] if "phones" in segment else word_phone_times(words)
    frames = align_frames(times, n, cfg.audio_delay_ticks, stats)
    return Utterance(segment["id"], segment["speaker"], segment["text"], latents.astype(np.float32), tokens,
                     segment["split"], frames), stats
