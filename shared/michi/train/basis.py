"""The recipe's `basis` stage: fit a mel-PCA model's basis on the training corpus.

For a model whose codec is "melpca" (DESIGN.md, "The latent") the listen encoder and its analytic
decoder have nothing to train; what they need is the corpus's principal directions of stacked
log-mel (`michi.model.melpca.fit_basis`). This stage picks a bounded, deterministic sample of the
training split, spread over every voice (round robin over the speakers, each speaker's segments
in a seeded order, until `max_minutes` of audio), fits the K = latent_dim directions, and sets
them on the model (`MichiModel.set_basis`: encoder, decoder, and the whitening in latent_norm).

It writes `<run>/basis/basis.safetensors` (the basis, with all 640 eigenvalues), `basis.json`
(what was fit on, the variance kept) and `progress.json` (like a trained stage, so `stage_info`
reports it). Rerunning loads the saved basis instead of fitting again.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import SAMPLE_RATE_HZ
from ..model.melpca import MelPCABasis, fit_basis
from ..model.michi import MichiModel
from .batches import load_segments, read_audio
from .loop import PROGRESS_FILE

BASIS_FILE = "basis.safetensors"
INFO_FILE = "basis.json"


@dataclass
class BasisConfig:
    max_minutes: float = 30.0  # audio the fit reads at most, spread over the voices
    splits: tuple[str, ...] = ("train",)  # never the held-out splits


def pick_segments(segments: list[dict], max_seconds: float, seed: int = 0) -> list[dict]:
    """Round robin over the speakers (sorted by name), each one's segments in a seeded order, until
    `max_seconds` of audio (by the records' duration_s) are taken. Deterministic."""
    by_speaker: dict[str, list[dict]] = defaultdict(list)
    for seg in sorted(segments, key=lambda s: s["id"]):
        by_speaker[seg["speaker"]].append(seg)
    queues = []
    for i, speaker in enumerate(sorted(by_speaker)):
        order = torch.randperm(len(by_speaker[speaker]), generator=torch.Generator().manual_seed(seed * 7919 + i))
        queues.append([by_speaker[speaker][j] for j in order.tolist()])
    picked, total = [], 0.0
    while total < max_seconds and any(queues):
        for queue in queues:
            if queue and total < max_seconds:
                seg = queue.pop(0)
                picked.append(seg)
                total += float(seg.get("duration_s", 0.0))
    return picked


def fit_corpus_basis(corpus: str | Path, k: int, bc: BasisConfig | None = None, seed: int = 0,
                     progress: Callable[[str], None] = print) -> tuple[MelPCABasis, dict]:
    """The basis of a corpus's training audio, and what it was fit on."""
    bc = bc or BasisConfig()
    segments = load_segments(corpus, bc.splits)
    if not segments:
        raise ValueError(f"{corpus}: no segments in {bc.splits} to fit a mel-PCA basis on")
    picked = pick_segments(segments, 60 * bc.max_minutes, seed)
    progress(f"[basis] reading {len(picked)} of {len(segments)} segments "
             f"({len({s['speaker'] for s in picked})} voices)")
    audio = read_audio(corpus, picked)
    budget = int(60 * bc.max_minutes * SAMPLE_RATE_HZ)
    clips, seconds, per_speaker = [], 0.0, defaultdict(float)
    for seg, pcm in zip(picked, audio):
        pcm = pcm[:max(0, budget)]
        if not len(pcm):
            break
        budget -= len(pcm)
        clips.append(pcm)
        seconds += len(pcm) / SAMPLE_RATE_HZ
        per_speaker[seg["speaker"]] += len(pcm) / SAMPLE_RATE_HZ
    basis = fit_basis((c.astype(np.float32) / 32768.0 for c in clips), k=k)
    info = {"k": k, "segments": len(clips), "audio_s": round(seconds, 1), "ticks": basis.ticks,
            "variance_kept": round(basis.variance_kept, 5), "max_minutes": bc.max_minutes,
            "splits": list(bc.splits), "seed": seed, "corpus": str(corpus),
            "seconds_per_voice": {s: round(v, 1) for s, v in sorted(per_speaker.items())}}
    if basis.eigenvalues is not None:  # what other choices of K would keep
        cumulative = basis.eigenvalues.double().cumsum(0) / basis.total_variance
        info["variance_kept_at"] = {str(n): round(float(cumulative[n - 1]), 5)
                                    for n in (16, 32, 64, 128) if n <= len(cumulative)}
    return basis, info


def run_basis_stage(model: MichiModel, corpus: str | Path, out_dir: str | Path, bc: BasisConfig | None = None,
                    seed: int = 0, progress: Callable[[str], None] = print, main: bool = True) -> MelPCABasis:
    """Fit (or, when `out_dir` has one, load) the basis and set it on `model`; only `main` writes."""
    out = Path(out_dir)
    if (out / BASIS_FILE).is_file():
        basis = MelPCABasis.load(out / BASIS_FILE)
        if basis.k != model.cfg.latent_dim:
            raise ValueError(f"{out / BASIS_FILE} has K = {basis.k}, the model latent_dim {model.cfg.latent_dim}")
        progress(f"[basis] already fitted ({out}); loading it")
        model.set_basis(basis)
        return basis
    start = time.perf_counter()
    basis, info = fit_corpus_basis(corpus, model.cfg.latent_dim, bc, seed, progress)
    wall = time.perf_counter() - start
    model.set_basis(basis)
    progress(f"[basis] K = {basis.k} on {info['audio_s'] / 60:.1f} min ({basis.ticks} ticks, "
             f"{len(info['seconds_per_voice'])} voices): {100 * basis.variance_kept:.2f} % of the variance "
             f"kept ({wall:.1f} s)")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        basis.save(out / (BASIS_FILE + ".tmp"))  # then renamed: a saved basis is a whole one
        os.replace(out / (BASIS_FILE + ".tmp"), out / BASIS_FILE)
        (out / INFO_FILE).write_text(json.dumps({**info, "wall_s": round(wall, 1)}, indent=2))
        (out / PROGRESS_FILE).write_text(json.dumps({"step": 1, "wall_s": round(wall, 1), "done": True}))
    return basis
