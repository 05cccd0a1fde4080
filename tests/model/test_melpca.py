"""mel-PCA codec: streaming equals offline, causality, the PCA basis, and a real voice's round trip."""
import shutil

import numpy as np
import pytest
import torch

from michi.model.melpca import (
    BINS,
    DECODER_DELAY,
    PAD,
    PHASE_PERIOD,
    TICK,
    TICK_DIM,
    MelPCABasis,
    MelPCACodec,
    causal_log_mel,
    fit_basis,
    random_phases,
    tick_vectors,
)
from michi.model.state import load_state_tensors, state_tensors

RATE = 24_000


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """Harmonic bursts with a moving pitch and noise between them: enough structure for a PCA."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 110 + 60 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(np.sin(h * phase) / h for h in range(1, 20))
    gate = (np.sin(2 * np.pi * rng.uniform(2, 5) * t) > 0).astype(float)
    noise = rng.standard_normal(len(t)) * 0.05
    return (0.3 * voiced * gate + noise * (1 - gate)).astype(np.float32)


@pytest.fixture(scope="module")
def basis() -> MelPCABasis:
    return fit_basis([_speechlike(3.0, s) for s in range(6)], k=32)


@pytest.fixture(scope="module")
def codec(basis) -> MelPCACodec:
    return MelPCACodec.from_basis(basis).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _encode_chunked(codec, audio, sizes):
    state = codec.encoder.init_state(audio.shape[0])
    latents, features, pos, i = [], [], 0, 0
    while pos < audio.shape[-1]:
        size = sizes[i % len(sizes)]
        out, state = codec.encoder.step(audio[:, pos:pos + size], state)
        latents.append(out.latents)
        features.append(out.features)
        pos, i = pos + size, i + 1
    return torch.cat(latents, 1), torch.cat(features, 1)


@pytest.mark.parametrize("sizes", [[1], [7, 1919, 3], [1920], [1921, 500], [5003]])
def test_chunked_encoder_equals_whole(codec, sizes):
    audio = torch.from_numpy(np.stack([_speechlike(0.5, 10), _speechlike(0.5, 11)]))
    audio = audio[:, :TICK * 6 + 777] if sizes != [1] else audio[:, :TICK * 2 + 5]
    whole = codec.encoder(audio)
    latents, features = _encode_chunked(codec, audio, sizes)
    assert latents.shape == whole.latents.shape == (2, audio.shape[-1] // TICK, codec.k)
    assert features.shape[-1] == TICK_DIM
    assert _rel(latents, whole.latents) < 1e-5
    assert _rel(features, whole.features) < 1e-5


def test_encoder_matches_the_offline_log_mel(codec, basis):
    audio = torch.from_numpy(_speechlike(1.0, 3))
    mel = causal_log_mel(audio)  # [100, 80]
    assert mel.shape == (100, 80)
    out = codec.encoder(audio[None])
    stacked = mel[:out.features.shape[1] * 8].reshape(-1, TICK_DIM)
    torch.testing.assert_close(out.features[0], stacked)
    torch.testing.assert_close(out.latents[0], basis.project(stacked), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sizes", [[1], [2, 3], [4]])
def test_chunked_decoder_equals_whole(codec, sizes):
    torch.manual_seed(0)
    latents = torch.randn(2, 9, codec.k) * codec.std
    whole = codec.decoder(latents)
    assert whole.shape == (2, 9 * TICK)
    state = codec.decoder.init_state(2)
    outs, pos, i = [], 0, 0
    while pos < latents.shape[1]:
        size = sizes[i % len(sizes)]
        out, state = codec.decoder.step(latents[:, pos:pos + size], state)
        assert out.shape == (2, min(size, 9 - pos) * TICK)
        outs.append(out)
        pos, i = pos + size, i + 1
    assert _rel(torch.cat(outs, 1), whole) < 1e-5
    # rows of one batch draw their phases independently: each row equals its own stream
    assert _rel(codec.decoder(latents[1:]), whole[1:]) < 1e-5


def test_decoder_state_flattens_and_resets(codec):
    torch.manual_seed(1)
    latents = torch.randn(2, 4, codec.k) * codec.std
    whole = codec.decoder(latents)
    state = codec.decoder.init_state(2)
    codec.decoder.step(latents[:, :1], state)
    moved = load_state_tensors(codec.decoder.init_state(2), [t.clone() for t in state_tensors(state)])
    rest, _ = codec.decoder.step(latents[:, 1:], moved)
    assert _rel(rest, whole[:, TICK:]) < 1e-5
    # a reset row starts over as a fresh stream; the other row carries on
    state = codec.decoder.init_state(2)
    codec.decoder.step(latents[:, :2], state)
    before = [t.clone() for t in state_tensors(state)]
    state.reset(torch.tensor([True, False]))
    for t, was, fresh in zip(state_tensors(state), before, state_tensors(codec.decoder.init_state(1))):
        assert torch.equal(t[0], fresh[0]) and torch.equal(t[1], was[1])
    out, _ = codec.decoder.step(latents[:, 2:], state)
    assert _rel(out[0], codec.decoder(latents[:1, 2:])[0]) < 1e-5
    assert _rel(out[1], whole[1, 2 * TICK:]) < 1e-5
    assert state.frame.tolist() == [[16.0], [32.0]]  # the rows' next frames: 8 per latent


def test_decoder_state_is_exportable(codec):
    """The state is float32 tensors only (no generator), all zeros for a fresh stream, as the
    ONNX and Triton executions start one."""
    state = codec.decoder.init_state(3)
    tensors = state_tensors(state)
    assert [tuple(t.shape) for t in tensors] == [(3, PAD), (3, 1)]
    assert all(t.dtype == torch.float32 and not t.any() for t in tensors)


def test_random_phases_are_an_uncorrelated_integer_hash():
    """Uniform on the circle, no structure across bins or frames (a phase linear in the bin would
    be a time shift, not a random phase), fixed by (seed, frame, bin), and periodic in the frame."""
    frames = torch.arange(2000)
    phase = random_phases(frames)
    assert phase.shape == (2000, BINS) and phase.dtype == torch.float32
    assert float(phase.min()) >= 0 and float(phase.max()) <= 2 * np.pi + 1e-6
    z = torch.polar(torch.ones_like(phase, dtype=torch.float64), phase.double())
    for moment in (z, z[:, 1:] * z[:, :-1].conj(), z[1:] * z[:-1].conj(),
                   z[:, 2:] * z[:, :-2] * z[:, 1:-1].conj() ** 2):
        assert float(moment.mean().abs()) < 0.005  # ~1e-3 expected for 1e6 independent phases
    counts = np.histogram(phase.numpy(), bins=16, range=(0, 2 * np.pi))[0]
    assert counts.min() > 0.97 * counts.mean()
    torch.testing.assert_close(random_phases(frames[[5, 7]]), phase[[5, 7]], atol=0, rtol=0)
    torch.testing.assert_close(random_phases(frames[:3] + PHASE_PERIOD), phase[:3], atol=0, rtol=0)
    assert float((random_phases(frames[:3], seed=1) - phase[:3]).abs().mean()) > 1.0


def test_encoder_state_flattens_and_resets(codec):
    audio = torch.from_numpy(np.stack([_speechlike(0.4, 4), _speechlike(0.4, 5)]))[:, :3 * TICK]
    whole = codec.encoder(audio).latents
    state = codec.encoder.init_state(2)
    codec.encoder.step(audio[:, :TICK], state)
    moved = load_state_tensors(codec.encoder.init_state(2), [t.clone() for t in state_tensors(state)])
    out, _ = codec.encoder.step(audio[:, TICK:], moved)
    assert _rel(out.latents, whole[:, 1:]) < 1e-5
    state.reset(torch.tensor([True, False]))
    out, _ = codec.encoder.step(audio[:, TICK:], state)
    assert _rel(out.latents[0], codec.encoder(audio[:1, TICK:]).latents[0]) < 1e-5
    assert _rel(out.latents[1], whole[1, 1:]) < 1e-5
    state.buffer = state.buffer[..., :-1]  # mid-tick: a reset would misalign the row
    with pytest.raises(ValueError, match="boundary"):
        state.reset(torch.tensor([True, False]))


def test_encoder_is_causal(codec):
    audio = torch.from_numpy(_speechlike(0.5, 6))[None, :5 * TICK]
    changed = audio.clone()
    changed[:, 3 * TICK:] += 0.5 * torch.randn(1, 2 * TICK)  # the future from tick 3 on
    a, b = codec.encoder(audio).latents, codec.encoder(changed).latents
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=0, rtol=0)
    assert (a[:, 3] - b[:, 3]).abs().max() > 1e-2  # and the change does reach tick 3
    # tick 2 reads nothing after its last sample, but up to PAD samples before its first
    earlier = audio.clone()
    earlier[:, 2 * TICK - PAD:2 * TICK - PAD + 240] += 0.5
    assert (codec.encoder(earlier).latents[:, 2] - a[:, 2]).abs().max() > 1e-3


def test_decoder_is_causal_with_a_fixed_delay(codec):
    torch.manual_seed(2)
    latents = torch.randn(1, 6, codec.k) * codec.std
    changed = latents.clone()
    changed[:, 3] += codec.std
    a, b = codec.decoder(latents), codec.decoder(changed)
    torch.testing.assert_close(a[:, :3 * TICK], b[:, :3 * TICK], atol=0, rtol=0)
    assert (a[:, 3 * TICK:4 * TICK] - b[:, 3 * TICK:4 * TICK]).abs().max() > 1e-3
    assert codec.decoder.delay == DECODER_DELAY == 720


def test_decoder_delay_and_level_on_a_round_trip(codec):
    """The re-analysed log-mel of the resynthesis matches the original best 720 samples (3 mel
    frames) late, at the original's level (the OLA gain keeps the power of random-phase frames)."""
    audio = torch.from_numpy(_speechlike(2.0, 7))
    decoded = codec.decode(codec.encode(torch.nn.functional.pad(audio, (0, TICK))[None]))[0]
    mo, md = causal_log_mel(audio), causal_log_mel(decoded)
    n = len(mo) - 8
    l1 = [float((md[lag:lag + n] - mo[:n]).abs().mean()) for lag in range(7)]
    assert int(np.argmin(l1)) == DECODER_DELAY // 240 == 3
    aligned = codec.resynthesize(audio)
    assert aligned.shape == audio.shape
    ratio = float(aligned.square().mean().sqrt() / audio.square().mean().sqrt())
    assert 0.7 < ratio < 1.4, ratio


