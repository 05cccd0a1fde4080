"""Audio in and out: validation, resampling to the model rate, WAV files."""
from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np

SUPPORTED_RATES_HZ = (8_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)


class AudioError(ValueError):
    """Audio the model cannot take; the message says why."""


def as_mono_float32(pcm: np.ndarray) -> np.ndarray:
    """Any numeric PCM array (float in [-1, 1] or int16) -> 1-D float32; multi-channel is averaged."""
    pcm = np.asarray(pcm)
    if pcm.dtype == np.int16:
        pcm = pcm.astype(np.float32) / 32768.0
    elif not np.issubdtype(pcm.dtype, np.floating):
        raise AudioError(f"PCM must be float or int16 samples, got dtype {pcm.dtype}")
    if pcm.ndim == 2:
        pcm = pcm.mean(axis=1)
    if pcm.ndim != 1:
        raise AudioError(f"PCM must be 1-D (mono) or 2-D (samples x channels), got shape {pcm.shape}")
    pcm = pcm.astype(np.float32, copy=False)
    if not np.all(np.isfinite(pcm)):
        raise AudioError("PCM contains NaN or infinite samples")
    return pcm


def resample(pcm: np.ndarray, rate_in_hz: int, rate_out_hz: int, *, any_rate: bool = False) -> np.ndarray:
    """Polyphase resampling of a whole clip to float32: the one whole-clip resampler (a stream
    resamples with its own state: `michi.audio.resample.StreamingResampler`).

    `rate_in_hz` must be one of `SUPPORTED_RATES_HZ` (AudioError otherwise), the rates callers may
    send; `any_rate=True` takes any integer rate (files as recorded, 11.025 kHz..., pitch shifts)."""
    if not any_rate and rate_in_hz not in SUPPORTED_RATES_HZ:
        raise AudioError(f"unsupported sample rate {rate_in_hz} Hz; supported: {SUPPORTED_RATES_HZ}")
    if rate_in_hz == rate_out_hz:
        return np.asarray(pcm, dtype=np.float32)  # the same array when it is float32 already
    from scipy.signal import resample_poly

    g = gcd(rate_in_hz, rate_out_hz)
    return resample_poly(pcm, rate_out_hz // g, rate_in_hz // g).astype(np.float32)


def read_wav(path: str | Path, rate_out_hz: int | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file (WAV, FLAC, OGG...) as mono float32, optionally resampled."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{path}: cannot read audio ({e})") from None
    pcm = as_mono_float32(data)
    if rate_out_hz is not None and rate != rate_out_hz:
        pcm, rate = resample(pcm, rate, rate_out_hz), rate_out_hz
    return pcm, rate


def write_wav(path: str | Path, pcm: np.ndarray, rate_hz: int) -> Path:
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(pcm, -1.0, 1.0), rate_hz, subtype="PCM_16")
    return path
