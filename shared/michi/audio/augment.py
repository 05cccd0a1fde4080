"""Channel augmentations that bring synthetic speech towards real calls: 24 kHz float32 clips in,
clips out, every random draw from the caller's `numpy.random.Generator`.

Used by the training stages that must hold up on callers (voicing, hearing): speed (resampling:
tempo and pitch together, as Kaldi's speed perturbation), a telephone channel (8 kHz band limit,
G.711 mu-law), additive noise (white, pink, or another voice at low level), a simple synthetic
reverberation, and level changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import SAMPLE_RATE_HZ
from . import pcm as pcm_codec
from .io import resample

# (up, down): a clip resampled by up/down plays down/up times faster and higher (pitch, formants
# and tempo alike): from a low male voice's 0.67x to a child's 1.5x of each training voice.
PITCH_SHIFTS = ((3, 2), (4, 3), (5, 4), (4, 5), (3, 4), (2, 3))
# Speed perturbation for recognition: 0.9x .. 1.1x.
SPEEDS = ((10, 9), (20, 19), (19, 20), (9, 10))


def telephone(pcm: np.ndarray) -> np.ndarray:
    """24 kHz audio through an 8 kHz G.711 mu-law channel (the gateway's own codec tables), back at
    24 kHz, same length."""
    narrow = pcm_codec.decode(pcm_codec.encode(resample(pcm, SAMPLE_RATE_HZ, 8_000), "MULAW"), "MULAW")
    return resample(narrow, 8_000, SAMPLE_RATE_HZ)[:len(pcm)].astype(np.float32)


def speed(pcm: np.ndarray, up: int, down: int) -> np.ndarray:
    """The clip played down/up times faster (and higher): resampled by up/down."""
    return resample(pcm, down, up, any_rate=True)


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)) + 1e-12))


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS 1/f noise (white noise shaped in the frequency domain)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1.0))
    noise = np.fft.irfft(spectrum, n)
    return (noise / rms(noise)).astype(np.float32)


def add_noise(pcm: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`noise` (tiled or cut to the clip's length) mixed in at `snr_db` below the clip's level."""
    if len(noise) < len(pcm):
        noise = np.tile(noise, -(-len(pcm) // max(len(noise), 1)))
    noise = noise[:len(pcm)]
    scale = rms(pcm) / rms(noise) * 10 ** (-snr_db / 20)
    return (pcm + scale * noise).astype(np.float32)


def room_impulse(rt60_s: float, rng: np.random.Generator, rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """A synthetic room: the direct path, then exponentially decaying noise (-60 dB at rt60_s)."""
    n = max(1, int(rt60_s * rate_hz))
    t = np.arange(n) / rate_hz
    tail = rng.standard_normal(n) * 10 ** (-3 * t / rt60_s) * 0.3
    tail[: int(0.002 * rate_hz)] = 0.0  # the first reflections arrive after 2 ms
    tail[0] = 1.0
    return tail.astype(np.float32)


def reverb(pcm: np.ndarray, rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """The clip in a synthetic room, same length and level."""
    from scipy.signal import fftconvolve

    wet = fftconvolve(pcm, room_impulse(rt60_s, rng))[:len(pcm)]
    return (wet * rms(pcm) / rms(wet)).astype(np.float32)


def gain(pcm: np.ndarray, db: float) -> np.ndarray:
    return np.clip(pcm * 10 ** (db / 20), -1.0, 1.0).astype(np.float32)


@dataclass
class ChannelConfig:
    """Shares of clips that get each augmentation, and their ranges."""

    speed: float = 0.5  # share resampled by one of SPEEDS
    noise: float = 0.4  # share with additive noise (white, pink or another voice)
    snr_db: tuple[float, float] = (5.0, 30.0)
    babble_db: tuple[float, float] = (10.0, 25.0)  # another voice this far below the clip
    reverb: float = 0.25
    rt60_s: tuple[float, float] = (0.15, 0.6)
    telephone: float = 0.3  # share through the 8 kHz mu-law channel
    level_db: tuple[float, float] = (-20.0, 6.0)


def channel(pcm: np.ndarray, cc: ChannelConfig, rng: np.random.Generator,
            other: np.ndarray | None = None) -> np.ndarray:
    """One random draw of the channel: speed, then the room, noise (or `other`, a second voice, at
    low level), the telephone line, and the level. The result's length is the sped-up clip's."""
    if rng.random() < cc.speed:
        pcm = speed(pcm, *SPEEDS[rng.integers(len(SPEEDS))])
    if rng.random() < cc.reverb:
        pcm = reverb(pcm, rng.uniform(*cc.rt60_s), rng)
    if rng.random() < cc.noise:
        kind = rng.integers(3)
        if kind == 2 and other is not None and len(other):
            pcm = add_noise(pcm, np.roll(other, rng.integers(len(other))), rng.uniform(*cc.babble_db))
        else:
            noise = rng.standard_normal(len(pcm)).astype(np.float32) if kind == 0 else pink_noise(len(pcm), rng)
            pcm = add_noise(pcm, noise, rng.uniform(*cc.snr_db))
    if rng.random() < cc.telephone:
        pcm = telephone(pcm)
    return gain(pcm, rng.uniform(*cc.level_db))
