"""Causal HiFi-GAN vocoder: shapes, causality, chunked decoding == whole-utterance decoding."""
import dataclasses

import pytest
import torch

from michi.config import FRAME_SAMPLES, VocoderConfig, tiny
from michi.model.vocoder import Vocoder


def full_like():
    """The full preset's structure (ResBlock1, three MRF kernels) at a size that tests quickly."""
    return dataclasses.replace(tiny(), latent_dim=16, vocoder=VocoderConfig(
        initial_channels=32, upsample_rates=(8, 8, 5, 6), upsample_kernel_sizes=(16, 16, 10, 12),
        resblock_kernel_sizes=(3, 7, 11), resblock_dilations=((1, 3, 5),) * 3, resblock_type=1))


CONFIGS = {"tiny": tiny, "full_like": full_like}


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
        assert ref.abs().max() <= 1.0
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
