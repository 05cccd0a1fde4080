"""Channel augmentations: each does what it says, measured on the signal."""
import numpy as np
import pytest

from michi.audio import augment
from michi.config import SAMPLE_RATE_HZ


def _tone(seconds=1.0, hz=440.0):
    t = np.arange(int(seconds * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_speed_changes_length_by_the_ratio():
    pcm = _tone()
    for up, down in augment.SPEEDS:
        out = augment.speed(pcm, up, down)
        assert abs(len(out) - len(pcm) * up / down) <= 2


def test_add_noise_at_the_requested_snr():
    pcm = _tone()
    noise = np.random.default_rng(0).standard_normal(1000).astype(np.float32)  # tiled to the clip
    out = augment.add_noise(pcm, noise, 10.0)
    snr = 20 * np.log10(augment.rms(pcm) / augment.rms(out - pcm))
    assert len(out) == len(pcm) and snr == pytest.approx(10.0, abs=0.1)


def test_pink_noise_has_more_low_than_high_energy():
    noise = augment.pink_noise(48_000, np.random.default_rng(0))
    power = np.abs(np.fft.rfft(noise)) ** 2
    assert augment.rms(noise) == pytest.approx(1.0, rel=1e-3)
    assert power[10:100].mean() > 10 * power[10_000:20_000].mean()


def test_reverb_keeps_length_and_level_and_smears_in_time():
    rng = np.random.default_rng(0)
    click = np.zeros(SAMPLE_RATE_HZ, np.float32)
    click[1000] = 1.0
    out = augment.reverb(click, 0.4, rng)
    assert len(out) == len(click) and augment.rms(out) == pytest.approx(augment.rms(click), rel=1e-3)
    tail = out[1000 + int(0.05 * SAMPLE_RATE_HZ):1000 + int(0.3 * SAMPLE_RATE_HZ)]
    assert augment.rms(tail) > 0.01 * augment.rms(out)  # energy long after the click


def test_telephone_removes_what_is_above_4_khz():
    pcm = _tone(hz=300.0) + _tone(hz=6000.0)
    out = augment.telephone(pcm)
    spectrum = np.abs(np.fft.rfft(out))
    hz = np.fft.rfftfreq(len(out), 1 / SAMPLE_RATE_HZ)
    assert len(out) == len(pcm)
    assert spectrum[np.abs(hz - 6000) < 5].max() < 0.01 * spectrum[np.abs(hz - 300) < 5].max()


def test_channel_is_a_function_of_the_generator():
    pcm, other = _tone(), _tone(hz=200.0)
    cc = augment.ChannelConfig(speed=1.0, noise=1.0, reverb=1.0, telephone=1.0)
    a = augment.channel(pcm, cc, np.random.default_rng(3), other)
    b = augment.channel(pcm, cc, np.random.default_rng(3), other)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= 1.0 and np.isfinite(a).all() and len(a) != len(pcm)  # sped up or down
