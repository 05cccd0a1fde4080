"""The `voicing` stage of a mel-PCA model with the voiced decoder (`michi.model.voiced`): its
voicing net learns each 10 ms frame's f0 and voicing from the log-mel frames the latent
reconstructs.

Targets come from the clean audio (`michi.eval.voicing.voicing`: autocorrelation periodicity and
its peak's f0, aligned with the codec's frames); the net's input is the latent of the same crop
after a random channel: half the crops pass through a telephone channel (8 kHz band limit, G.711
mu-law), and every crop gets a random level (-20..+6 dB), so the decoder keeps its voice on callers
as on the training voices. Some crops are pitch-shifted first (`PITCH_SHIFTS`, targets and all),
so it learns f0 over a wider range than the training voices span. Loss: binary cross-entropy on
voicing, plus on the voiced frames the L1 distance of log f0 (a regressed f0) or the cross-entropy
of its bins (a classified one, `VoicingNetConfig.f0_bins`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..audio.augment import PITCH_SHIFTS, speed, telephone
from ..config import FRAME_SAMPLES
from ..eval.voicing import voicing
from ..model.michi import MichiModel
from ..model.voiced import VoicedMelPCADecoder, VoicingNet
from .batches import AudioBank
from .stages import OptimConfig, _adamw, _apply


@dataclass
class VoicingConfig:
    batch_size: int = 16
    ticks: int = 32  # crop length: 2.56 s
    telephone: float = 0.5  # share of crops through the telephone channel
    pitch_shift: float = 0.6  # share of crops pitch-shifted (resampled) by one of PITCH_SHIFTS
    level_db: tuple[float, float] = (-20.0, 6.0)
    f0_weight: float = 2.0
    eval_every: int = 250  # steps between the held-out figures (`voicing_errors`)


def f0_class_loss(logits: torch.Tensor, f0: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Per frame cross-entropy of f0 bin logits [B, bins, F] against target f0 [B, F] (Hz), the
    target a Gaussian over the bins one bin wide (CREPE's blurred one-hot)."""
    step = float(centers[1] - centers[0])
    q = torch.exp(-0.5 * ((centers[None, :, None] - f0.log()[:, None]) / step) ** 2)
    q = q / q.sum(1, keepdim=True).clamp(min=1e-12)
    return -(q * torch.log_softmax(logits, 1)).sum(1)


@dataclass
class HeldOutClip:
    """A held-out clip as the voicing net reads it, and its targets: both fixed for the stage (the
    listen encoder and the basis do not train there), so they are computed once."""

    log_mel: torch.Tensor  # [1, F, 80]: what the decoder reconstructs from the clip's latents
    target: dict[str, np.ndarray]  # `michi.eval.voicing.voicing` of the clean clip


@torch.no_grad()
def heldout_clips(model: MichiModel, clips: list[np.ndarray]) -> list[HeldOutClip]:
    """Clean clips (float32, 24 kHz) -> what `voicing_errors` compares."""
    return [HeldOutClip(model.vocoder.log_mel(model.listen(torch.from_numpy(pcm)[None]).latents), voicing(pcm))
            for pcm in clips]


@torch.no_grad()
def voicing_errors(net: VoicingNet, clips: list[HeldOutClip]) -> dict[str, float]:
    """The voicing net on whole clean clips against their targets, over each clip's loud frames:
    voicing accuracy, and f0 agreement (within 5 %, as `michi.eval.voicing`) on the frames both
    call voiced. Seconds on 20 clips, no resynthesis or judge: the stage's held-out curve."""
    was = net.training
    net.eval()
    loud = agree = both = close = 0
    for clip in clips:
        target, out = clip.target, net(clip.log_mel)
        n = min(len(target["loud"]), out.f0.shape[1])
        mask, voiced = target["loud"][:n], target["voiced"][:n]
        said = (out.voiced_logit[0, :n] > 0).numpy()
        f0_close = np.abs(out.f0[0, :n].numpy() / target["f0"][:n] - 1) < 0.05
        loud, agree = loud + int(mask.sum()), agree + int((said == voiced)[mask].sum())
        both, close = both + int((said & voiced).sum()), close + int((said & voiced & f0_close).sum())
    net.train(was)
    return {"voicing_accuracy": agree / max(loud, 1), "f0_agreement": close / max(both, 1)}


