"""Causal convolutions that run offline or streaming with the same result.

Every stateful module here follows the streaming protocol of `michi.model.streaming`
(`StreamingModule`: `init_state(batch_size, device, dtype) -> state`, `step(x, state, exec_mask)
-> (y, state)`, plus `forward(x)`). A state holds a batch of independent streams and its children
by name; `state.reset(mask)` puts the masked rows back to a fresh stream, so one batched model can
carry many calls that start and end on their own.
Chunked `step` output equals `forward` on the whole input, for any chunking.

The step paths run tens of times per 80 ms frame on CPU, where per-call overhead rivals the
arithmetic; they read plain attributes and avoid nn.Module lookups where it is cheap to do so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .streaming import StateDict, StreamingModule, StreamingState, is_streaming

# ATen hands a batch-1 conv1d to oneDNN above this many input elements (ConvParams::use_mkldnn).
_ONEDNN_MIN_NUMEL = 20480


@dataclass
class ConvState(StreamingState):
    """Input a causal conv has received but not yet consumed; starts as the zeros of its pad."""

    buffer: Tensor  # [B, C_in, L]
    fresh_len: int  # L of a fresh stream (the causal pad)

    def check_reset(self) -> None:
        # Rows of one batch share their position modulo the stride (every row gets the same
        # number of samples per step), so a row can only restart where a fresh stream would be.
        if self.buffer.shape[-1] != self.fresh_len:
            raise ValueError(
                f"cannot reset a strided conv stream mid-stride ({self.buffer.shape[-1]} samples "
                f"buffered, a fresh stream has {self.fresh_len}); reset at a frame boundary")


class StreamingConv1d(StreamingModule, nn.Conv1d):
    """Conv1d padded on the left only: T inputs give T // stride outputs, none looks ahead."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
                         groups=groups, bias=bias)
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        if self.effective_kernel < stride:
            raise ValueError("effective kernel shorter than the stride would skip input samples")
        # Pad K - s (not K - 1): the last output then ends exactly at the last input sample when
        # the stride divides T, and a stride-s conv turns T samples into T / s frames.
        self.pad = self.effective_kernel - stride
        self._stride, self._dilation = stride, dilation
        # On CPU, ATen runs a small dilated conv through a slow generic kernel, and a larger one
        # through oneDNN with ~150 us of fixed cost per call; for one stream and one frame, an
        # explicit im2col + one matmul is 2-3x faster (measured on the tiny preset, 2 cores).
        self._im2col = groups == 1

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(F.pad(x, (self.pad, 0)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> ConvState:
        buffer = torch.zeros(batch_size, self.in_channels, self.pad, device=device, dtype=dtype)
        return ConvState(buffer, self.pad)

    def _step(self, x: Tensor, state: ConvState) -> tuple[Tensor, ConvState]:
        buffer = torch.cat([state.buffer, x], dim=-1) if state.buffer.shape[-1] else x
        length, kernel, stride = buffer.shape[-1], self.effective_kernel, self._stride
        if length < kernel:
            state.buffer = buffer
            return x.new_zeros(x.shape[0], self.out_channels, 0), state
        count = (length - kernel) // stride + 1
        # Keep what later outputs need: everything from the first unconsumed stride on.
        state.buffer = buffer[..., count * stride:]
        if stride != 1:
            buffer = buffer[..., :(count - 1) * stride + kernel]
        if not self._im2col or buffer.is_cuda or (
                self._dilation == 1 and buffer.numel() <= _ONEDNN_MIN_NUMEL):
            return F.conv1d(buffer, self.weight, self.bias, stride, 0, self._dilation), state
        return self._im2col_conv(buffer.contiguous(), count), state

    def _im2col_conv(self, x: Tensor, count: int) -> Tensor:
        b, c, _ = x.shape
        k = self.kernel_size[0]
        sb, sc, sl = x.stride()
        cols = x.as_strided((b, c, k, count), (sb, sc, self._dilation * sl, self._stride * sl))
        cols = cols.reshape(b, c * k, count)
        weight = self.weight.view(self.out_channels, c * k)
        if self.bias is None:
            return torch.matmul(weight, cols)
        return torch.baddbmm(self.bias[None, :, None], weight.expand(b, -1, -1), cols)


@dataclass
class ConvTransposeState(StreamingState):
    """The tail of the last chunk's output (k - s samples, no bias) that the next chunk completes."""

    overhang: Tensor  # [B, C_out, k - s]


class StreamingConvTranspose1d(StreamingModule, nn.ConvTranspose1d):
    """ConvTranspose1d trimmed on the right: T inputs give exactly T * stride outputs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 bias: bool = True):
        if kernel_size < stride:
            raise ValueError("kernel_size must be >= stride, or outputs would be left unwritten")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        self._stride = stride
        self.overhang = kernel_size - stride

    def forward(self, x: Tensor) -> Tensor:
        # Dropping the last k - s samples (instead of centring) keeps it causal: output t depends
        # on inputs <= t // stride only.
        y = F.conv_transpose1d(x, self.weight, self.bias, self.stride)
        return y[..., :x.shape[-1] * self._stride]

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> ConvTransposeState:
        return ConvTransposeState(torch.zeros(batch_size, self.out_channels, self.overhang,
                                              device=device, dtype=dtype))

    def _step(self, x: Tensor, state: ConvTransposeState) -> tuple[Tensor, ConvTransposeState]:
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[0], self.out_channels, 0), state
        # No bias here: the overhang is added to the next chunk, which brings its own bias.
        y = F.conv_transpose1d(x, self.weight, None, self._stride)
        emitted, overhang = x.shape[-1] * self._stride, self.overhang
        if overhang:
            y = torch.cat([y[..., :overhang] + state.overhang, y[..., overhang:]], dim=-1)
        state.overhang = y[..., emitted:]
        y = y[..., :emitted]
        return (y if self.bias is None else y + self.bias[:, None]), state


def run(module: nn.Module, x: Tensor, state: Any) -> Tensor:
    """Apply a child offline (state None) or streaming, so composite modules keep one code path.
    (A child steps every row: the exec mask applies once, at the outermost `step`.)"""
    if state is None:
        return module(x)
    return module._step(x, state)[0]


class StreamingSequential(StreamingModule, nn.Sequential):
    """nn.Sequential whose stateful children keep their state between steps (named by index)."""

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> StateDict:
        return StateDict((name, m.init_state(batch_size, device, dtype))
                         for name, m in self._modules.items() if is_streaming(m))

    def _step(self, x: Tensor, state: StateDict) -> tuple[Tensor, StateDict]:
        for name, module in self._modules.items():
            child = state.get(name)
            x = module(x) if child is None else module._step(x, child)[0]
        return x, state