def test_basis_is_orthonormal_deterministic_and_ordered(basis):
    c = basis.components
    torch.testing.assert_close(c @ c.T, torch.eye(basis.k), atol=1e-5, rtol=0)
    assert basis.mean.shape == (TICK_DIM,) and basis.std.shape == (basis.k,)
    assert torch.all(basis.std[:-1] >= basis.std[1:])
    again = fit_basis([_speechlike(3.0, s) for s in range(6)], k=32)
    torch.testing.assert_close(again.components, c, atol=0, rtol=0)
    assert 0.5 < basis.variance_kept < 1.0
    # the std is the corpus std of each latent dimension
    latents = torch.cat([basis.project(tick_vectors(_speechlike(3.0, s), pad_end=True)) for s in range(6)])
    torch.testing.assert_close(latents.std(0), basis.std, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(latents.mean(0), torch.zeros(basis.k), atol=1e-3, rtol=0)


def test_reconstruction_error_falls_as_k_grows():
    full = fit_basis([_speechlike(3.0, s) for s in range(6)], k=64)
    ticks = tick_vectors(_speechlike(3.0, 99), pad_end=True)
    errors = []
    for k in (2, 8, 32, 64):
        b = full.truncate(k)
        errors.append(float((b.reconstruct(b.project(ticks)) - ticks).square().mean()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_codec_state_dict_round_trip(codec, tmp_path):
    from safetensors.torch import load_file, save_file

    assert not any(p.requires_grad for p in codec.parameters())  # nothing to train
    sd = codec.state_dict()
    assert set(sd) == {"encoder.mean", "encoder.components", "decoder.mean", "decoder.components",
                       "std", "total_variance"}
    save_file(sd, str(tmp_path / "codec.safetensors"))
    loaded = MelPCACodec(codec.k)
    loaded.load_state_dict(load_file(str(tmp_path / "codec.safetensors")))
    audio = torch.from_numpy(_speechlike(0.5, 8))[None]
    torch.testing.assert_close(loaded.encode(audio), codec.encode(audio))
    torch.testing.assert_close(loaded.normalize(codec.encode(audio)), codec.encode(audio) / codec.std)
    codec.basis.save(tmp_path / "basis.safetensors")
    back = MelPCABasis.load(tmp_path / "basis.safetensors")
    torch.testing.assert_close(back.components, codec.basis.components)


HARVARD = [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
    # held out from the fit:
    "The small pup gnawed a hole in the sock.", "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.", "The swan dive was far short of perfect.",
]


@pytest.mark.skipif(shutil.which("flite") is None, reason="needs flite (apt: flite)")
def test_real_voice_keeps_the_log_mel_at_k64():
    """A basis fit on 20 sentences read by flite kal16 keeps > 95 % of the log-mel variance of 4
    other sentences by the same voice at K = 64 (and less at K = 16)."""
    from michi.data.voices import synthesize

    clips = [synthesize("flite-kal16", s) for s in HARVARD]
    basis = fit_basis(clips[:20], k=64)
    ticks = torch.cat([tick_vectors(c, pad_end=True) for c in clips[20:]])
    total = float((ticks - ticks.mean(0)).square().sum())

    def kept(b):
        return 1 - float((b.reconstruct(b.project(ticks)) - ticks).square().sum()) / total

    assert kept(basis) > 0.95
    assert kept(basis.truncate(16)) < kept(basis)


def test_voicing_measure_tells_a_tone_from_shaped_noise():
    from scipy.signal import lfilter

    from michi.eval.voicing import voicing, voicing_counts

    t = np.arange(RATE) / RATE
    tone = sum(np.sin(2 * np.pi * 120 * h * t) / h for h in range(1, 30))
    noise = lfilter([1], [1, -0.95], np.random.default_rng(0).standard_normal(RATE))  # low-passed
    v = voicing(tone)
    assert v["voiced"][10:].all() and np.allclose(v["f0"][10:], 120, rtol=0.02)
    assert voicing(noise)["voiced"][10:].mean() < 0.05
    c = voicing_counts(tone, noise)
    assert c["voiced_original"] > 90 and c["voiced_resynth"] < 5 and c["f0_agree"] == 0
    assert voicing(np.zeros(100))["voiced"].shape == (0,)
