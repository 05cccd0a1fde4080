"""Causal HiFi-GAN generator: 12.5 Hz latents [B, n, latent_dim] -> 24 kHz audio [B, n * 1920].

Every conv pads on the left only and every transposed conv drops its right overhang, so the
generator has no look-ahead: one latent frame in gives its 1920 samples out at once, and chunked
decoding (`step`) equals whole-utterance decoding (`forward`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MichiConfig
from .conv import StateList, StreamingConv1d, StreamingConvTranspose1d, run

LRELU_SLOPE = 0.1


class ResBlock(nn.Module):
    """HiFi-GAN residual block with causal convs.

    Type 1 (V1/V2), per dilation: x += conv(lrelu(dilated_conv(lrelu(x)))).
    Type 2 (V3), per dilation: x += dilated_conv(lrelu(x)); half the convs, for the CPU preset.
    """

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...],
                 resblock_type: int = 1):
        super().__init__()
        if resblock_type not in (1, 2):
            raise ValueError(f"resblock_type must be 1 or 2, not {resblock_type}")
        self.convs = nn.ModuleList()
        for d in dilations:
            self.convs.append(StreamingConv1d(channels, channels, kernel_size, dilation=d))
            if resblock_type == 1:
                self.convs.append(StreamingConv1d(channels, channels, kernel_size))
        self.per_dilation = 2 if resblock_type == 1 else 1  # convs per residual connection

    def _run(self, x: Tensor, state: StateList | None) -> Tensor:
        h = x
        for j, conv in enumerate(self.convs):
            h = run(conv, F.leaky_relu(h, LRELU_SLOPE), None if state is None else state[j])
            if (j + 1) % self.per_dilation == 0:
                x = h = x + h
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> StateList:
        return StateList(conv.init_state(batch_size, device, dtype) for conv in self.convs)

    def step(self, x: Tensor, state: StateList) -> tuple[Tensor, StateList]:
        return self._run(x, state), state


class Vocoder(nn.Module):
    def __init__(self, cfg: MichiConfig):
        super().__init__()
        vc = cfg.vocoder
        if math.prod(vc.upsample_rates) != cfg.frame_samples:
            raise ValueError(f"upsample_rates {vc.upsample_rates} must multiply to {cfg.frame_samples}")
        if len(vc.upsample_kernel_sizes) != len(vc.upsample_rates):
            raise ValueError("one upsample kernel size per upsample rate")
        if len(vc.resblock_kernel_sizes) != len(vc.resblock_dilations):
            raise ValueError("one dilation tuple per resblock kernel size")
        channels = vc.initial_channels
        self.conv_pre = StreamingConv1d(cfg.latent_dim, channels, 7)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for rate, kernel in zip(vc.upsample_rates, vc.upsample_kernel_sizes):
            out = max(channels // 2, 1)
            self.ups.append(StreamingConvTranspose1d(channels, out, kernel, rate))
            # Multi-receptive-field fusion: parallel blocks with different kernels, averaged.
            self.resblocks.append(nn.ModuleList(
                ResBlock(out, k, tuple(d), vc.resblock_type)
                for k, d in zip(vc.resblock_kernel_sizes, vc.resblock_dilations)))
            channels = out
        self.conv_post = StreamingConv1d(channels, 1, 7)
        self.frame_samples = cfg.frame_samples

    def _run(self, latents: Tensor, state: StateList | None) -> Tensor:
        def child(i: int) -> Any:
            return None if state is None else state[i]

        x = run(self.conv_pre, latents.transpose(1, 2), child(0))
        index = 1
        for up, blocks in zip(self.ups, self.resblocks):
            x = run(up, F.leaky_relu(x, LRELU_SLOPE), child(index))
            index += 1
            total = None
            for block in blocks:
                y = run(block, x, child(index))
                index += 1
                total = y if total is None else total + y
            x = total / len(blocks)
        # HiFi-GAN's last activation uses the default slope (0.01), not LRELU_SLOPE.
        x = run(self.conv_post, F.leaky_relu(x), child(index))
        return torch.tanh(x)[:, 0]

    def forward(self, latents: Tensor) -> Tensor:
        return self._run(latents, None)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> StateList:
        """All convs here have stride 1 on their input, so a row can be reset after any step."""
        states = StateList([self.conv_pre.init_state(batch_size, device, dtype)])
        for up, blocks in zip(self.ups, self.resblocks):
            states.append(up.init_state(batch_size, device, dtype))
            states.extend(block.init_state(batch_size, device, dtype) for block in blocks)
        states.append(self.conv_post.init_state(batch_size, device, dtype))
        return states

    def step(self, latents: Tensor, state: StateList) -> tuple[Tensor, StateList]:
        """Latent frames [B, m, latent_dim] (any m >= 0) -> their audio [B, m * 1920]."""
        return self._run(latents, state), state
