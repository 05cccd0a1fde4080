"""Streaming state as flat tensors (what ONNX and Triton pass in and out), and back."""
import pytest
import torch

import michi
from michi.model.state import load_state_tensors, state_tensors


@pytest.mark.parametrize("part", ["listen", "vocoder"])
def test_flat_state_carries_a_stream(part):
    """Stepping, flattening the state, loading it into a fresh state and stepping on gives what
    one uninterrupted stream gives."""
    m = michi.load("tiny").model
    module = getattr(m, part)
    torch.manual_seed(0)
    x = torch.randn(2, 1920 * 3) if part == "listen" else torch.randn(2, 3, m.cfg.latent_dim)
    first, rest = (x[:, :1920], x[:, 1920:]) if part == "listen" else (x[:, :1], x[:, 1:])
    with torch.no_grad():
        whole = module(x)
        state = module.init_state(2)
        module.step(first, state)
        flat = [t.clone() for t in state_tensors(state)]
        moved = load_state_tensors(module.init_state(2), flat)
        out, _ = module.step(rest, moved)
    if part == "listen":
        torch.testing.assert_close(out.latents, whole.latents[:, 1:], atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(out, whole[:, 1920:], atol=1e-5, rtol=0)
    assert any(t.dtype == torch.bool for t in flat) == (part == "listen")  # the attention's valid mask


def test_wrong_number_of_tensors_is_refused():
    state = michi.load("tiny").model.vocoder.init_state(1)
    flat = state_tensors(state)
    with pytest.raises(ValueError, match="fewer"):
        load_state_tensors(state, flat[:-1])
    with pytest.raises(ValueError, match="more"):
        load_state_tensors(state, flat + flat[:1])
