"""HiFi-GAN discriminators (multi-period, multi-scale) and the codec's training losses.

Each multi-discriminator maps audio [B, T] to (logits, feature_maps): one logits tensor per
sub-discriminator and, per sub-discriminator, the list of its layer activations (for feature
matching). Losses are LSGAN, as in HiFi-GAN. Training-only: nothing here streams.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from ..audio.mel import log_mel_spectrogram

LRELU_SLOPE = 0.1
Outputs = tuple[list[Tensor], list[list[Tensor]]]


def _conv_stack(convs: nn.ModuleList, post: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Leaky-ReLU conv stack, then the logit conv; returns the logits and every feature map
    (feature matching compares them)."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        features.append(x)
    x = post(x)
    features.append(x)
    return x.flatten(1), features


class PeriodDiscriminator(nn.Module):
    """Folds audio into [T / p, p] and runs 2-D convs along time only, one column per phase."""

    def __init__(self, period: int, channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)):
        super().__init__()
        self.period = period
        ins = (1,) + channels[:-1]
        strides = (3,) * (len(channels) - 1) + (1,)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(i, o, (5, 1), (s, 1), padding=(2, 0)))
            for i, o, s in zip(ins, channels, strides))
        self.post = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, audio: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, t = audio.shape
        if t % self.period:
            # Reflect needs fewer pad samples than the clip; tiny clips fall back to zeros.
            pad = self.period - t % self.period
            audio = F.pad(audio[:, None], (0, pad), mode="reflect" if pad < t else "constant")[:, 0]
        return _conv_stack(self.convs, self.post, audio.view(b, 1, -1, self.period))


class ScaleDiscriminator(nn.Module):
    """Strided grouped 1-D convs over the waveform; `width` scales HiFi-GAN's 128..1024 channels."""

    def __init__(self, width: int = 128, use_spectral_norm: bool = False):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        chans = (width, width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width)
        # (kernel, stride, groups) of HiFi-GAN's DiscriminatorS.
        specs = ((15, 1, 1), (41, 2, 4), (41, 2, 16), (41, 4, 16), (41, 4, 16), (41, 1, 16), (5, 1, 1))
        ins = (1,) + chans[:-1]
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(i, o, k, s, groups=math.gcd(g, math.gcd(i, o)), padding=k // 2))
            for i, o, (k, s, g) in zip(ins, chans, specs))
        self.post = norm(nn.Conv1d(chans[-1], 1, 3, padding=1))

    def forward(self, audio: Tensor) -> tuple[Tensor, list[Tensor]]:
        return _conv_stack(self.convs, self.post, audio[:, None])


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods: tuple[int, ...] = (2, 3, 5, 7, 11),
                 channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, audio: Tensor) -> Outputs:
        outs = [d(audio) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]


class MultiScaleDiscriminator(nn.Module):
    """Three scale discriminators on audio average-pooled by 1, 2 and 4."""

    def __init__(self, width: int = 128, scales: int = 3):
        super().__init__()
        # Spectral norm on the full-rate one, weight norm on the others, as in HiFi-GAN.
        self.discriminators = nn.ModuleList(
            ScaleDiscriminator(width, use_spectral_norm=(i == 0)) for i in range(scales))

    def forward(self, audio: Tensor) -> Outputs:
        logits, features = [], []
        x = audio
        for i, d in enumerate(self.discriminators):
            if i:
                x = F.avg_pool1d(x[:, None], 4, 2, padding=2)[:, 0]
            out, feats = d(x)
            logits.append(out)
            features.append(feats)
        return logits, features


def discriminator_loss(real_logits: list[Tensor], fake_logits: list[Tensor]) -> Tensor:
    """LSGAN: real towards 1, fake towards 0, summed over sub-discriminators."""
    loss = real_logits[0].new_zeros(())
    for real, fake in zip(real_logits, fake_logits):
        loss = loss + torch.mean((1 - real) ** 2) + torch.mean(fake ** 2)
    return loss


def generator_adversarial_loss(fake_logits: list[Tensor]) -> Tensor:
    loss = fake_logits[0].new_zeros(())
    for fake in fake_logits:
        loss = loss + torch.mean((1 - fake) ** 2)
    return loss


def feature_matching_loss(real_features: list[list[Tensor]],
                          fake_features: list[list[Tensor]]) -> Tensor:
    """L1 between the discriminators' activations on real and generated audio (real detached)."""
    loss = fake_features[0][0].new_zeros(())
    for reals, fakes in zip(real_features, fake_features):
        for real, fake in zip(reals, fakes):
            loss = loss + torch.mean(torch.abs(real.detach() - fake))
    return loss


def mel_l1_loss(real_audio: Tensor, fake_audio: Tensor, **mel_kwargs) -> Tensor:
    return F.l1_loss(log_mel_spectrogram(fake_audio, **mel_kwargs),
                     log_mel_spectrogram(real_audio, **mel_kwargs))


def codec_generator_loss(real_audio: Tensor, fake_audio: Tensor,
                         discriminators: list[nn.Module] | tuple[nn.Module, ...] = (),
                         mel_weight: float = 45.0, adversarial_weight: float = 1.0,
                         feature_weight: float = 2.0) -> dict[str, Tensor]:
    """The generator's (encoder + vocoder) loss: {"mel", "adversarial", "features", "total"}.

    Weights are HiFi-GAN's (mel L1 x45, feature matching x2). With no discriminators (e.g. a mel
    warm-up) only the mel term counts. For the discriminators' own step, use discriminator_loss
    on their outputs for real and detached fake audio.
    """
    mel = mel_l1_loss(real_audio, fake_audio)
    adversarial = mel.new_zeros(())
    features = mel.new_zeros(())
    for disc in discriminators:
        with torch.no_grad():  # real activations are targets only
            _, real_features = disc(real_audio)
        fake_logits, fake_features = disc(fake_audio)
        adversarial = adversarial + generator_adversarial_loss(fake_logits)
        features = features + feature_matching_loss(real_features, fake_features)
    total = mel_weight * mel + adversarial_weight * adversarial + feature_weight * features
    return {"mel": mel, "adversarial": adversarial, "features": features, "total": total}
