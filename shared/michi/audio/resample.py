"""Streaming polyphase resampling: the same output for any chunking of the input.

Rational ratio L/M (L = out/g, M = in/g, g = gcd): upsample by L, low-pass, keep every M-th sample,
done as a polyphase FIR so only the kept samples are computed. The prototype filter is a
Kaiser-windowed sinc that spans `zero_crossings` samples of the lower of the two rates on each side
of its centre, and whose stop band starts at the lower rate's Nyquist frequency (so a tone above
the output Nyquist is attenuated by `stopband_db` when downsampling, and images are when upsampling).
At the defaults (32 zero crossings, 80 dB) the pass band is flat to 0.84 of that Nyquist frequency:
6.7 kHz for 16 kHz, 3.4 kHz (the telephone band) for 8 kHz.

Timing: output sample n is the band-limited input at time n / rate_out (the filter is centred,
there is no delay in the output's content). The price is lookahead: output n can only be emitted
once the input up to time n / rate_out + zero_crossings / min(rate_in, rate_out) has arrived, i.e.
`latency_s` = zero_crossings / min(rate_in, rate_out) (2 ms for 16 kHz <-> 24/48 kHz, 4 ms from
8 kHz at the default 32). `flush()` treats the input after the end as silence and emits the tail,
so the whole stream is exactly round(len_in * rate_out / rate_in) samples (Python's round).
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from math import ceil, gcd

import numpy as np

from michi.audio.io import AudioError, as_mono_float32

_MAX_FACTOR = 2_000  # L or M above this means an odd rate pair and a huge filter table
_BLOCK_OUT = 1_024  # outputs computed per vectorised step (bounds memory on long pushes)


def _kaiser_beta(stopband_db: float) -> float:
    """Kaiser's formula for the window parameter reaching `stopband_db` of attenuation."""
    a = stopband_db
    if a > 50:
        return 0.1102 * (a - 8.7)
    if a >= 21:
        return 0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21)
    return 0.0


