"""The voicing measure: per 10 ms frame of 24 kHz audio (the mel-PCA codec's frames), how periodic
it is, its f0, and whether it is voiced; and how well a resynthesis keeps the original's voicing.
The codec evaluation and the mel-PCA probe report it; the voicing stage learns its f0 and voicing.
"""
from __future__ import annotations

import numpy as np

from ..model import melpca

RATE = melpca.SAMPLE_RATE

# Voicing: per 40 ms Hann frame every 10 ms, the autocorrelation of the spectrally flattened frame
# (log power minus its 600 Hz moving average, so a formant or a spectral tilt is not mistaken for
# periodicity: low-passed noise scores like white noise, about 0.14), divided by the window's own
# autocorrelation (Boersma 1993), peak over lags of f0 60..400 Hz; voiced when the peak reaches 0.45
# (Praat's voicing threshold; the 99th percentile of noise is 0.3, a steady harmonic tone 0.87) on a
# frame within 35 dB of the clip's loudest.
VOICING_THRESHOLD = 0.45
SPEECH_DB = 35.0
F0_RANGE_HZ = (60.0, 400.0)
FLATTEN_HZ = 600.0
OCTAVE_RATIO = 0.85  # a sub-multiple of the best lag whose peak reaches this share of it is f0


def _frames(pcm: np.ndarray) -> np.ndarray:
    x = np.pad(np.asarray(pcm, dtype=np.float64), (melpca.PAD, 0))
    n = max(0, (len(x) - melpca.WINDOW) // melpca.HOP + 1)
    idx = np.arange(melpca.WINDOW)[None, :] + melpca.HOP * np.arange(n)[:, None]
    return x[idx] if n else np.zeros((0, melpca.WINDOW))


def voicing(pcm: np.ndarray) -> dict[str, np.ndarray]:
    """Per 10 ms frame of 24 kHz audio (aligned with the codec's frames): periodicity (the peak
    normalised autocorrelation of the flattened spectrum, about 0..1), f0 (Hz, at that peak's lag or
    a sub-multiple of it), loud (within SPEECH_DB of the clip's loudest frame) and voiced (loud,
    periodicity >= VOICING_THRESHOLD)."""
    from scipy.ndimage import uniform_filter1d

    frames = _frames(pcm)
    if not len(frames):
        empty = np.zeros(0)
        return {"periodicity": empty, "f0": empty, "loud": empty.astype(bool), "voiced": empty.astype(bool)}
    window = np.hanning(melpca.WINDOW + 2)[1:-1]
    nfft = 2048
    power = np.abs(np.fft.rfft(frames * window, n=nfft, axis=-1)) ** 2
    log_power = np.log(power + 1e-12)
    envelope = uniform_filter1d(log_power, size=int(FLATTEN_HZ / (RATE / nfft)), axis=-1, mode="nearest")
    r = np.fft.irfft(np.exp(log_power - envelope), n=nfft, axis=-1)
    rw = np.fft.irfft(np.abs(np.fft.rfft(window, n=nfft)) ** 2, n=nfft)
    lo, hi = int(RATE / F0_RANGE_HZ[1]), int(RATE / F0_RANGE_HZ[0])
    norm = (r[:, lo:hi + 1] / rw[lo:hi + 1]) / np.maximum(r[:, :1] / rw[0], 1e-20)
    energy = power.sum(axis=-1)
    periodicity = norm.max(axis=1)
    # A periodic frame peaks at its period and at every multiple, and a multiple (a sub-octave) often
    # edges the period out: where the best lag's third or half (within 3 %) comes close to the best
    # peak, that shorter lag is the period.
    lags = np.arange(lo, hi + 1)
    best = lo + norm.argmax(axis=1)
    lag = best
    for divisor in (2, 3):
        target = best / divisor
        near = np.abs(lags[None, :] - target[:, None]) <= 0.03 * target[:, None]
        score = np.where(near, norm, -np.inf)
        shorter = score.max(axis=1) >= OCTAVE_RATIO * periodicity
        lag = np.where(shorter & (target >= lo), lags[score.argmax(axis=1)], lag)
    f0 = RATE / lag
    level = 10 * np.log10(np.maximum(energy, 1e-20))
    loud = level >= level.max() - SPEECH_DB
    return {"periodicity": periodicity, "f0": f0, "loud": loud,
            "voiced": (periodicity >= VOICING_THRESHOLD) & loud}


def voicing_counts(original: np.ndarray, resynth: np.ndarray) -> dict[str, float]:
    """Sums over the original's loud frames: agreement on voiced/unvoiced, the periodicity of both
    on the original's voiced frames, and f0 agreement (within 5 %) where both are voiced."""
    o, r = voicing(original), voicing(resynth)
    n = min(len(o["loud"]), len(r["loud"]))
    o, r = {k: v[:n] for k, v in o.items()}, {k: v[:n] for k, v in r.items()}
    loud, vo, vr = o["loud"], o["voiced"], r["voiced"]
    both = vo & vr
    f0_close = np.abs(r["f0"] / o["f0"] - 1) < 0.05
    return {"frames": int(loud.sum()), "agree": int((vo == vr)[loud].sum()),
            "voiced_original": int(vo.sum()), "voiced_resynth": int(vr[loud].sum()),
            "voiced_both": int(both.sum()), "f0_agree": int((both & f0_close).sum()),
            "periodicity_original": float(o["periodicity"][vo].sum()),
            "periodicity_resynth": float(r["periodicity"][vo].sum())}


def voicing_figures(c: dict[str, float]) -> dict[str, float | None]:
    div = lambda a, b: a / b if b else None  # noqa: E731
    return {"voicing_agreement": div(c["agree"], c["frames"]),
            "voiced_fraction_original": div(c["voiced_original"], c["frames"]),
            "voiced_fraction_resynth": div(c["voiced_resynth"], c["frames"]),
            "voiced_recall": div(c["voiced_both"], c["voiced_original"]),
            "f0_agreement": div(c["f0_agree"], c["voiced_both"]),
            "periodicity_original": div(c["periodicity_original"], c["voiced_original"]),
            "periodicity_resynth": div(c["periodicity_resynth"], c["voiced_original"])}
