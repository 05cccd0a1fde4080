"""Log-mel spectrogram in pure torch (no librosa/torchaudio), as used by the codec's mel L1 loss.

Defaults are the usual 24 kHz vocoder ones (Vocos, BigVGAN-24k): n_fft 1024, hop 256, 100 mels.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..config import SAMPLE_RATE_HZ


def _hz_to_mel(hz: float | Tensor) -> float | Tensor:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's default, htk=False)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    if isinstance(hz, Tensor):
        log_part = min_log_mel + torch.log(hz.clamp(min=min_log_hz) / min_log_hz) / logstep
        return torch.where(hz >= min_log_hz, log_part, hz / f_sp)
    return min_log_mel + math.log(hz / min_log_hz) / logstep if hz >= min_log_hz else hz / f_sp


def _mel_to_hz(mel: Tensor) -> Tensor:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)),
                       f_sp * mel)


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None, device: torch.device | None = None) -> Tensor:
    """Triangular Slaney-normalised filters [n_mels, n_fft // 2 + 1] (librosa.filters.mel)."""
    # Built outside inference mode so that a bank first made under inference_mode can still be
    # used by a training step (inference tensors cannot be saved for backward).
    with torch.inference_mode(False):
        f_max = sample_rate / 2 if f_max is None else f_max
        fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
        mel_edges = torch.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2,
                                   dtype=torch.float64)
        hz_edges = _mel_to_hz(mel_edges)
        widths = hz_edges.diff()
        ramps = hz_edges[:, None] - fft_hz[None, :]
        lower = -ramps[:-2] / widths[:-1, None]
        upper = ramps[2:] / widths[1:, None]
        bank = torch.clamp(torch.minimum(lower, upper), min=0.0)
        # Slaney area normalisation: each filter has unit area, so wide high bands are not louder.
        bank *= (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]
        return bank.to(device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=16)
def _hann_window(win_length: int, device: torch.device | None) -> Tensor:
    with torch.inference_mode(False):
        return torch.hann_window(win_length, device=device)


def log_mel_spectrogram(audio: Tensor, sample_rate: int = SAMPLE_RATE_HZ, n_fft: int = 1024,
                        hop_length: int = 256, win_length: int = 1024, n_mels: int = 100,
                        f_min: float = 0.0, f_max: float | None = None,
                        eps: float = 1e-5) -> Tensor:
    """audio [B, T] or [T] -> log mel magnitudes [B, n_mels, T // hop_length + 1] (centred frames)."""
    squeeze = audio.dim() == 1
    x = audio[None] if squeeze else audio
    x = x.float()
    # Reflect padding needs more samples than half a window; very short clips pad with zeros.
    pad_mode = "reflect" if x.shape[-1] > n_fft // 2 else "constant"
    spec = torch.stft(x, n_fft, hop_length=hop_length, win_length=win_length,
                      window=_hann_window(win_length, x.device), center=True, pad_mode=pad_mode,
                      return_complex=True)
    # sqrt(re^2 + im^2 + tiny) rather than abs(): finite gradient where a bin is exactly zero.
    magnitude = torch.sqrt(spec.real.square() + spec.imag.square() + 1e-9)
    bank = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, x.device)
    mel = torch.matmul(bank, magnitude)
    out = torch.log(mel.clamp(min=eps))
    return out[0] if squeeze else out