class VoicingStage:
    name = "voicing"

    def __init__(self, model: MichiModel, bank: AudioBank, vc: VoicingConfig, oc: OptimConfig, seed: int = 0,
                 heldout: list[np.ndarray] | None = None):
        """`heldout`: clips (float32, 24 kHz) whose `voicing_errors` are logged every `eval_every`
        steps; none are trained on."""
        if not isinstance(model.vocoder, VoicedMelPCADecoder):
            raise ValueError("the voicing stage trains a voiced mel-PCA decoder (config decoder: voiced)")
        self.model, self.bank, self.vc, self.oc = model, bank, vc, oc
        self.heldout = heldout_clips(model, heldout) if heldout else None
        self.net = model.vocoder.voicing
        self.modules = {"voicing": self.net}
        self.optimizers = {"voicing": _adamw(self.net.parameters(), oc)}
        self.rng = torch.Generator().manual_seed(seed)
        self.progress = 0.0
        self._set_input_stats()

    @torch.no_grad()
    def _set_input_stats(self) -> None:
        """The net's input normalisation: mean and std per mel bin of the basis's reconstruction of
        a few batches (set once; a resumed stage loads the saved ones)."""
        if bool((self.net.in_std != 1).any() or (self.net.in_mean != 0).any()):
            return
        flat = torch.cat([self._inputs(self.bank.crops(self.vc.batch_size, self.vc.ticks * FRAME_SAMPLES, self.rng))
                          for _ in range(4)], dim=1).flatten(0, 1)
        self.net.in_mean.copy_(flat.mean(0))
        self.net.in_std.copy_(flat.std(0).clamp(min=1e-3))

    @torch.no_grad()
    def _inputs(self, audio: torch.Tensor) -> torch.Tensor:
        """Crops [B, T] -> the log-mel the decoder reconstructs from their latents [B, F, 80]."""
        return self.model.vocoder.log_mel(self.model.listen(audio).latents)

    def _channel(self, audio: torch.Tensor) -> torch.Tensor:
        out = audio.numpy().copy()
        lo, hi = self.vc.level_db
        for row in range(len(out)):
            if float(torch.rand((), generator=self.rng)) < self.vc.telephone:
                out[row] = telephone(out[row])
            gain = 10 ** ((lo + (hi - lo) * float(torch.rand((), generator=self.rng))) / 20)
            out[row] = np.clip(out[row] * gain, -1.0, 1.0)
        return torch.from_numpy(out)

    def _crops(self) -> torch.Tensor:
        """[B, ticks * FRAME_SAMPLES] crops, some pitch-shifted (read longer or shorter, then resampled)."""
        samples = self.vc.ticks * FRAME_SAMPLES
        rows = []
        for _ in range(self.vc.batch_size):
            if float(torch.rand((), generator=self.rng)) < self.vc.pitch_shift:
                up, down = PITCH_SHIFTS[int(torch.randint(len(PITCH_SHIFTS), (), generator=self.rng))]
                crop = self.bank.crops(1, -(-samples * down // up), self.rng)[0].numpy()
                rows.append(speed(crop, up, down)[:samples])
            else:
                rows.append(self.bank.crops(1, samples, self.rng)[0].numpy())
        return torch.from_numpy(np.stack(rows))

    def step(self, step: int) -> dict[str, float]:
        audio = self._crops()
        targets = [voicing(a) for a in audio.numpy()]
        frames = self.vc.ticks * 8
        voiced = torch.from_numpy(np.stack([t["voiced"][:frames] for t in targets])).float()
        f0 = torch.from_numpy(np.stack([t["f0"][:frames] for t in targets])).float()
        out = self.net(self._inputs(self._channel(audio)))
        bce = F.binary_cross_entropy_with_logits(out.voiced_logit, voiced)
        frames_voiced = voiced.sum().clamp(min=1.0)
        f0_l1 = ((out.f0.log() - f0.log()).abs() * voiced).sum() / frames_voiced
        if out.f0_logits is None:
            loss = bce + self.vc.f0_weight * f0_l1
        else:
            loss = bce + (f0_class_loss(out.f0_logits, f0, self.net.centers) * voiced).sum() / frames_voiced
        _apply(self.optimizers["voicing"], loss, step, self.progress, self.oc)
        accuracy = ((out.voiced_logit > 0).float() == voiced).float().mean()
        figures = {"loss": loss.item(), "voicing_bce": bce.item(), "log_f0_l1": f0_l1.item(),
                   "voicing_accuracy": accuracy.item()}
        if self.heldout and (step + 1) % self.vc.eval_every == 0:
            figures.update({f"heldout_{k}": v for k, v in voicing_errors(self.net, self.heldout).items()})
        return figures
