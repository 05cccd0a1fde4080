import time

import numpy as np
import pytest

from michi.audio.io import AudioError
from michi.audio.resample import StreamingResampler, resample_stream

RATE_PAIRS = [(16000, 24000), (8000, 24000), (48000, 16000), (44100, 16000), (24000, 16000),
              (22050, 48000), (16000, 8000)]


def _chunked(rs, x, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(rs.push(x[i:i + n]))
        i += n
    assert i >= len(x)
    return np.concatenate(out + [rs.flush()])


@pytest.mark.parametrize("rate_in,rate_out", RATE_PAIRS)
def test_any_chunking_gives_the_whole_input_output(rate_in, rate_out):
    rng = np.random.default_rng(rate_in + rate_out)
    x = (0.3 * rng.standard_normal(1500)).astype(np.float32)
    whole = resample_stream(x, rate_in, rate_out)
    assert len(whole) == round(len(x) * rate_out / rate_in)
    rs = StreamingResampler(rate_in, rate_out)
    random_sizes = [int(n) for n in rng.integers(0, 40, 200)] + [len(x)]  # zeros included
    for sizes in ([1] * len(x), random_sizes, [0, len(x), 0]):
        got = _chunked(rs, x, sizes)  # flush() resets, so rs is reused for each stream
        assert got.shape == whole.shape
        assert np.max(np.abs(got - whole)) < 1e-5 * np.max(np.abs(whole))


@pytest.mark.parametrize("rate_in,rate_out", RATE_PAIRS)
def test_length_and_latency(rate_in, rate_out):
    rs = StreamingResampler(rate_in, rate_out)
    assert rs.latency_s == pytest.approx(32 / min(rate_in, rate_out))
    behind = []
    for n_in in range(0, 700, 7):
        rs.reset()
        emitted = len(rs.push(np.zeros(n_in, np.float32)))
        total = emitted + len(rs.flush())
        assert total == round(n_in * rate_out / rate_in)  # Python's round, half to even
        behind.append(total - emitted)
    # Before flush the stream is behind by at most the documented latency, and that bound is tight.
    assert max(behind) == rs.latency_out_samples
    assert rs.latency_out_samples <= np.ceil(rs.latency_s * rate_out) + 1


def test_identity_when_rates_are_equal():
    rs = StreamingResampler(16000, 16000)
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    np.testing.assert_array_equal(rs.push(x), x)
    assert len(rs.flush()) == 0 and rs.latency_s == 0


def test_sine_keeps_frequency_amplitude_and_timing_when_upsampling():
    t_in = np.arange(8000) / 8000
    y = resample_stream((0.5 * np.sin(2 * np.pi * 1000 * t_in)).astype(np.float32), 8000, 24000)
    assert len(y) == 24000
    mid = y[1200:-1200]  # away from the start/end transients
    amp_db = 20 * np.log10(np.sqrt(2 * np.mean(mid**2)) / 0.5)
    assert abs(amp_db) < 1.0
    spec = np.abs(np.fft.rfft(mid * np.hanning(len(mid))))
    assert np.argmax(spec) * 24000 / len(mid) == pytest.approx(1000, abs=2)
    # No delay: output sample n is the sine at time n / 24000.
    t_out = np.arange(24000) / 24000
    assert np.max(np.abs(y - 0.5 * np.sin(2 * np.pi * 1000 * t_out))[1200:-1200]) < 1e-3


@pytest.mark.parametrize("tone_hz", [8_300, 9_000, 12_000, 20_000])
def test_tones_above_output_nyquist_are_removed_when_downsampling(tone_hz):
    t = np.arange(48000) / 48000
    y = resample_stream(np.sin(2 * np.pi * tone_hz * t).astype(np.float32), 48000, 16000)
    rms = np.sqrt(np.mean(y[800:-800] ** 2)) * np.sqrt(2)
    assert 20 * np.log10(rms) < -40


def test_passband_tone_survives_downsampling_and_matches_scipy():
    from scipy.signal import resample_poly

    t = np.arange(48000) / 48000
    x = (0.4 * np.sin(2 * np.pi * 3000 * t) + 0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)
    y = resample_stream(x, 48000, 16000)
    ref = resample_poly(x, 1, 3)
    assert np.max(np.abs(y - ref)[400:-400]) < 2e-3


def test_images_are_removed_when_upsampling():
    t = np.arange(8000) / 8000
    y = resample_stream(np.sin(2 * np.pi * 3000 * t).astype(np.float32), 8000, 48000)
    spec = np.abs(np.fft.rfft(y[2400:-2400] * np.hanning(len(y) - 4800)))
    freqs = np.fft.rfftfreq(len(y) - 4800, 1 / 48000)
    peak = spec.max()
    assert 20 * np.log10(spec[freqs > 4100].max() / peak) < -40  # image at 5 kHz, 11 kHz...


def test_fast_enough_for_many_calls():
    rs = StreamingResampler(16000, 24000)
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    best = np.inf
    for _ in range(5):
        start = time.perf_counter()
        for i in range(0, 16000, 320):  # 1 s in 20 ms chunks
            rs.push(x[i:i + 320])
        best = min(best, time.perf_counter() - start)
        rs.reset()
    assert best < 0.010, f"1 s of 16 kHz -> 24 kHz took {best * 1e3:.1f} ms"


def test_bad_rates():
    for bad in ((0, 16000), (16000, -8000), (16000.0, 8000)):
        with pytest.raises(AudioError, match="positive integer"):
            StreamingResampler(*bad)
    with pytest.raises(AudioError, match="too large a filter"):
        StreamingResampler(44101, 48000)
