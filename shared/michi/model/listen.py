"""Listen side: causal encoder from 24 kHz audio to 12.5 Hz latents, and a streaming CTC text head.

The encoder is SEANet-like (strided causal convs with residual units, ELU), optionally followed by
a small causal transformer over frames with a sliding attention window. It yields two things per
frame: the latent (the space the vocoder decodes) and the features the text head reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MichiConfig
from .conv import StreamingConv1d, StreamingSequential, run
from .phonemes import NUM_PHONEME_IDS
from .streaming import StateDict, StreamingModule, StreamingState, masked_step, rows_mask

PHONE_SLOTS_PER_FRAME = 2  # phoneme CTC slots per head frame: 50 a second at 2 frames per tick


class ListenOutput(NamedTuple):
    latents: Tensor  # [B, n, latent_dim]
    features: Tensor  # [B, n, transformer_dim]


class ResidualUnit(StreamingModule, nn.Module):
    """SEANet residual unit: x + conv1x1(elu(conv_k(elu(x)))), squeezed to half width inside."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1):
        super().__init__()
        hidden = max(channels // 2, 1)
        self.conv1 = StreamingConv1d(channels, hidden, kernel_size, dilation=dilation)
        self.conv2 = StreamingConv1d(hidden, channels, 1)

    def _run(self, x: Tensor, state: StateDict | None) -> Tensor:
        h = run(self.conv1, F.elu(x), None if state is None else state["conv1"])
        return x + run(self.conv2, F.elu(h), None if state is None else state["conv2"])

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> StateDict:
        return StateDict(conv1=self.conv1.init_state(batch_size, device, dtype),
                         conv2=self.conv2.init_state(batch_size, device, dtype))

    def _step(self, x: Tensor, state: StateDict) -> tuple[Tensor, StateDict]:
        return self._run(x, state), state


@dataclass
class AttentionCache(StreamingState):
    """Keys and values of the last window - 1 frames of each row; `valid` marks real frames."""

    keys: Tensor  # [B, H, window - 1, head_dim]
    values: Tensor  # [B, H, window - 1, head_dim]
    valid: Tensor  # [B, window - 1] bool

    # `reset` (the protocol's default) zeroes the rows' keys and values and marks them invalid:
    # exactly a fresh stream's cache (invalid slots are masked out of attention anyway).


class WindowedSelfAttention(StreamingModule, nn.Module):
    """Causal multi-head attention where each frame sees itself and the window - 1 before it.

    With `alibi`, each head's scores fall linearly with the distance to the key (ALiBi: slopes
    2^-2, 2^-4, ... over the heads), so that heads can keep to the frames just before, as
    recognising a sound needs; it depends only on distances, so streaming equals offline."""

    def __init__(self, dim: int, heads: int, window: int, alibi: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer_dim {dim} is not divisible by {heads} heads")
        if window < 1:
            raise ValueError("attention_window must be at least 1 frame")
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads) if alibi else torch.zeros(heads)
        self.register_buffer("slopes", slopes.view(1, heads, 1, 1), persistent=False)
        self.alibi = alibi

    def _mask(self, allowed: Tensor, distance: Tensor) -> Tensor:
        """The attention mask: bool `allowed`, or with ALiBi a float bias (-inf where not allowed)."""
        if not self.alibi:
            return allowed
        bias = -self.slopes * distance.to(self.slopes.dtype)
        return bias.masked_fill(~allowed, float("-inf"))

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, H, n, head_dim]

    def _merge(self, y: Tensor) -> Tensor:
        b, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(x)
        i = torch.arange(x.shape[1], device=x.device)
        # Same band as the streaming cache: keys j with i - window < j <= i.
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        mask = self._mask(allowed, i[:, None] - i[None, :])
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype) if self.alibi else mask))

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> AttentionCache:
        head_dim = self.qkv.in_features // self.heads
        shape = (batch_size, self.heads, self.window - 1, head_dim)
        return AttentionCache(torch.zeros(shape, device=device, dtype=dtype),
                              torch.zeros(shape, device=device, dtype=dtype),
                              torch.zeros(batch_size, self.window - 1, device=device, dtype=torch.bool))

    def _step(self, x: Tensor, state: AttentionCache) -> tuple[Tensor, AttentionCache]:
        b, m, _ = x.shape
        if m == 0:
            return x, state
        q, k, v = self._split(x)
        keys = torch.cat([state.keys, k], dim=2)
        values = torch.cat([state.values, v], dim=2)
        valid = torch.cat([state.valid, state.valid.new_ones(b, m)], dim=1)
        # New frame i sits at key index window - 1 + i and sees keys i ... window - 1 + i.
        i = torch.arange(m, device=x.device)[:, None]
        j = torch.arange(keys.shape[2], device=x.device)[None, :]
        allowed = (j >= i) & (j <= i + self.window - 1)
        allowed = allowed[None, None] & valid[:, None, None, :]
        mask = self._mask(allowed, i + self.window - 1 - j)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.dtype) if self.alibi else mask)
        keep = keys.shape[2] - (self.window - 1)
        state.keys, state.values, state.valid = keys[:, :, keep:], values[:, :, keep:], valid[:, keep:]
        return self._merge(y), state


