"""The voiced mel-PCA decoder: streaming equals offline, state resets, and it is voiced where the
analytic decoder whispers, at the analytic decoder's level."""
import numpy as np
import pytest
import torch

from michi.eval.voicing import voicing
from michi.model.melpca import PAD, TICK, MelPCADecoder, fit_basis
from michi.model.state import load_state_tensors, state_tensors
from michi.model.voiced import VoicedMelPCADecoder

from test_melpca import _rel, _speechlike  # tests/model is on sys.path (rootdir import mode)


@pytest.fixture(scope="module")
def basis():
    return fit_basis([_speechlike(3.0, s) for s in range(6)], k=32)


def _decoder(basis, f0_hz: float | None = None) -> VoicedMelPCADecoder:
    """Random voicing weights, or (f0_hz) a net that says every frame is voiced at f0_hz."""
    torch.manual_seed(0)
    dec = VoicedMelPCADecoder(basis.k).eval().requires_grad_(False)
    with torch.no_grad():
        dec.mean.copy_(basis.mean)
        dec.components.copy_(basis.components)
        if f0_hz is not None:
            dec.voicing.out.weight.zero_()
            lo, hi = np.log(60.0), np.log(400.0)
            share = (np.log(f0_hz) - lo) / (hi - lo)
            dec.voicing.out.bias.copy_(torch.tensor([np.log(share / (1 - share)), 20.0]))
    return dec


def _latents(basis, seconds: float = 1.5) -> torch.Tensor:
    audio = torch.from_numpy(_speechlike(seconds, 21))
    from michi.model.melpca import tick_vectors

    return basis.project(tick_vectors(audio))[None]  # [1, n, K]


@pytest.mark.parametrize("sizes", [[1], [2, 3], [5]])
def test_chunked_voiced_decoder_equals_whole(basis, sizes):
    dec = _decoder(basis)
    torch.manual_seed(3)
    latents = torch.cat([_latents(basis)[:, :9], torch.randn(1, 9, basis.k) * basis.std], dim=0)
    whole = dec(latents)
    assert whole.shape == (2, 9 * TICK)
    state = dec.init_state(2)
    outs, pos, i = [], 0, 0
    while pos < 9:
        size = sizes[i % len(sizes)]
        outs.append(dec.step(latents[:, pos:pos + size], state)[0])
        pos, i = pos + size, i + 1
    assert _rel(torch.cat(outs, 1), whole) < 1e-4
    assert _rel(dec(latents[1:]), whole[1:]) < 1e-4  # rows are independent streams


def test_voiced_decoder_state_flattens_and_resets(basis):
    dec = _decoder(basis)
    latents = _latents(basis)[:, :4].expand(2, -1, -1).contiguous()
    whole = dec(latents)
    state = dec.init_state(2)
    dec.step(latents[:, :1], state)
    moved = load_state_tensors(dec.init_state(2), [t.clone() for t in state_tensors(state)])
    assert _rel(dec.step(latents[:, 1:], moved)[0], whole[:, TICK:]) < 1e-4
    state = dec.init_state(2)
    dec.step(latents[:, :2], state)
    before = [t.clone() for t in state_tensors(state)]
    state.reset(torch.tensor([True, False]))
    for t, was, fresh in zip(state_tensors(state), before, state_tensors(dec.init_state(1))):
        assert torch.equal(t[0], fresh[0]) and torch.equal(t[1], was[1])
    out, _ = dec.step(latents[:, 2:], state)
    assert _rel(out[0], dec(latents[:1, 2:])[0]) < 1e-4
    assert _rel(out[1], whole[1, 2 * TICK:]) < 1e-4
    fresh = state_tensors(dec.init_state(3))
    assert all(t.dtype == torch.float32 and not t.any() for t in fresh)
    assert tuple(fresh[2].shape) == (3, 1) and tuple(fresh[3].shape) == (3, PAD)


def test_voiced_decoder_is_causal(basis):
    dec = _decoder(basis)
    latents = _latents(basis)[:, :6]
    changed = latents.clone()
    changed[:, 4:] += 3 * basis.std
    a, b = dec(latents), dec(changed)
    # tick 4's frames start 720 samples before its own samples (the decoder's delay)
    assert torch.equal(a[:, :4 * TICK - PAD], b[:, :4 * TICK - PAD])
    assert not torch.equal(a[:, 4 * TICK:], b[:, 4 * TICK:])


def test_voiced_at_the_voicing_nets_f0_and_at_the_analytic_level(basis):
    latents = _latents(basis, 3.0)
    voiced = _decoder(basis, f0_hz=150.0)(latents)[0].numpy()
    analytic = MelPCADecoder(basis.k)
    with torch.no_grad():
        analytic.mean.copy_(basis.mean)
        analytic.components.copy_(basis.components)
    whisper = analytic(latents)[0].numpy()
    v, w = voicing(voiced), voicing(whisper)
    loud = v["loud"] & w["loud"]
    assert v["voiced"][loud].mean() > 0.8 and w["voiced"][loud].mean() < 0.2
    assert np.median(v["f0"][v["voiced"]]) == pytest.approx(150.0, rel=0.03)
    level = lambda x: 10 * np.log10(np.mean(x[TICK:] ** 2))
    assert abs(level(voiced) - level(whisper)) < 2.0  # dB
