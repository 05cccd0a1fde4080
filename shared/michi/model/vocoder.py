"""Causal HiFi-GAN generator: 12.5 Hz latents [B, n, latent_dim] -> 24 kHz audio [B, n * 1920].

Every conv pads on the left only and every transposed conv drops its right overhang, so the
generator has no look-ahead: one latent frame in gives its 1920 samples out at once, and chunked
decoding (`step`) equals whole-utterance decoding (`forward`).

Two output heads (`VocoderConfig.istft_n_fft`): HiFi-GAN's, where the upsampling reaches 24 kHz
and the last conv writes samples, or iSTFTNet's, where the upsampling stops at an STFT frame rate
and the last conv writes a log-magnitude and a phase per frequency bin. The inverse STFT is a
fixed transposed conv (`ISTFT`), so it streams like the others: each frame's windowed waveform
starts at its own hop and its tail is carried into the next step, which adds no delay.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MichiConfig
from .conv import StreamingConv1d, StreamingConvTranspose1d, run
from .streaming import StateDict, StreamingModule

LRELU_SLOPE = 0.1


class ResBlock(StreamingModule, nn.Module):
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

    def _run(self, x: Tensor, state: StateDict | None) -> Tensor:
        h = x
        for j, conv in enumerate(self.convs):
            h = run(conv, F.leaky_relu(h, LRELU_SLOPE), None if state is None else state[f"convs.{j}"])
            if (j + 1) % self.per_dilation == 0:
                x = h = x + h
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> StateDict:
        return StateDict((f"convs.{j}", conv.init_state(batch_size, device, dtype))
                         for j, conv in enumerate(self.convs))

    def _step(self, x: Tensor, state: StateDict) -> tuple[Tensor, StateDict]:
        return self._run(x, state), state


def istft_basis(n_fft: int, hop: int) -> Tensor:
    """[2 * bins, 1, n_fft]: real and imaginary parts of each bin -> its windowed inverse real DFT.

    Rows 0..bins-1 take the real parts, rows bins.. the imaginary parts; a frame [re; im] times
    this basis is irfft(re + i im, n_fft) * window. The Hann window is scaled so that windows one
    hop apart sum to 1.
    """
    bins = n_fft // 2 + 1
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(bins, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft
    weight = torch.full((bins, 1), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if n_fft % 2 == 0:
        weight[-1] = 1.0  # the Nyquist bin has no mirror image
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64) * (2 * hop / n_fft)
    basis = torch.cat([weight * torch.cos(angle), -weight * torch.sin(angle)]) / n_fft * window
    return basis[:, None, :].float()


class ISTFT(StreamingConvTranspose1d):
    """Inverse STFT with overlap-add, causal: spectra [B, 2 * bins, T] -> samples [B, 1, T * hop].

    Frame t's windowed waveform covers samples t * hop .. t * hop + n_fft; what reaches past the
    frames given so far is the overhang the streaming state carries. Its weights are fixed (a
    buffer, not saved in checkpoints).
    """

    def __init__(self, n_fft: int, hop: int):
        if n_fft < hop:
            raise ValueError(f"istft_n_fft {n_fft} is shorter than the hop {hop}")
        super().__init__(2 * (n_fft // 2 + 1), 1, n_fft, hop, bias=False)
        del self.weight
        self.register_buffer("weight", istft_basis(n_fft, hop), persistent=False)


def spectra(x: Tensor, bins: int) -> Tensor:
    """Log-magnitudes and phases [B, 2 * bins, T] -> real and imaginary parts (Vocos' head; the
    magnitude is capped so an early step cannot overflow)."""
    magnitude = torch.exp(x[:, :bins]).clamp(max=100.0)
    phase = x[:, bins:]
    return torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)


class Vocoder(StreamingModule, nn.Module):
    def __init__(self, cfg: MichiConfig):
        super().__init__()
        vc = cfg.vocoder
        upsampling = math.prod(vc.upsample_rates)
        if vc.istft_n_fft:
            if cfg.frame_samples % upsampling:
                raise ValueError(f"upsample_rates {vc.upsample_rates} must multiply to a divisor of "
                                 f"{cfg.frame_samples} (the iSTFT hop is the rest)")
        elif upsampling != cfg.frame_samples:
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
        self.bins = vc.istft_n_fft // 2 + 1
        if vc.istft_n_fft:
            # Vocos' head: a pointwise projection to log-magnitudes and phases.
            self.conv_post = StreamingConv1d(channels, 2 * self.bins, 1)
            self.istft = ISTFT(vc.istft_n_fft, cfg.frame_samples // upsampling)
        else:
            self.conv_post = StreamingConv1d(channels, 1, 7)
            self.istft = None
        self.frame_samples = cfg.frame_samples

    def _run(self, latents: Tensor, state: StateDict | None) -> Tensor:
        def child(name: str) -> Any:
            return None if state is None else state[name]

        x = run(self.conv_pre, latents.transpose(1, 2), child("conv_pre"))
        for i, (up, blocks) in enumerate(zip(self.ups, self.resblocks)):
            x = run(up, F.leaky_relu(x, LRELU_SLOPE), child(f"ups.{i}"))
            total = None
            for j, block in enumerate(blocks):
                y = run(block, x, child(f"resblocks.{i}.{j}"))
                total = y if total is None else total + y
            x = total / len(blocks)
        # HiFi-GAN's last activation uses the default slope (0.01), not LRELU_SLOPE.
        x = run(self.conv_post, F.leaky_relu(x), child("conv_post"))
        if self.istft is None:
            return torch.tanh(x)[:, 0]
        return run(self.istft, spectra(x, self.bins), child("istft"))[:, 0]

    def forward(self, latents: Tensor) -> Tensor:
        return self._run(latents, None)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> StateDict:
        """Child states by module name, in data-flow order (the graphs' state_in_<i> order).
        All convs here have stride 1 on their input, so a row can be reset after any step."""
        states = StateDict(conv_pre=self.conv_pre.init_state(batch_size, device, dtype))
        for i, (up, blocks) in enumerate(zip(self.ups, self.resblocks)):
            states[f"ups.{i}"] = up.init_state(batch_size, device, dtype)
            for j, block in enumerate(blocks):
                states[f"resblocks.{i}.{j}"] = block.init_state(batch_size, device, dtype)
        states["conv_post"] = self.conv_post.init_state(batch_size, device, dtype)
        if self.istft is not None:
            states["istft"] = self.istft.init_state(batch_size, device, dtype)
        return states

    def _step(self, latents: Tensor, state: StateDict) -> tuple[Tensor, StateDict]:
        """Latent frames [B, m, latent_dim] (any m >= 0) -> their audio [B, m * 1920]."""
        return self._run(latents, state), state
