"""The `durations` stage: the duration predictor (`michi.model.durations`) learns how long the
TTS voice holds each phoneme, from the voice's own phoneme timings in the corpus (`phones` of
piper's clips: the same timings the phoneme frame labels were made from).

Loss: mean squared error of log(1 + frames) per phoneme, as FastSpeech. A held-out set (the
corpus's held-out sentences, same voice) is scored every `eval_every` steps: its mean absolute
error in frames per phoneme, and of each sentence's total length, in percent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.corpus import load_segments
from ..model.durations import DurationPredictor, phone_durations
from ..model.michi import MichiModel
from ..model.phonemes import NO_PHONE
from .stages import OptimConfig, _adamw, _apply


@dataclass
class DurationConfig:
    batch_size: int = 32  # sentences a step
    eval_every: int = 250


class DurationBank:
    """(phoneme ids, frames) of every clip of the given speakers and split that has timings."""

    def __init__(self, corpus_dir, split: str, speakers: Sequence[str] | None = None):
        self.items = [phone_durations(s["phones"]) for s in load_segments(corpus_dir, split)
                      if s.get("phones") and (speakers is None or s["speaker"] in speakers)]
        self.items = [(ids, frames) for ids, frames in self.items if len(ids)]
        if not self.items:
            raise ValueError(f"{corpus_dir}: no {split} clips with phoneme timings"
                             + (f" for speakers {list(speakers)}" if speakers else "")
                             + " (piper voices record them: michi data synth)")

    def batch(self, picks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, P] (NO_PHONE padded) and frames [B, P] of the picked clips."""
        width = max(len(self.items[i][0]) for i in picks)
        ids = np.full((len(picks), width), NO_PHONE, np.int64)
        frames = np.zeros((len(picks), width), np.float32)
        for row, i in enumerate(picks):
            a, f = self.items[i]
            ids[row, :len(a)], frames[row, :len(f)] = a, f
        return torch.from_numpy(ids), torch.from_numpy(frames)


def duration_loss(net: DurationPredictor, ids: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    real = ids != NO_PHONE
    return F.mse_loss(net(ids)[real], frames[real].log1p())


@torch.no_grad()
def duration_errors(net: DurationPredictor, bank: DurationBank) -> dict[str, float]:
    """Mean absolute error per phoneme (frames) and of each clip's total (percent)."""
    was = net.training
    net.eval()
    per_phone, per_clip = [], []
    for ids, frames in bank.items:
        pred = np.asarray(net.frames(ids.tolist()))
        per_phone.append(np.abs(pred - frames))
        per_clip.append(abs(pred.sum() - frames.sum()) / max(frames.sum(), 1.0))
    net.train(was)
    return {"phone_mae_frames": float(np.concatenate(per_phone).mean()),
            "length_error_pct": 100.0 * float(np.mean(per_clip))}


class DurationStage:
    name = "durations"

    def __init__(self, model: MichiModel, train: DurationBank, heldout: DurationBank | None,
                 dc: DurationConfig, oc: OptimConfig, seed: int = 0):
        if model.durations is None:
            raise ValueError("the durations stage trains a model's duration predictor (config durations: true)")
        self.net, self.train, self.heldout, self.dc, self.oc = model.durations, train, heldout, dc, oc
        self.modules = {"durations": self.net}
        self.optimizers = {"durations": _adamw(self.net.parameters(), oc)}
        self.rng = torch.Generator().manual_seed(seed)
        self.progress = 0.0

    def step(self, step: int) -> dict[str, float]:
        self.net.train()
        picks = torch.randint(len(self.train.items), (self.dc.batch_size,), generator=self.rng).tolist()
        loss = duration_loss(self.net, *self.train.batch(picks))
        _apply(self.optimizers["durations"], loss, step, self.progress, self.oc)
        out = {"loss": loss.item()}
        if self.heldout is not None and (step + 1) % self.dc.eval_every == 0:
            out.update({f"heldout_{k}": v for k, v in duration_errors(self.net, self.heldout).items()})
        return out
