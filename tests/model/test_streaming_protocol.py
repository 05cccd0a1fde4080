"""One conformance test of the streaming protocol (`michi.model.streaming`) over every stateful
module: (a) chunked `step` equals the whole-input output, (b) `state.reset(mask)` restarts only the
masked rows (as a fresh state), (c) an exec mask freezes the rows it excludes."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest
import torch

from michi.config import VoicingNetConfig, tiny
from michi.model.backbone import Backbone, BackboneState
from michi.model.conv import StreamingConv1d, StreamingConvTranspose1d
from michi.model.listen import ListenEncoder, ListenTextHead
from michi.model.melpca import TICK, MelPCADecoder, MelPCAEncoder
from michi.model.state import state_tensors
from michi.model.streaming import StreamingModule, StreamingState
from michi.model.vocoder import Vocoder
from michi.model.voiced import VoicedMelPCADecoder
from michi.model.whisper_encoder import WhisperEncoder, WhisperFront

B = 2


@dataclasses.dataclass
class Case:
    module: Any
    chunks: list[torch.Tensor]  # [B, ...] each, cut along `dim` (whole frames: shapes stay put)
    dim: int  # the time dimension of inputs and outputs
    out: Callable[[Any], torch.Tensor] = lambda y: y  # the output tensor compared
    full: Callable[[Any, torch.Tensor], Any] | None = None  # whole-input output (default: forward)


def _cases() -> dict[str, Callable[[], Case]]:
    cfg = tiny()
    frame = cfg.frame_samples

    def conv():
        return Case(StreamingConv1d(3, 4, 3, dilation=2), [torch.randn(B, 3, n) for n in (1, 4, 2, 5)], -1)

    def strided_conv():
        return Case(StreamingConv1d(3, 4, 5, stride=2), [torch.randn(B, 3, n) for n in (4, 2, 6)], -1)

    def transposed_conv():
        return Case(StreamingConvTranspose1d(3, 4, 5, 2), [torch.randn(B, 3, n) for n in (1, 3, 2)], -1)

    def listen_encoder():
        return Case(ListenEncoder(cfg), [torch.randn(B, n * frame) * 0.1 for n in (1, 2, 1)], 1,
                    out=lambda y: y.latents)

    def melpca_encoder():
        return Case(MelPCAEncoder(8), [torch.randn(B, n * TICK) * 0.1 for n in (1, 2, 1)], 1,
                    out=lambda y: y.latents)

    def listen_text_head():
        head = ListenTextHead(cfg, text_vocab_size=7)
        return Case(head, [torch.randn(B, n, head.feature_dim) for n in (1, 2, 1)], 1)

    def vocoder():
        return Case(Vocoder(cfg), [torch.randn(B, n, cfg.latent_dim) for n in (1, 2, 1)], 1)

    def melpca_decoder():
        return Case(MelPCADecoder(8), [torch.randn(B, n, 8) for n in (1, 2, 1)], 1)

    def voiced_decoder():
        net = VoicingNetConfig(width=16, dilations=(1, 2, 4, 8), residual=True)
        return Case(VoicedMelPCADecoder(8, voicing=net), [torch.randn(B, n, 8) for n in (1, 2, 1)], 1)

    def backbone():
        bb = Backbone(cfg)
        return Case(bb, [torch.randn(B, n, bb.hidden_size) for n in (3, 1, 2)], 1)

    def whisper_front():  # random weights, small; a window of two ticks, so the cache rolls over
        return Case(WhisperFront(WhisperEncoder(64, 2, 2), chunk=4, window=8),
                    [torch.randn(B, n * frame) * 0.1 for n in (1, 2, 1)], 1)

    return {f.__name__: f for f in (conv, strided_conv, transposed_conv, listen_encoder, melpca_encoder,
                                     listen_text_head, vocoder, melpca_decoder, voiced_decoder, backbone,
                                     whisper_front)}


CASES = _cases()


def _row_view(state: Any, row: int) -> list[torch.Tensor]:
    """What a row's stream is: its state tensors (the backbone: its length and valid keys/values)."""
    if isinstance(state, BackboneState):
        cache = state.cache
        length = int(cache.lengths[row])
        view = [cache.lengths[row].clone()]
        if length:
            view += [t[row, :, :length].clone() for t in cache.keys + cache.values if t is not None]
        return view
    return [t[row].clone() for t in state_tensors(state)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))


def _step(case: Case, x: torch.Tensor, state: Any, exec_mask: torch.Tensor | None = None) -> torch.Tensor:
    y, new_state = case.module.step(x, state, exec_mask)
    assert new_state is state
    return case.out(y)


@pytest.mark.parametrize("name", list(CASES))
def test_streaming_protocol(name):
    torch.manual_seed(0)
    case = CASES[name]()
    module = case.module.eval() if isinstance(case.module, torch.nn.Module) else case.module
    assert isinstance(module, StreamingModule)
    chunks = case.chunks
    with torch.inference_mode():
        # (a) chunked stepping equals the whole input at once.
        whole = torch.cat(chunks, dim=case.dim)
        full = case.out(module(whole))
        state = module.init_state(B)
        assert isinstance(state, StreamingState)
        stepped = torch.cat([_step(case, c, state) for c in chunks], dim=case.dim)
        _close(stepped, full)

        # (b) reset(mask) restarts the masked row only: like a fresh state, the other row untouched.
        state = module.init_state(B)
        _step(case, chunks[0], state)
        kept = _row_view(state, 0)
        state.reset(torch.tensor([False, True]))
        assert _same(_row_view(state, 0), kept)
        assert _same(_row_view(state, 1), _row_view(module.init_state(B), 1))
        after = _step(case, chunks[1], state)
        fresh = _step(case, chunks[1][1:], module.init_state(1))
        _close(after[1:], fresh)
        reference = module.init_state(B)
        for c in chunks[:2]:
            want = _step(case, c, reference)
        _close(after[:1], want[:1])

        # (c) an exec mask freezes the rows it excludes; they go on later as if never stepped.
        state = module.init_state(B)
        _step(case, chunks[0], state)
        frozen = _row_view(state, 1)
        moved = _step(case, chunks[1], state, torch.tensor([True, False]))
        assert _same(_row_view(state, 1), frozen)
        _close(moved[:1], want[:1])  # row 0 advanced as without a mask
        again = _step(case, chunks[1], state)  # row 1 now takes the chunk it skipped
        _close(again[1:], want[1:])
