"""Causal HiFi-GAN vocoder (waveform and iSTFT heads): shapes, causality, chunked decoding ==
whole-utterance decoding, and the inverse STFT against torch's inverse real FFT."""
import dataclasses

import pytest
import torch

from michi.config import FRAME_SAMPLES, VocoderConfig, tiny
from michi.model.vocoder import ISTFT, Vocoder


def full_like():
    """The full preset's structure (ResBlock1, three MRF kernels) at a size that tests quickly."""
    return dataclasses.replace(tiny(), latent_dim=16, vocoder=VocoderConfig(
        initial_channels=32, upsample_rates=(8, 8, 5, 6), upsample_kernel_sizes=(16, 16, 10, 12),
        resblock_kernel_sizes=(3, 7, 11), resblock_dilations=((1, 3, 5),) * 3, resblock_type=1))


CONFIGS = {"tiny": tiny, "full_like": full_like}  # iSTFT head and waveform head


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def make(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    return cfg, Vocoder(cfg).eval()


def stream(vocoder, latents, sizes):
    state = vocoder.init_state(latents.shape[0])
    outs, start = [], 0
    for size in sizes:
        audio, state = vocoder.step(latents[:, start:start + size], state)
        assert audio.shape == (latents.shape[0], size * FRAME_SAMPLES)
        outs.append(audio)
        start += size
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", CONFIGS)
def test_chunked_equals_offline(name):
    cfg, vocoder = make(name)
    latents = torch.randn(2, 7, cfg.latent_dim)
    gen = torch.Generator().manual_seed(3)
    random_sizes = []
    while sum(random_sizes) < 7:
        random_sizes.append(min(7 - sum(random_sizes), int(torch.randint(0, 4, (), generator=gen))))
    with torch.inference_mode():
        ref = vocoder(latents)
        assert ref.shape == (2, 7 * FRAME_SAMPLES)
        if not cfg.vocoder.istft_n_fft:
            assert ref.abs().max() <= 1.0  # tanh output
        for sizes in ([1] * 7, [2, 2, 2, 1], [3, 3, 1], [0, 3, 0, 4], random_sizes):
            assert rel_err(stream(vocoder, latents, sizes), ref) < 1e-5, sizes


def test_is_causal():
    cfg, vocoder = make("tiny")
    latents = torch.randn(1, 5, cfg.latent_dim)
    changed = latents.clone()
    changed[:, 3] += 1.0
    with torch.inference_mode():
        a, b = vocoder(latents), vocoder(changed)
    cut = 3 * FRAME_SAMPLES
    torch.testing.assert_close(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def test_reset_row_equals_fresh_stream():
    cfg, vocoder = make("tiny")
    before, after = torch.randn(2, 3, cfg.latent_dim), torch.randn(2, 2, cfg.latent_dim)
    with torch.inference_mode():
        state = vocoder.init_state(2)
        vocoder.step(before, state)
        state.reset(torch.tensor([True, False]))
        out, state = vocoder.step(after, state)
        fresh = vocoder(after[:1])
        carried = vocoder(torch.cat([before, after], 1))[:, -out.shape[1]:]
    torch.testing.assert_close(out[:1], fresh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[1:], carried[1:], rtol=1e-4, atol=1e-6)


def test_forward_trains():
    cfg, vocoder = make("tiny")
    vocoder.train()
    latents = torch.randn(1, 2, cfg.latent_dim, requires_grad=True)
    vocoder(latents).square().mean().backward()
    grads = [p.grad for p in vocoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert latents.grad.abs().sum() > 0


def test_rejects_bad_upsampling():
    bad = dataclasses.replace(tiny().vocoder, upsample_rates=(8, 8, 5, 5))
    cfg = dataclasses.replace(tiny(), vocoder=bad)
    with pytest.raises(ValueError, match="multiply"):
        Vocoder(cfg)


@pytest.mark.parametrize("n_fft,hop", [(480, 240), (16, 4), (15, 5)])
def test_istft_is_windowed_inverse_fft_with_overlap_add(n_fft, hop):
    """Frame t's irfft times the (scaled) Hann window lands at samples t * hop onwards, summed."""
    istft = ISTFT(n_fft, hop)
    bins = n_fft // 2 + 1
    frames = 6
    spec = torch.randn(2, 2 * bins, frames, dtype=torch.float64)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64) * (2 * hop / n_fft)
    waves = torch.fft.irfft(torch.complex(spec[:, :bins], spec[:, bins:]).transpose(1, 2), n=n_fft) * window
    expected = torch.zeros(2, frames * hop + n_fft, dtype=torch.float64)
    for t in range(frames):
        expected[:, t * hop:t * hop + n_fft] += waves[:, t]
    out = istft.double()(spec)[:, 0]
    torch.testing.assert_close(out, expected[:, :frames * hop])
    # Streaming carries the overhang: one frame at a time gives the same samples.
    state = istft.init_state(2, dtype=torch.float64)
    steps = [istft.step(spec[..., t:t + 1], state)[0][:, 0] for t in range(frames)]
    torch.testing.assert_close(torch.cat(steps, 1), expected[:, :frames * hop])
    torch.testing.assert_close(state.overhang[:, 0], expected[:, frames * hop:frames * hop + n_fft - hop])


def test_istft_windows_overlap_to_one():
    """A steady spectrum (a DC bin only) resynthesises as a constant once the windows overlap."""
    istft = ISTFT(480, 240)
    spec = torch.zeros(1, 2 * 241, 8)
    spec[:, 0] = 480.0  # irfft of a DC bin of 480 is 1 everywhere
    out = istft(spec)[0, 0]
    torch.testing.assert_close(out[240:], torch.ones(8 * 240 - 240))
    assert "weight" not in istft.state_dict() and not list(istft.parameters())  # fixed, not saved
