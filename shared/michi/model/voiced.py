"""The voiced mel-PCA decoder: the analytic decoder's magnitudes, given a voice by a source-filter
excitation (the config's `decoder: "voiced"`).

The analytic decoder (`melpca.MelPCADecoder`) gives every frame a random phase, so its speech is
whispered, and Whisper hears a K = 64 latent's blurred magnitudes badly that way: 25 % WER on the
Asterisk prompts against 4.4 % for the originals. With the same magnitudes and a pitched
excitation at the original's f0 it heard 7.0 % (the model card's probe). So:

1. `VoicingNet`, a small causal convolution stack over the log-mel frames the latent
   reconstructs (`VoicingNetConfig`), predicts each 10 ms frame's f0 (60..400 Hz) and whether it
   is voiced. It is the decoder's only trained part (the recipe's `voicing` stage,
   `michi.train.voicing`).
2. A harmonic excitation at that f0: the sum of cos(h phi) over the harmonics below
   HARMONIC_MAX_HZ, phi a phase accumulator carried from tick to tick (each frame's f0 holds over
   the 240 samples it adds). It is analysed with the decoder's own window and frame grid, and each
   frame's spectrum is normalised to unit mean power per bin below HARMONIC_MAX_HZ.
3. Each frame's spectrum is the analytic magnitude as a minimum-phase filter (`minimum_phase`, a
   vocal tract's phase: with a zero-phase envelope, the pulse left the held-out voice's judge WER
   5.5 points above its original's; with this one, 0.6 points; the model card) times, in the
   voiced band (below VOICED_BAND_HZ, fading out above it) and in proportion to the voicing
   probability, the excitation's spectrum (coherent from frame to frame: the window-sum gain
   1 / 1.5), and elsewhere a random phase (incoherent: the analytic decoder's gain). Overlap-add
   as there.

Causal with the analytic decoder's delay (720 samples): frame f's excitation and voicing depend on
frames <= f. Streaming: `step` carries the phase, the excitation's last 720 samples, the voicing
net's conv buffers and the random-phase frame counter; chunked output equals `forward`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VoicingNetConfig
from .conv import StreamingConv1d
from .melpca import (
    BINS,
    HOP,
    LOG_FLOOR,
    N_FFT,
    N_MELS,
    PAD,
    SAMPLE_RATE,
    TICK,
    WINDOW,
    MelPCADecoder,
    MelPCADecoderState,
)
from .streaming import StateDict, StreamingModule

F0_MIN_HZ, F0_MAX_HZ = 60.0, 400.0
HARMONIC_MAX_HZ = 6_000.0
HARMONIC_ROLLOFF_HZ = 300.0  # a harmonic fades in over this much below HARMONIC_MAX_HZ
VOICED_BAND_HZ = (4_000.0, 6_000.0)  # the excitation's share fades from 1 to 0 between these
HARMONICS = math.ceil(HARMONIC_MAX_HZ / F0_MIN_HZ)
HARMONIC_BINS = int(HARMONIC_MAX_HZ * N_FFT / SAMPLE_RATE)  # the bins below HARMONIC_MAX_HZ
COHERENT_GAIN = 1 / 1.5  # 1 / sum_f w(n - 240 f)^2 for the periodic Hann at a quarter-window hop
MAX_TICKS_PER_PASS = 16  # `forward` runs the excitation in passes of at most this many ticks
F0_PEAK_BINS = 2  # a classified f0 is read from the most likely bin and this many on each side


def minimum_phase(magnitude: Tensor, quefrencies: int | None = None) -> Tensor:
    """The phase [..., 513] of the minimum-phase filter whose magnitude is `magnitude` [..., 513]:
    the real cepstrum of its log, folded onto the positive quefrencies (as source-filter vocoders
    such as WORLD give the vocal tract its phase). `quefrencies`: keep only the first ones (the
    envelope's smooth part), for comparison (`michi.eval.phase_probe`).

    Its response is longer than a zero-phase one where the mel pseudo-inverse leaves deep nulls, and
    the frame's window cuts what runs past it: voiced speech comes out 1.5 dB quieter (0.6 to 2.2
    dB over 16 held-out clips). The minimum phase of the envelope's first 4 ms of quefrency only
    (its formants) keeps the level (-0.5 dB) but gives back half the held-out voice's gain: 20.3 %
    against 18.3 % judge WER (the model card's phase table, `michi.eval.phase_probe`)."""
    cepstrum = torch.fft.irfft(torch.log(magnitude.clamp(min=LOG_FLOOR)), n=N_FFT)
    half = N_FFT // 2
    folded = [cepstrum[..., :1], 2 * cepstrum[..., 1:half if quefrencies is None else quefrencies]]
    if quefrencies is None:
        folded.append(cepstrum[..., half:half + 1])  # the Nyquist quefrency, once
    return torch.fft.rfft(torch.cat(folded, dim=-1), n=N_FFT).imag  # zeros after, by the padding


def band_fade(lo_hz: float, hi_hz: float) -> Tensor:
    """A weight per frequency bin [513]: 1 below lo_hz, 0 above hi_hz, linear between."""
    freqs = torch.arange(BINS, device="cpu") * (SAMPLE_RATE / N_FFT)
    return ((hi_hz - freqs) / (hi_hz - lo_hz)).clamp(0.0, 1.0)


@dataclass
class VoicingOutput:
    f0: Tensor  # [B, F] Hz
    voiced_logit: Tensor  # [B, F]
    f0_logits: Tensor | None = None  # [B, bins, F] where f0 is classified (`f0_bins`)


def f0_bin_centers(bins: int) -> Tensor:
    """log f0 at the centres of `bins` equal steps of log f0 over F0_MIN_HZ..F0_MAX_HZ."""
    lo, hi = math.log(F0_MIN_HZ), math.log(F0_MAX_HZ)
    return lo + (torch.arange(bins, dtype=torch.float32) + 0.5) * ((hi - lo) / max(bins, 1))


class VoicingNet(StreamingModule, nn.Module):
    """Log-mel frames [B, F, 80] -> per frame f0 and a voicing logit: causal convolutions of kernel
    3, one per dilation of `VoicingNetConfig` (each frame reads 2 x sum(dilations) frames before
    it), residual after the first where the config says so; streaming like `michi.model.conv`."""

    def __init__(self, cfg: VoicingNetConfig | None = None):
        super().__init__()
        cfg = cfg or VoicingNetConfig()
        self.residual, self.f0_bins = cfg.residual, cfg.f0_bins
        self.register_buffer("centers", f0_bin_centers(cfg.f0_bins), persistent=False)
        self.register_buffer("in_mean", torch.zeros(N_MELS))  # set by the training stage
        self.register_buffer("in_std", torch.ones(N_MELS))
        self.convs = nn.ModuleList([StreamingConv1d(N_MELS if i == 0 else cfg.width, cfg.width, 3, dilation=d)
                                    for i, d in enumerate(cfg.dilations)])
        self.out = nn.Conv1d(cfg.width, 1 + max(cfg.f0_bins, 1), 1)

    def _head(self, h: Tensor) -> VoicingOutput:
        y = self.out(h)  # [B, 2, F]: f0, voicing; or [B, 1 + bins, F]: voicing, f0 bins
        if self.f0_bins:
            logits = y[:, 1:]
            bins = torch.arange(self.f0_bins, device=y.device)[None, :, None]
            near = (bins - logits.argmax(1, keepdim=True)).abs() <= F0_PEAK_BINS
            weight = torch.where(near, torch.softmax(logits, 1), torch.zeros_like(logits))
            log_f0 = (weight * self.centers[:, None]).sum(1) / weight.sum(1).clamp(min=1e-12)
            return VoicingOutput(torch.exp(log_f0), y[:, 0], logits)
        lo, hi = math.log(F0_MIN_HZ), math.log(F0_MAX_HZ)
        return VoicingOutput(torch.exp(lo + torch.sigmoid(y[:, 0]) * (hi - lo)), y[:, 1])

    def _input(self, log_mel: Tensor) -> Tensor:
        return ((log_mel.float() - self.in_mean) / self.in_std).transpose(1, 2)

    def _layer(self, i: int, h: Tensor, y: Tensor) -> Tensor:
        """Layer i's output from its input h and its conv's output y."""
        return h + F.gelu(y) if self.residual and i else F.gelu(y)

    def forward(self, log_mel: Tensor) -> VoicingOutput:
        h = self._input(log_mel)
        for i, conv in enumerate(self.convs):
            h = self._layer(i, h, conv(h))
        return self._head(h)

    def init_state(self, batch_size: int, device: Any = None, dtype: torch.dtype = torch.float32) -> StateDict:
        return StateDict((f"convs.{i}", conv.init_state(batch_size, device, torch.float32))
                         for i, conv in enumerate(self.convs))

    def _step(self, log_mel: Tensor, state: StateDict) -> tuple[VoicingOutput, StateDict]:
        h = self._input(log_mel)
        for i, conv in enumerate(self.convs):
            y, state[f"convs.{i}"] = conv._step(h, state[f"convs.{i}"])
            h = self._layer(i, h, y)
        return self._head(h), state


@dataclass
class VoicedDecoderState(MelPCADecoderState):
    phase: Tensor  # [B, 1] the excitation's phase accumulator, radians in [0, 2 pi)
    excitation: Tensor  # [B, 720] the excitation's last samples (the start of the next frames)
    voicing: StateDict  # the voicing net's conv buffers, by name
    # `reset` (the protocol's default) zeroes every tensor above and recurses into `voicing`.


class VoicedMelPCADecoder(MelPCADecoder):
    """`MelPCADecoder` with a voice (module doc). Same interface, delay and basis buffers."""

    def __init__(self, k: int, seed: int = 0, voicing: VoicingNetConfig | None = None):
        super().__init__(k, seed)
        self.voicing = VoicingNet(voicing)
        # The envelope's phase from its magnitude; an instance may set another to compare decoders
        # (`michi.eval.phase_probe`, `loadtest.decoder_step_ab`).
        self.envelope_phase: Callable[[Tensor], Tensor] = minimum_phase
        self.register_buffer("band", band_fade(*VOICED_BAND_HZ), persistent=False)
        self.register_buffer("harmonics", torch.arange(1, HARMONICS + 1, dtype=torch.float32, device="cpu"), persistent=False)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> VoicedDecoderState:
        base = super().init_state(batch_size, device, dtype)
        return VoicedDecoderState(base.tail, base.frame, torch.zeros(batch_size, 1, device=device),
                                  torch.zeros(batch_size, PAD, device=device),
                                  self.voicing.init_state(batch_size, device))

    def forward(self, latents: Tensor) -> Tensor:
        state = self.init_state(latents.shape[0], latents.device, latents.dtype)
        chunks = [self._step(latents[:, i:i + MAX_TICKS_PER_PASS], state)[0]
                  for i in range(0, latents.shape[1], MAX_TICKS_PER_PASS)]
        return torch.cat(chunks, dim=1) if chunks else latents.new_zeros(latents.shape[0], 0)

    def excitation(self, f0: Tensor, state: VoicedDecoderState) -> Tensor:
        """Frame f0s [B, F] -> the harmonic excitation of those frames' new samples [B, 240 F];
        advances the phase."""
        b, frames = f0.shape
        per_sample = f0[..., None].expand(b, frames, HOP).reshape(b, frames * HOP)
        # float64 within a tick; the carried phase is float32 at every tick's end, whatever the
        # chunking, so that chunked output equals whole output (the harmonics multiply its rounding)
        within = torch.cumsum(per_sample.double().reshape(b, -1, TICK) * (2 * math.pi / SAMPLE_RATE), dim=-1)
        start, ticks = state.phase.double(), []
        for t in range(within.shape[1]):
            ticks.append(torch.remainder(start + within[:, t], 2 * math.pi))
            start = ticks[-1][:, -1:].float().double()
        state.phase = start.float()
        phase = torch.cat(ticks, dim=-1)
        gain = ((HARMONIC_MAX_HZ - per_sample[..., None] * self.harmonics) / HARMONIC_ROLLOFF_HZ).clamp(0.0, 1.0)
        return (gain * torch.cos(phase.float()[..., None] * self.harmonics)).sum(-1)

    def spectra(self, latents: Tensor, state: VoicedDecoderState) -> Tensor:
        log_mel = self.log_mel(latents)  # [B, F, 80]
        magnitude = self.mel_magnitudes(log_mel)
        noise = torch.polar(torch.full_like(magnitude, self.noise_gain), self.noise_phases(state, magnitude.shape[1]))
        with torch.no_grad():  # nothing trains through the decoder: the voicing stage trains the net alone
            voicing, state.voicing = self.voicing._step(log_mel, state.voicing)
        signal = torch.cat([state.excitation, self.excitation(voicing.f0, state)], dim=-1)
        state.excitation = signal[:, -PAD:]
        pulse = torch.fft.rfft(signal.unfold(-1, WINDOW, HOP) * self.window, n=N_FFT)  # [B, F, 513]
        power = pulse[..., :HARMONIC_BINS].abs().square().mean(-1, keepdim=True)  # where the harmonics are
        pulse = pulse * (COHERENT_GAIN * torch.rsqrt(power + 1e-12))
        share = torch.sigmoid(voicing.voiced_logit)[..., None] * self.band  # [B, F, 513]
        envelope = torch.polar(magnitude, self.envelope_phase(magnitude))
        return envelope * (share.sqrt() * pulse + (1.0 - share).sqrt() * noise)

    @torch.no_grad()
    def predict_voicing(self, latents: Tensor) -> VoicingOutput:
        """What the voicing net says of each frame of whole latents [B, n, K]: f0 [B, 8 n], logits."""
        return self.voicing(self.log_mel(latents))