class StreamingResampler:
    """Stateful resampler from `rate_in_hz` to `rate_out_hz`, one per stream.

    `push(pcm)` returns every output sample that the input so far fully determines; `flush()`
    returns the rest (input after the end taken as zeros) and makes the resampler ready for a new
    stream. Concatenating all returned arrays gives, up to float32 rounding, the same samples
    whatever the chunk sizes were (1 sample, empty chunks, the whole input at once).
    """

    def __init__(self, rate_in_hz: int, rate_out_hz: int, *, zero_crossings: int = 32,
                 stopband_db: float = 80.0):
        for name, rate in (("rate_in_hz", rate_in_hz), ("rate_out_hz", rate_out_hz)):
            if not isinstance(rate, (int, np.integer)) or rate <= 0:
                raise AudioError(f"{name} must be a positive integer, got {rate!r}")
        if zero_crossings < 1:
            raise AudioError(f"zero_crossings must be >= 1, got {zero_crossings}")
        self.rate_in_hz, self.rate_out_hz = int(rate_in_hz), int(rate_out_hz)
        g = gcd(self.rate_in_hz, self.rate_out_hz)
        self.up, self.down = self.rate_out_hz // g, self.rate_in_hz // g  # L, M
        if max(self.up, self.down) > _MAX_FACTOR:
            raise AudioError(f"cannot resample {rate_in_hz} Hz -> {rate_out_hz} Hz: "
                             f"ratio {self.up}/{self.down} needs too large a filter")
        self.zero_crossings = zero_crossings
        self.identity = self.up == self.down
        # Filter centre (= half length) in samples at the upsampled rate L * rate_in.
        self._centre = zero_crossings * max(self.up, self.down)
        # Coefficients for output n are row n % L of this table (read-only, shared by all streams
        # of this rate pair); it holds _BLOCK_OUT + L rows so a block is one contiguous slice.
        self._coefs = (np.ones((1, 1), np.float32) if self.identity
                       else _filter_table(self.up, self.down, zero_crossings, float(stopband_db)))
        self._taps = self._coefs.shape[1]  # K: taps per output sample
        self.reset()

    # -- public ---------------------------------------------------------------------------------
    @property
    def latency_s(self) -> float:
        """Lookahead: input needed past an output sample's own time before it is emitted."""
        return 0.0 if self.identity else self.zero_crossings / min(self.rate_in_hz, self.rate_out_hz)

    @property
    def latency_out_samples(self) -> int:
        """Most output samples the stream can be behind round(len_in * out / in) before flush()."""
        return 0 if self.identity else (2 * self._centre + self.down) // (2 * self.down)

    def reset(self) -> None:
        """Forget the stream: the next push starts a new one at time 0."""
        self._n_in = 0  # input samples pushed so far
        self._n_out = 0  # output samples emitted so far
        # Input history, buffer position 0 = absolute input index self._buf_start; the zeros
        # before index 0 make the start of the stream look like silence.
        self._buf_start = -(self._taps - 1)
        self._buf = np.zeros(self._taps - 1, np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Feed the next input chunk (any length, 0 included); returns the output it completes."""
        pcm = as_mono_float32(pcm)
        if self.identity:
            self._n_in += len(pcm)
            return pcm.copy()
        self._buf = np.concatenate([self._buf, pcm])
        self._n_in += len(pcm)
        # Output n needs input up to index (centre + n*M) // L, which must be < n_in.
        n_end = max(self._n_out, (self.up * self._n_in - 1 - self._centre) // self.down + 1)
        return self._emit(n_end)

    def flush(self) -> np.ndarray:
        """End of stream: the remaining output (input past the end taken as zeros), then reset()."""
        if self.identity:
            self.reset()
            return np.zeros(0, np.float32)
        total = round(Fraction(self._n_in * self.up, self.down))
        if total > self._n_out:
            last_needed = (self._centre + (total - 1) * self.down) // self.up
            pad = last_needed + 1 - (self._buf_start + len(self._buf))
            if pad > 0:
                self._buf = np.concatenate([self._buf, np.zeros(pad, np.float32)])
        out = self._emit(total)
        self.reset()
        return out

    # -- internals ------------------------------------------------------------------------------
    def _emit(self, n_end: int) -> np.ndarray:
        if n_end <= self._n_out:
            return np.zeros(0, np.float32)
        K, buf, L, M, n0 = self._taps, self._buf, self.up, self.down, self._n_out
        # Every window of K consecutive buffered inputs, as a view (no copy).
        windows = np.ndarray((len(buf) - K + 1, K), np.float32, buffer=buf, strides=(4, 4))
        out = np.empty(n_end - n0, np.float32)
        if n_end - n0 >= 8 * L:
            # Outputs of one phase (n = n0 + r + t*L) read windows M apart and share one row of
            # taps: a strided view times a vector (BLAS gemv), no gather.
            for r in range(L):
                count = len(range(n0 + r, n_end, L))
                start = (self._centre + (n0 + r) * M) // L - (K - 1) - self._buf_start
                out[r::L] = windows[start:start + (count - 1) * M + 1:M] @ self._coefs[(n0 + r) % L]
        else:
            # Few outputs a phase (short chunks at odd ratios such as 44.1 kHz): gather windows.
            for b0 in range(n0, n_end, _BLOCK_OUT):
                n = np.arange(b0, min(b0 + _BLOCK_OUT, n_end), dtype=np.int64)
                # Output n reads inputs i_hi - K + 1 ... i_hi, i_hi = (centre + n*M) // L.
                starts = (self._centre + n * M) // L - (K - 1) - self._buf_start
                coefs = self._coefs[b0 % L:b0 % L + len(n)]
                out[b0 - n0:b0 - n0 + len(n)] = np.einsum("ij,ij->i", windows[starts], coefs)
        self._n_out = n_end
        # Drop history that no later output reads.
        keep_from = (self._centre + n_end * self.down) // self.up - (self._taps - 1)
        drop = min(keep_from - self._buf_start, len(self._buf))
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return out


@lru_cache(maxsize=64)
def _filter_table(L: int, M: int, zero_crossings: int, stopband_db: float) -> np.ndarray:
    """Polyphase coefficients, (_BLOCK_OUT + L, K): row r holds the K taps, in input order, of
    every output n with n % L == r (the phase of n repeats with period L)."""
    c = zero_crossings * max(L, M)  # filter centre at the upsampled rate
    # Transition width by Kaiser's formula for a filter spanning 2 * zero_crossings samples of the
    # lower rate, in cycles per lower-rate sample; the stop band starts at that rate's Nyquist.
    width = (stopband_db - 7.95) / (2.285 * 2 * np.pi * 2 * zero_crossings)
    cutoff = max(0.5 - width / 2, 0.25) / max(L, M)  # -6 dB point, cycles per upsampled sample
    k = np.arange(2 * c + 1, dtype=np.float64) - c
    h = 2 * cutoff * np.sinc(2 * cutoff * k) * np.kaiser(2 * c + 1, _kaiser_beta(stopband_db))
    h *= L  # zero stuffing divides the level by L
    taps = ceil((2 * c + 1) / L)
    h = np.concatenate([h, np.zeros(taps * L - len(h))])
    # Output n, q = c + n*M, reads input i_hi - j with tap h[q % L + j*L] (i_hi = q // L); rows
    # are stored reversed so they dot with inputs in increasing order (i_hi - K + 1 ... i_hi).
    phases = h.reshape(taps, L).T[:, ::-1]
    table = np.ascontiguousarray(phases[(c + np.arange(_BLOCK_OUT + L) * M) % L], dtype=np.float32)
    table.flags.writeable = False
    return table

def resample_stream(pcm: np.ndarray, rate_in_hz: int, rate_out_hz: int) -> np.ndarray:
    """A whole clip through a StreamingResampler (the same samples a chunked stream would get)."""
    rs = StreamingResampler(rate_in_hz, rate_out_hz)
    return np.concatenate([rs.push(pcm), rs.flush()])
