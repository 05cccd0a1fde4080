"""The backbone engine: the ticks of many calls in ONE forward pass.

Each call owns a row of a shared KV cache (`KVCache` rows, each at its own length) and its own
agent state (last text token and latent, forced text, sampling generator). `tick()` fuses every
row's inputs, runs the backbone once for all rows, then the text head and the speak head (all
Euler steps) once for all rows. Text-only insertions are prefilled into one row without touching
the others. The in-process `Session` is this engine with one row; the backbone stage serves many.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .model.michi import MichiModel
from .model.tokenizer import StreamVocab


@dataclass
class TickInput:
    user_latent: torch.Tensor  # [D] raw listen latent
    user_tokens: Sequence[int] = ()
    forced_latent: torch.Tensor | None = None  # [D] raw: teacher-force the agent's audio this tick


@dataclass
class TickOutput:
    agent_token: int
    agent_latent: torch.Tensor  # [D] raw, what the vocoder decodes


@dataclass
class HistoryTick:
    """What a tick was, enough to rebuild a row by replay (the gateway stores these)."""

    user_latent: torch.Tensor
    user_tokens: Sequence[int]
    agent_token: int
    agent_latent: torch.Tensor  # raw


@dataclass
class _Row:
    generator: torch.Generator
    agent_token: int
    agent_latent: torch.Tensor  # [D] normalised
    text_temperature: float
    top_k: int
    audio_temperature: float
    max_pad_ticks: int
    forced_text: deque = field(default_factory=deque)
    prompt_latents: deque = field(default_factory=deque)  # normalised
    pad_run: int = 0


class BackboneEngine:
    def __init__(self, model: MichiModel, rows: int = 1, euler_steps: int | None = None,
                 cfg_scale: float | None = None):
        self.model = model
        self.vocab = StreamVocab(model.cfg.backbone.vocab_size)
        self.device = next(model.parameters()).device
        self.cache = model.backbone.init_state(rows).cache
        self.rows: list[_Row | None] = [None] * rows
        self.index: dict[str, int] = {}
        self.flow = dict(steps=euler_steps, cfg_scale=cfg_scale)

    # ---- calls ----------------------------------------------------------------------------------
    def open(self, key: str, seed: int = 0, text_temperature: float = 0.8, top_k: int = 50,
             audio_temperature: float | None = None, max_pad_ticks: int = 2) -> int:
        if key in self.index:
            raise KeyError(f"call {key!r} is already open")
        if None not in self.rows:
            self.cache.add_rows(len(self.rows))
            self.rows += [None] * len(self.rows)
        row = self.rows.index(None)
        self.cache.reset_row(row)
        temp = self.model.cfg.speak_head.temperature if audio_temperature is None else audio_temperature
        self.rows[row] = _Row(torch.Generator(device=self.device).manual_seed(seed), self.vocab.pad,
                              torch.zeros(self.model.cfg.latent_dim, device=self.device),
                              text_temperature, top_k, temp, max_pad_ticks)
        self.index[key] = row
        return row

    def close(self, key: str) -> None:
        row = self.index.pop(key, None)
        if row is not None:
            self.rows[row] = None
            self.cache.reset_row(row)

    def position(self, key: str) -> int:
        return int(self.cache.lengths[self.index[key]])

    def live(self) -> int:
        return len(self.index)

    def force_text(self, key: str, tokens: Iterable[int]) -> None:
        self.rows[self.index[key]].forced_text.extend(tokens)

    def forced_pending(self, key: str) -> int:
        return len(self.rows[self.index[key]].forced_text)

    def prompt_latents(self, key: str, latents: torch.Tensor) -> None:
        """Teacher-force the agent's audio for the next ticks (raw latents [n, D])."""
        norm = self.model.latent_norm.normalize(latents.to(self.device))
        self.rows[self.index[key]].prompt_latents.extend(norm)

    # ---- text -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def insert_text(self, key: str, tokens: Sequence[int]) -> torch.Tensor | None:
        """Prefill text-only positions into this call's row; returns the last hidden state."""
        if not tokens:
            return None
        ids = torch.tensor([list(tokens)], device=self.device)
        backbone = self.model.backbone
        return backbone.cached_forward(backbone.embed_text(ids), self.cache, row=self.index[key])[:, -1]

    def generate_text(self, key: str, prompt: Sequence[int], max_tokens: int) -> list[int]:
        """The backbone as a plain LM on text-only positions, until EOS."""
        return list(self.text_stream(key, prompt, max_tokens))

    @torch.inference_mode()
    def text_stream(self, key: str, prompt: Sequence[int], max_tokens: int) -> Iterator[int]:
        """`generate_text` one token per `next()` (one forward pass each), so that a scheduler can
        run the other calls' ticks between tokens."""
        r = self.rows[self.index[key]]
        v, backbone = self.vocab, self.model.backbone
        not_eos = torch.arange(v.base, v.size, device=self.device) != v.eos
        hidden = self.insert_text(key, list(prompt) or [v.bos])
        for _ in range(max_tokens):
            logits = backbone.text_logits(hidden)
            logits[:, v.base:] = logits[:, v.base:].masked_fill(not_eos, float("-inf"))  # text or end
            token = int(sample_token(logits, r.text_temperature, r.top_k, r.generator)[0])
            if token == v.eos:
                return
            yield token
            hidden = self.insert_text(key, [token])

    # ---- ticks ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def tick(self, inputs: dict[str, TickInput], lap: Callable[[str], None] = lambda name: None
             ) -> dict[str, TickOutput]:
        """One batched forward for every call in `inputs`; rows not in it sit this tick out."""
        m, v = self.model, self.vocab
        n_rows, dim = len(self.rows), m.cfg.latent_dim
        active = [self.index[key] for key in inputs]
        slots = max([1] + [len(x.user_tokens) for x in inputs.values()])
        agent_text = torch.full((n_rows,), v.pad, dtype=torch.long)
        agent_latent = torch.zeros(n_rows, dim, device=self.device)
        user_latent = torch.zeros(n_rows, dim, device=self.device)
        user_text = torch.full((n_rows, slots), -1, dtype=torch.long)
        for row, x in zip(active, inputs.values()):
            state = self.rows[row]
            agent_text[row] = state.agent_token
            agent_latent[row] = state.agent_latent
            user_latent[row] = x.user_latent.to(self.device)
            user_text[row, : len(x.user_tokens)] = torch.as_tensor(list(x.user_tokens), dtype=torch.long)
        advance = torch.zeros(n_rows, dtype=torch.bool)
        advance[active] = True
        fused = m.backbone.embed_tick(agent_text.to(self.device), agent_latent,
                                      m.latent_norm.normalize(user_latent), user_text.to(self.device))
        hidden = m.backbone.cached_forward(fused, self.cache, advance=advance)[active, -1]
        lap("backbone")
        logits = m.backbone.text_logits(hidden)
        tokens = [self._next_token(self.rows[row], logits[i:i + 1]) for i, row in enumerate(active)]
        lap("text_head")
        noise = torch.stack([self.rows[row].audio_temperature * torch.randn(
            dim, generator=self.rows[row].generator, device=self.device) for row in active])
        latents = m.speak_head.sample(hidden, noise=noise, **self.flow)
        outputs = {}
        for i, (key, x) in enumerate(inputs.items()):
            state = self.rows[active[i]]
            latent = latents[i]
            if x.forced_latent is not None:
                latent = m.latent_norm.normalize(x.forced_latent.to(self.device))
            elif state.prompt_latents:
                latent = state.prompt_latents.popleft()
            state.agent_token, state.agent_latent = tokens[i], latent
            outputs[key] = TickOutput(tokens[i], m.latent_norm.denormalize(latent))
        lap("speak_head")
        return outputs

    def _next_token(self, r: _Row, logits: torch.Tensor) -> int:
        v = self.vocab
        token = int(sample_token(logits, r.text_temperature, r.top_k, r.generator)[0])
        if r.forced_text and (v.is_text(token) or token == v.epad or r.pad_run >= r.max_pad_ticks):
            token = r.forced_text.popleft()  # the model asks for text (or waited long enough)
        r.pad_run = r.pad_run + 1 if token == v.pad else 0
        return token

    # ---- rebuild ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def replay(self, key: str, history: Iterable[HistoryTick | Sequence[int]]) -> int:
        """Rebuild a call's row from its history (ticks and text insertions, in order) in one
        prefill: each tick is re-read with the agent outputs it really had. Returns ticks replayed."""
        m = self.model
        r = self.rows[self.index[key]]
        positions, ticks = [], 0
        for item in history:
            if isinstance(item, HistoryTick):
                user_tokens = torch.tensor([list(item.user_tokens) or [-1]], device=self.device)
                positions.append(m.backbone.embed_tick(
                    torch.tensor([r.agent_token], device=self.device), r.agent_latent[None],
                    m.latent_norm.normalize(item.user_latent.to(self.device))[None], user_tokens))
                r.agent_token = item.agent_token
                r.agent_latent = m.latent_norm.normalize(item.agent_latent.to(self.device))
                ticks += 1
            else:
                positions.append(m.backbone.embed_text(torch.tensor([list(item)], device=self.device)))
        if positions:
            m.backbone.cached_forward(torch.cat(positions, dim=1), self.cache, row=self.index[key])
        return ticks


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0]
