"""Codec training (listen encoder -> vocoder autoencoder): mel, discriminators, HiFi-GAN losses."""
import math

import torch

from michi.audio.mel import log_mel_spectrogram, mel_filterbank
from michi.config import FRAME_SAMPLES, tiny
from michi.model.discriminators import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    codec_generator_loss,
    discriminator_loss,
    mel_l1_loss,
)
from michi.model.listen import ListenEncoder
from michi.model.vocoder import Vocoder


def sines(frames=3):
    t = torch.arange(frames * FRAME_SAMPLES) / 24_000
    return torch.stack([
        0.3 * torch.sin(2 * math.pi * 220 * t) + 0.2 * torch.sin(2 * math.pi * 660 * t + 1.0),
        0.25 * torch.sin(2 * math.pi * 440 * t) + 0.15 * torch.sin(2 * math.pi * 1250 * t),
    ])


def small_discriminators():
    # HiFi-GAN's layout with narrow channels, so a CPU test step stays fast.
    return [MultiPeriodDiscriminator(channels=(4, 8, 16, 16, 16)), MultiScaleDiscriminator(width=4)]


def grads_ok(module):
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    return (all(g is not None and torch.isfinite(g).all() for g in grads)
            and sum(g.abs().sum() for g in grads) > 0)


def test_mel_filterbank_is_slaney():
    bank = mel_filterbank(24_000, 1024, 100)
    assert bank.shape == (100, 513) and (bank >= 0).all()
    assert (bank.sum(1) > 0).all()  # no empty filter at 24 kHz / 1024 points
    hz = torch.linspace(0, 12_000, 513)
    centres = hz[bank.argmax(1)]
    assert (centres.diff() >= 0).all()
    # Slaney: evenly spaced (66.7 Hz) below 1 kHz, log-spaced above; area-normalised weights.
    assert centres[5] < 1000 and centres[-1] > 10_000
    assert bank[0].max() > bank[-1].max()


def test_log_mel_shape_and_peak():
    t = torch.arange(24_000) / 24_000
    tone = torch.sin(2 * math.pi * 1000 * t)
    mel = log_mel_spectrogram(tone)
    assert mel.shape == (100, 24_000 // 256 + 1)
    bank = mel_filterbank(24_000, 1024, 100)
    expected = bank[:, round(1000 / 12_000 * 512)].argmax()
    assert abs(mel[:, 40].argmax().item() - expected.item()) <= 1
    batch = log_mel_spectrogram(torch.stack([tone, tone * 0.5]))
    assert batch.shape == (2, 100, 94) and torch.isfinite(batch).all()
    with torch.inference_mode():
        log_mel_spectrogram(tone[:3000])  # a bank cached under inference_mode ...
    x = tone[:3000].clone().requires_grad_()
    log_mel_spectrogram(x).sum().backward()  # ... still works with autograd
    assert torch.isfinite(x.grad).all()


def test_discriminators_and_losses_give_gradients():
    torch.manual_seed(0)
    cfg = tiny()
    encoder, vocoder = ListenEncoder(cfg), Vocoder(cfg)
    discriminators = small_discriminators()
    audio = sines(frames=2)
    fake = vocoder(encoder(audio).latents)
    assert fake.shape == audio.shape

    d_loss = fake.new_zeros(())
    for disc in discriminators:
        real_logits, real_features = disc(audio)
        fake_logits, _ = disc(fake.detach())
        assert len(real_logits) == len(real_features) == len(disc.discriminators)
        d_loss = d_loss + discriminator_loss(real_logits, fake_logits)
    assert torch.isfinite(d_loss) and d_loss > 0
    d_loss.backward()
    for disc in discriminators:
        for sub in disc.discriminators:
            assert grads_ok(sub)
    assert all(p.grad is None for p in vocoder.parameters())  # fake was detached

    for disc in discriminators:
        disc.zero_grad()
    losses = codec_generator_loss(audio, fake, discriminators)
    assert set(losses) == {"mel", "adversarial", "features", "total"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    expected = 45 * losses["mel"] + losses["adversarial"] + 2 * losses["features"]
    torch.testing.assert_close(losses["total"], expected)
    losses["total"].backward()
    assert grads_ok(vocoder) and grads_ok(encoder)


def test_mel_training_lowers_reconstruction_loss():
    torch.manual_seed(0)
    cfg = tiny()
    encoder, vocoder = ListenEncoder(cfg), Vocoder(cfg)
    audio = sines(frames=3)
    optimizer = torch.optim.Adam([*encoder.parameters(), *vocoder.parameters()], lr=1e-3)
    losses = []
    for _ in range(30):
        loss = mel_l1_loss(audio, vocoder(encoder(audio).latents))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_one_adversarial_training_step():
    torch.manual_seed(0)
    cfg = tiny()
    encoder, vocoder = ListenEncoder(cfg), Vocoder(cfg)
    discriminators = small_discriminators()
    generator_params = [*encoder.parameters(), *vocoder.parameters()]
    g_opt = torch.optim.AdamW(generator_params, lr=2e-4, betas=(0.8, 0.99))
    d_opt = torch.optim.AdamW([p for d in discriminators for p in d.parameters()], lr=2e-4,
                              betas=(0.8, 0.99))
    audio = sines(frames=2)
    before = [p.detach().clone() for p in generator_params]

    fake = vocoder(encoder(audio).latents)
    d_loss = sum(discriminator_loss(d(audio)[0], d(fake.detach())[0]) for d in discriminators)
    d_opt.zero_grad()
    d_loss.backward()
    d_opt.step()

    losses = codec_generator_loss(audio, fake, discriminators)
    g_opt.zero_grad()
    losses["total"].backward()
    g_opt.step()
    assert torch.isfinite(d_loss) and torch.isfinite(losses["total"])
    assert any(not torch.equal(a, b) for a, b in zip(before, generator_params))