class TransformerLayer(StreamingModule, nn.Module):
    """Pre-norm block; no positional encoding (the causal convs give position), or ALiBi (`alibi`)."""

    def __init__(self, dim: int, heads: int, window: int, alibi: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowedSelfAttention(dim, heads, window, alibi)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _run(self, x: Tensor, state: AttentionCache | None) -> Tensor:
        x = x + run(self.attn, self.norm1(x), state)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> AttentionCache:
        return self.attn.init_state(batch_size, device, dtype)

    def _step(self, x: Tensor, state: AttentionCache) -> tuple[Tensor, AttentionCache]:
        return self._run(x, state), state


@dataclass
class ListenState(StreamingState):
    """`reset` restarts the masked rows; rows share their sample phase, so only at frame boundaries."""

    convs: StateDict  # by the index of the conv stack's stateful layers
    transformer: StateDict  # by layer index


class ListenEncoder(StreamingModule, nn.Module):
    """Raw audio [B, T] at 24 kHz -> latents [B, T // 1920, latent_dim] and text-head features."""

    def __init__(self, cfg: MichiConfig):
        super().__init__()
        lc = cfg.listen
        if math.prod(lc.strides) != cfg.frame_samples:
            raise ValueError(f"listen strides {lc.strides} must multiply to {cfg.frame_samples}")
        channels = lc.channels
        layers: list[nn.Module] = [StreamingConv1d(1, channels, 7)]
        for stride in lc.strides:
            # Dilations 1, 3, 9, ... widen the receptive field when a stage has several units.
            layers += [ResidualUnit(channels, 3, 3 ** j) for j in range(lc.residual_layers)]
            out = min(2 * channels, lc.max_channels)
            layers += [nn.ELU(), StreamingConv1d(channels, out, 2 * stride, stride=stride)]
            channels = out
        # transformer_dim is the feature width, also when there is no transformer.
        layers += [nn.ELU(), StreamingConv1d(channels, lc.transformer_dim, 3)]
        self.convs = StreamingSequential(*layers)
        self.transformer = nn.ModuleList(
            TransformerLayer(lc.transformer_dim, lc.transformer_heads, lc.attention_window)
            for _ in range(lc.transformer_layers))
        self.norm = nn.LayerNorm(lc.transformer_dim)
        self.to_latent = nn.Linear(lc.transformer_dim, cfg.latent_dim)
        self.feature_dim = lc.transformer_dim
        self.frame_samples = cfg.frame_samples

    def _run(self, audio: Tensor, state: ListenState | None) -> ListenOutput:
        h = run(self.convs, audio[:, None, :], None if state is None else state.convs)
        h = h.transpose(1, 2)  # [B, n, F]
        for index, layer in enumerate(self.transformer):
            h = run(layer, h, None if state is None else state.transformer[str(index)])
        features = self.norm(h)
        return ListenOutput(self.to_latent(features), features)

    def forward(self, audio: Tensor) -> ListenOutput:
        return self._run(audio, None)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> ListenState:
        return ListenState(self.convs.init_state(batch_size, device, dtype),
                           StateDict((str(i), layer.init_state(batch_size, device, dtype))
                                     for i, layer in enumerate(self.transformer)))

    def _step(self, audio: Tensor, state: ListenState) -> tuple[ListenOutput, ListenState]:
        """Take a chunk [B, t] of any length t >= 0; return the frames it completed (maybe none)."""
        return self._run(audio, state), state


@dataclass
class TextHeadState(StreamingState):
    """The head's conv and attention caches, and its greedy CTC decoder's last slot (blank for a
    fresh stream)."""

    front: StateDict  # the conv front's stateful layers, by index
    layers: StateDict  # the transformer's caches, by layer index
    last_token: Tensor  # [B] long: the arg-max of the last slot, blank included
    blank: int
    front2: StateDict | None = None  # a second feature part's conv front (`ListenTextHead.front2`)

    def reset_own(self, mask: Tensor) -> None:
        self.last_token = self.last_token.masked_fill(rows_mask(mask, self.last_token), self.blank)


def collapse(best: Tensor, last: Tensor, blank: int) -> Tensor:
    """Greedy CTC over arg-max slots best [B, S], the slot before each row's first being last [B]:
    tokens [B, S], -1 where nothing is emitted (a blank, or a repeat of the slot before)."""
    previous = torch.cat([last[:, None].to(best), best[:, :-1]], dim=1)
    return torch.where((best != blank) & (best != previous), best, torch.full_like(best, -1))


def emitted(tokens: Tensor) -> list[int]:
    """The tokens one row emitted (`ListenTextHead.read` output for that row, any shape), in order."""
    return [int(t) for t in tokens.flatten() if t >= 0]


class ListenTextHead(StreamingModule, nn.Module):
    """Streaming CTC head: features [B, n, F] -> logits [B, n, slots, vocab + 1], blank last.

    The features of a tick are `frames` stacked frames (mel-PCA: eight 10 ms log-mel frames; the
    learned encoder: one). Each frame is normalised on its own (so the level of the call does not
    matter), causal convs take them down to at most 2 frames per tick (stride 2 each), and a causal
    transformer with a sliding window (`text_window` frames) gives each frame the context of the
    words before it. Each head frame emits `text_slots / frames out` slots, so a tick has
    `text_slots`: several per frame because 12.5 ticks/s is fewer than a byte tokenizer's
    tokens/s. The CTC sequence is the n * slots slots in order. Nothing looks ahead: a token comes
    once the audio that shows it has arrived.

    Features of two parts (`cfg.listen_feature_parts`, e.g. log-mel and Whisper frames side by
    side) each pass their own norm and convs, and the two are summed before the transformer.

    With `text_layers` 0 it is the conv-only head of older checkpoints: the tick's features
    normalised whole, one causal conv over 3 ticks (`transformer_dim` wide), then the slots.
    """

    def __init__(self, cfg: MichiConfig, text_vocab_size: int):
        super().__init__()
        lc = cfg.listen
        legacy = lc.text_layers == 0
        # (frame width, frames per tick) of each part of the features (`cfg.listen_feature_parts`)
        self.parts = ((cfg.listen_feature_dim, 1),) if legacy else tuple((w, f) for _, w, f in cfg.listen_feature_parts)
        if len(self.parts) > 2:
            raise ValueError(f"a listen text head reads one or two feature parts, not {len(self.parts)}")
        self.feature_dim = cfg.listen_feature_dim
        self.slots, self.blank = lc.text_slots, text_vocab_size
        dim = lc.transformer_dim if legacy else lc.text_dim
        fronts = [self._front(width, frames, dim) for width, frames in self.parts]
        out_frames = fronts[0][1]
        if any(f != out_frames for _, f in fronts):
            raise ValueError(f"the feature parts {self.parts} do not come down to the same frames per tick")
        if lc.text_slots % out_frames:
            raise ValueError(f"text_slots {lc.text_slots} is not a multiple of the head's {out_frames} frames per tick")
        self.out_frames, self.frame_slots = out_frames, lc.text_slots // out_frames
        # Part one's norm and convs keep their names (`norm`, `front`), so a head of one part starts
        # a head of two; part two's (`norm2`, `front2`) start at zero output: it adds nothing until
        # trained.
        self.norm = nn.LayerNorm(self.parts[0][0])
        self.front = fronts[0][0]
        self.norm2 = self.front2 = None
        if len(fronts) == 2:
            self.norm2, self.front2 = nn.LayerNorm(self.parts[1][0]), fronts[1][0]
            last = [m for m in self.front2 if isinstance(m, StreamingConv1d)][-1]
            for p in last.parameters():
                nn.init.zeros_(p)
        self.layers = nn.ModuleList(TransformerLayer(dim, lc.text_heads, lc.text_window, alibi=True)
                                    for _ in range(lc.text_layers))
        self.out_norm = nn.Identity() if legacy else nn.LayerNorm(dim)
        self.to_slots = nn.Linear(dim, self.frame_slots * dim)
        self.out = nn.Linear(dim, text_vocab_size + 1)  # shared by the slots
        # The phoneme CTC output (`cfg.listen.phone_ctc`): PHONE_SLOTS_PER_FRAME slots per head
        # frame over NUM_PHONEME_IDS phonemes, blank last (`phone_logits`).
        self.phone_blank = NUM_PHONEME_IDS
        self.phone_out = nn.Linear(dim, PHONE_SLOTS_PER_FRAME * (NUM_PHONEME_IDS + 1)) if lc.phone_ctc else None
        # False for a head no training has reached (`michi.load` decides from the checkpoint): it
        # then emits nothing, as on silence, instead of random tokens the backbone never saw.
        self.enabled = True

    @staticmethod
    def _front(width: int, frames: int, dim: int) -> tuple[StreamingSequential, int]:
        """A part's causal convs: `width`-wide frames, `frames` per tick, to `dim`, halving the
        frames (stride 2) down to at most 2 per tick; and the frames per tick they give."""
        layers: list[nn.Module] = [StreamingConv1d(width, dim, 3), nn.GELU()]
        while frames > 2:
            if frames % 2:
                raise ValueError(f"{frames} feature frames per tick do not halve down to 2")
            layers += [StreamingConv1d(dim, dim, 4, stride=2), nn.GELU()]
            frames //= 2
        return StreamingSequential(*layers), frames

    @staticmethod
    def _through(features: Tensor, part: tuple[int, int], norm: nn.Module, front: nn.Module,
                 state: StateDict | None) -> Tensor:
        """One part's features [B, n, width * frames] -> its convs' frames [B, n * out_frames, dim]."""
        (b, n, _), (width, frames) = features.shape, part
        h = norm(features.reshape(b, n * frames, width))
        return run(front, h.transpose(1, 2), state).transpose(1, 2)

    def hidden(self, features: Tensor, state: TextHeadState | None = None) -> Tensor:
        """Features [B, n, F] -> the head's frames [B, n * out_frames, dim], before the slots (what
        a training stage's auxiliary losses read)."""
        first = self.parts[0][0] * self.parts[0][1]  # the first part's width
        h = self._through(features[..., :first], self.parts[0], self.norm, self.front, None if state is None else state.front)
        if self.front2 is not None:
            h = h + self._through(features[..., first:], self.parts[1], self.norm2, self.front2,
                                  None if state is None else state.front2)
        for index, layer in enumerate(self.layers):
            h = run(layer, h, None if state is None else state.layers[str(index)])
        return self.out_norm(h)

    def slot_logits(self, hidden: Tensor) -> Tensor:
        """The head's frames [B, n * out_frames, dim] -> logits [B, n, slots, vocab + 1]."""
        b, n = hidden.shape[0], hidden.shape[1] // self.out_frames
        h = self.to_slots(hidden).view(b, n, self.slots, self.out.in_features)
        return self.out(F.gelu(h))

    def phone_logits(self, hidden: Tensor) -> Tensor:
        """The head's frames [B, m, dim] -> phoneme logits [B, m * PHONE_SLOTS_PER_FRAME,
        NUM_PHONEME_IDS + 1], the CTC sequence in order, blank last."""
        if self.phone_out is None:
            raise ValueError("this listen text head has no phoneme output (cfg.listen.phone_ctc)")
        b, m, _ = hidden.shape
        return self.phone_out(hidden).view(b, m * PHONE_SLOTS_PER_FRAME, self.phone_blank + 1)

    def _run(self, features: Tensor, state: TextHeadState | None) -> Tensor:
        return self.slot_logits(self.hidden(features, state))

    def forward(self, features: Tensor) -> Tensor:
        return self._run(features, None)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> TextHeadState:
        return TextHeadState(self.front.init_state(batch_size, device, dtype),
                             StateDict((str(i), layer.init_state(batch_size, device, dtype))
                                       for i, layer in enumerate(self.layers)),
                             self.initial_last_token(batch_size, device), self.blank,
                             None if self.front2 is None else self.front2.init_state(batch_size, device, dtype))

    def _advance(self, features: Tensor, state: TextHeadState) -> tuple[Tensor, Tensor]:
        """Logits [B, n, slots, vocab + 1] and greedy tokens [B, n, slots] of the next n frames."""
        logits = self._run(features, state)
        b, n, slots, _ = logits.shape
        if n == 0:
            return logits, torch.full((b, 0, slots), -1, dtype=torch.long, device=logits.device)
        # Greedy over the n * slots sequence equals frame-by-frame `greedy_step`.
        tokens, state.last_token = self.greedy_step(logits.reshape(b, n * slots, -1), state.last_token)
        return logits, tokens.view(b, n, slots)

    def _step(self, features: Tensor, state: TextHeadState) -> tuple[Tensor, TextHeadState]:
        """Features [B, n, F] -> logits [B, n, slots, vocab + 1]; advances the greedy decoder too."""
        return self._advance(features, state)[0], state

    def _read(self, features: Tensor, state: TextHeadState) -> tuple[Tensor, TextHeadState]:
        return self._advance(features, state)[1], state

    def read(self, features: Tensor, state: TextHeadState,
             exec_mask: Tensor | None = None) -> tuple[Tensor, TextHeadState]:
        """What the listen stage hears: features [B, n, F] -> greedy CTC tokens [B, n, slots]
        (-1 where nothing is emitted; `emitted` lists a row's), the decoder state in `state`."""
        return masked_step(self._read, features, state, exec_mask)

    def ctc_loss(self, logits: Tensor, targets: Tensor, target_lengths: Tensor,
                 frame_lengths: Tensor | None = None) -> Tensor:
        """CTC over the flattened n * slots sequence; targets [B, S] padded, or concatenated.

        frame_lengths [B] (valid frames per row) defaults to all n frames.
        """
        b, n, slots, _ = logits.shape
        log_probs = logits.float().log_softmax(-1).reshape(b, n * slots, -1).transpose(0, 1)
        if frame_lengths is None:
            input_lengths = torch.full((b,), n * slots, dtype=torch.long, device=logits.device)
        else:
            input_lengths = frame_lengths.long() * slots
        # zero_infinity: a target too long for its audio gives no gradient instead of inf/NaN.
        return F.ctc_loss(log_probs, targets, input_lengths, target_lengths.long(), blank=self.blank,
                          reduction="mean", zero_infinity=True)

    def initial_last_token(self, batch_size: int, device: Any = None) -> Tensor:
        """Decoder state of a fresh stream: as if the slot before the first one was a blank."""
        return torch.full((batch_size,), self.blank, dtype=torch.long, device=device)

    def greedy_step(self, logits_frame: Tensor, last_token: Tensor) -> tuple[Tensor, Tensor]:
        """Greedy CTC on one frame [B, slots, vocab + 1].

        Returns tokens [B, slots] (-1 where nothing is emitted) and the new last_token [B]: the
        arg-max of the last slot, blank included, so repeats collapse across frame boundaries.
        To reset a row, set its last_token to `self.blank`. A head that is not `enabled` emits nothing.
        """
        if not self.enabled:
            return torch.full(logits_frame.shape[:-1], -1, dtype=torch.long, device=logits_frame.device), last_token
        best = logits_frame.argmax(-1)  # [B, slots]
        return collapse(best, last_token, self.blank), best[:, -1]

