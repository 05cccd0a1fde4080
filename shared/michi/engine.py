"""The backbone engine: the ticks of many calls in ONE forward pass.

Each call owns a row of a shared KV cache (`KVCache` rows, each at its own length; `Backbone.step`
with an exec mask advances the live rows only, `reset(mask)` frees rows) and its own
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
from .model.phonemes import NO_PHONE, FrameQueue, PhonemeQueue
from .model.tokenizer import StreamVocab, load_tokenizer


@dataclass
class TickInput:
    user_latent: torch.Tensor  # [D] raw listen latent
    user_tokens: Sequence[int] = ()
    forced_latent: torch.Tensor | None = None  # [D] raw: teacher-force the agent's audio this tick


@dataclass
class TickOutput:
    agent_token: int
    agent_latent: torch.Tensor  # [D] raw, what the vocoder decodes
    phones: Sequence[int] = ()  # the agent phonemes this tick read (models with a phoneme stream)
    next_phone: int = NO_PHONE


@dataclass
class HistoryTick:
    """What a tick was, enough to rebuild a row by replay (the gateway stores these)."""

    user_latent: torch.Tensor
    user_tokens: Sequence[int]
    agent_token: int
    agent_latent: torch.Tensor  # raw
    phones: Sequence[int] = ()  # the agent phonemes the tick read (() : none)
    next_phone: int = NO_PHONE


@dataclass
class _Row:
    """A call's sampling settings and queues; its last agent token and latent live in the engine's
    row tensors. Its random numbers come from its own CPU generator, so a call samples the same
    whatever else shares its batch, and no device generator is called once per row."""

    generator: torch.Generator
    text_temperature: float
    top_k: int
    audio_temperature: float
    max_pad_ticks: int
    forced_text: deque = field(default_factory=deque)
    held_words: deque = field(default_factory=deque)  # forced words (token lists) not yet due
    pad_run: int = 0
    phonemes: PhonemeQueue | None = None  # models with a phoneme stream


class BackboneEngine:
    def __init__(self, model: MichiModel, rows: int = 1, euler_steps: int | None = None,
                 cfg_scale: float | None = None):
        self.model = model
        self.vocab = StreamVocab(model.cfg.backbone.vocab_size)
        self.device = next(model.parameters()).device
        self.state = model.backbone.init_state(rows)  # the streaming state: one KV cache row per call
        self.cache = self.state.cache
        self.rows: list[_Row | None] = [None] * rows
        # each row's last agent token and (normalised) latent: the agent half of its next input
        self.agent_tokens = torch.full((rows,), self.vocab.pad, dtype=torch.long)
        self.agent_latents = torch.zeros(rows, model.cfg.latent_dim, device=self.device,
                                         dtype=next(model.parameters()).dtype)
        self.index: dict[str, int] = {}
        self.flow = dict(steps=euler_steps, cfg_scale=cfg_scale)
        self.phone_width = model.cfg.phone_width  # phoneme inputs a tick reads (0: no stream)
        if self.phone_width:
            b = model.cfg.backbone
            self.decode = load_tokenizer(b.tokenizer, b.vocab_size).decode

    # ---- calls ----------------------------------------------------------------------------------
    def open(self, key: str, seed: int = 0, text_temperature: float = 0.8, top_k: int = 50,
             audio_temperature: float | None = None, max_pad_ticks: int = 2) -> int:
        if key in self.index:
            raise KeyError(f"call {key!r} is already open")
        if None not in self.rows:
            grow = len(self.rows)
            self.cache.add_rows(grow)
            self.rows += [None] * grow
            self.agent_tokens = torch.cat([self.agent_tokens, self.agent_tokens.new_zeros(grow)])
            self.agent_latents = torch.cat([self.agent_latents, self.agent_latents.new_zeros(grow, self.agent_latents.shape[1])])
        row = self.rows.index(None)
        self.cache.reset(self._row_mask(row))
        self.agent_tokens[row] = self.vocab.pad
        self.agent_latents[row] = 0.0
        temp = self.model.cfg.speak_head.temperature if audio_temperature is None else audio_temperature
        self.rows[row] = _Row(torch.Generator().manual_seed(seed), text_temperature, top_k, temp, max_pad_ticks,
                              phonemes=self._phoneme_queue())
        self.index[key] = row
        return row

    def _row_mask(self, row: int) -> torch.Tensor:
        mask = torch.zeros(self.cache.rows, dtype=torch.bool)
        mask[row] = True
        return mask

    def _phoneme_queue(self) -> PhonemeQueue | None:
        cfg = self.model.cfg
        if cfg.phone_frames:
            durations = self.model.durations
            return FrameQueue(self.decode, durations=durations.frames if durations is not None else None)
        return PhonemeQueue(self.decode, cfg.phone_slots) if cfg.phone_slots else None

    @torch.no_grad()
    def warm_up(self, tokens: Sequence[int], ticks: int = 4) -> None:
        """Pay the first call's one-time costs now (the phonemizer's load, the duration predictor's
        and every module's first pass), not on a live call's tick: a throwaway row says `tokens`."""
        key = "__warm_up__"
        self.open(key)
        try:
            self.force_text(key, tokens)
            silence = torch.zeros(self.model.cfg.latent_dim)
            for _ in range(ticks):
                self.tick({key: TickInput(silence)})
        finally:
            self.close(key)

    def close(self, key: str) -> None:
        row = self.index.pop(key, None)
        if row is not None:
            self.rows[row] = None
            self.cache.reset(self._row_mask(row))

    def position(self, key: str) -> int:
        return int(self.cache.lengths[self.index[key]])

    def live(self) -> int:
        return len(self.index)

    def force_text(self, key: str, tokens: Iterable[int]) -> None:
        """Queue text for the agent to say. With a phoneme stream its words' phonemes are queued
        now, whole, and each word's text is held until its sound is due (`PhonemeQueue.words_due`)."""
        r = self.rows[self.index[key]]
        tokens = list(tokens)
        if r.phonemes is None:
            r.forced_text.extend(tokens)
            return
        r.phonemes.add_text(self.decode([t for t in tokens if self.vocab.is_text(t)]), forced=True)
        r.held_words.extend(self._words(tokens))

    def _words(self, tokens: list[int]) -> list[list[int]]:
        """Tokens grouped into whitespace-separated words, each with the spaces before it (the words
        `PhonemeQueue.add_text` phonemizes)."""
        words: list[list[int]] = []
        spoken = False  # the current word has more than spaces
        for t in tokens:
            piece = self.decode([t]) if self.vocab.is_text(t) else ""
            if not words or (spoken and piece[:1].isspace()):
                words.append([])
                spoken = False
            words[-1].append(t)
            spoken = spoken or bool(piece.strip())
        if len(words) > 1 and not spoken:  # trailing spaces belong to the last word
            words[-2] += words.pop()
        return words

    def forced_pending(self, key: str) -> int:
        r = self.rows[self.index[key]]
        return len(r.forced_text) + sum(map(len, r.held_words))

    def phones_pending(self, key: str) -> int:
        """Phonemes of the forced text not yet spoken (0 for a model without a phoneme stream);
        the agent's own words queued after them do not count."""
        q = self.rows[self.index[key]].phonemes
        return q.forced if q is not None else 0

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
            token = int(sample_tokens(logits, [r.text_temperature], [r.top_k], [r.generator])[0])
            if token == v.eos:
                return
            yield token
            hidden = self.insert_text(key, [token])

    # ---- ticks ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def tick(self, inputs: dict[str, TickInput], lap: Callable[[str], None] = lambda name: None
             ) -> dict[str, TickOutput]:
        """One batched forward for every call in `inputs`; rows not in it sit this tick out."""
        m = self.model
        n_rows, dim = len(self.rows), m.cfg.latent_dim
        active = [self.index[key] for key in inputs]
        rows = [self.rows[row] for row in active]
        xs = list(inputs.values())
        # Every row's input in a few whole-batch ops: no per-row writes into device tensors.
        slots = max([1] + [len(x.user_tokens) for x in xs])
        user_text = torch.tensor([list(x.user_tokens) + [-1] * (slots - len(x.user_tokens)) for x in xs],
                                 dtype=torch.long)
        user_latent = torch.stack([x.user_latent.float().cpu() for x in xs])
        everyone = active == list(range(n_rows))  # the usual round: every row is a live call that ticks
        index = slice(None) if everyone else torch.tensor(active, dtype=torch.long)
        advance = None
        if not everyone:  # idle and free rows are computed and forgotten
            user_text = torch.full((n_rows, slots), -1, dtype=torch.long).index_copy_(0, index, user_text)
            user_latent = torch.zeros(n_rows, dim).index_copy_(0, index, user_latent)
            advance = torch.zeros(n_rows, dtype=torch.bool).index_fill_(0, index, True)
        device_index = index if everyone else index.to(self.device)
        taken, phones, next_phone = self._tick_phonemes(rows, index)
        fused = m.backbone.embed_tick(self.agent_tokens.to(self.device), self.agent_latents,
                                      m.latent_norm.normalize(user_latent.to(self.device)), user_text.to(self.device),
                                      phones, next_phone)
        hidden = m.backbone.step(fused, self.state, exec_mask=advance)[0][device_index, -1]
        lap("backbone")
        sampled = sample_tokens(m.backbone.text_logits(hidden), [r.text_temperature for r in rows],
                                [r.top_k for r in rows], [r.generator for r in rows]).tolist()
        for r in rows:  # forced words whose sound is due may now be said
            for _ in range(r.phonemes.words_due() if r.phonemes is not None else 0):
                r.forced_text.extend(r.held_words.popleft() if r.held_words else [])
        tokens = [self._forced_text(r, token) for r, token in zip(rows, sampled)]
        if self.phone_width:
            for r, probs in zip(rows, m.backbone.phone_probs(hidden).tolist()):
                r.phonemes.pace(probs)
        lap("text_head")
        noise = torch.stack([torch.randn(dim, generator=r.generator) for r in rows])
        temps = [r.audio_temperature for r in rows]
        noise = noise * (temps[0] if len(set(temps)) == 1 else torch.tensor(temps)[:, None])
        latents = m.speak_head.sample(hidden, noise=noise.to(self.device), **self.flow)
        for i, x in enumerate(xs):  # teacher-forced audio (the one path: TickInput.forced_latent)
            if x.forced_latent is not None:
                latents[i] = m.latent_norm.normalize(x.forced_latent.to(self.device))
        self.agent_tokens[index] = torch.tensor(tokens, dtype=torch.long)
        self.agent_latents[device_index] = latents
        raw = m.latent_norm.denormalize(latents)
        if self.phone_width:
            outputs = {key: TickOutput(token, latent, tuple(p), n)
                       for key, token, latent, (p, n) in zip(inputs, tokens, raw, taken)}
        else:
            outputs = {key: TickOutput(token, latent) for key, token, latent in zip(inputs, tokens, raw)}
        lap("speak_head")
        return outputs

    def _tick_phonemes(self, rows: list[_Row], index) -> tuple[list, torch.Tensor | None, torch.Tensor | None]:
        """Each ticking row's phonemes for this tick, from its queue: (what each took, the phoneme
        inputs [n_rows, phone_width], the next-phoneme flags [n_rows]); Nones without a stream."""
        if not self.phone_width:
            return [], None, None
        taken = [r.phonemes.next_tick() for r in rows]
        phones = torch.full((len(self.rows), self.phone_width), NO_PHONE, dtype=torch.long)
        next_phone = torch.full((len(self.rows),), NO_PHONE, dtype=torch.long)
        phones[index] = torch.tensor([p for p, _ in taken], dtype=torch.long)
        next_phone[index] = torch.tensor([n for _, n in taken], dtype=torch.long)
        return taken, phones.to(self.device), next_phone.to(self.device)

    def _forced_text(self, r: _Row, token: int) -> int:
        """The sampled token, or the call's next forced text token when the model asks for text (or
        waited long enough)."""
        v = self.vocab
        if r.forced_text and (v.is_text(token) or token == v.epad or r.pad_run >= r.max_pad_ticks):
            token = r.forced_text.popleft()
        elif r.held_words and v.is_text(token):  # forced words wait for their sound: no own words now
            token = v.pad
        elif r.phonemes is not None:  # the agent's own text: its words are phonemized as they end
            r.phonemes.own_token(token, v.is_text(token))
        r.pad_run = r.pad_run + 1 if token == v.pad else 0
        return token

    # ---- rebuild ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def replay(self, key: str, history: Iterable[HistoryTick | Sequence[int]]) -> int:
        """Rebuild a call's row from its history (ticks and text insertions, in order) in one
        prefill: each tick is re-read with the agent outputs it really had. Returns ticks replayed."""
        m = self.model
        row = self.index[key]
        positions, ticks = [], 0
        for item in history:
            if isinstance(item, HistoryTick):
                user_tokens = torch.tensor([list(item.user_tokens) or [-1]], device=self.device)
                phones = next_phone = None
                if self.phone_width:
                    ids = list(item.phones)[: self.phone_width]
                    phones = torch.tensor([ids + [NO_PHONE] * (self.phone_width - len(ids))], device=self.device)
                    next_phone = torch.tensor([item.next_phone], device=self.device)
                positions.append(m.backbone.embed_tick(
                    self.agent_tokens[row:row + 1].to(self.device), self.agent_latents[row:row + 1],
                    m.latent_norm.normalize(item.user_latent.to(self.device))[None], user_tokens, phones, next_phone))
                self.agent_tokens[row] = item.agent_token
                self.agent_latents[row] = m.latent_norm.normalize(item.agent_latent.to(self.device))
                ticks += 1
            else:
                positions.append(m.backbone.embed_text(torch.tensor([list(item)], device=self.device)))
        if positions:
            m.backbone.cached_forward(torch.cat(positions, dim=1), self.cache, row=self.index[key])
        return ticks


def sample_tokens(logits: torch.Tensor, temperatures: Sequence[float], top_ks: Sequence[int],
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """logits [B, V] -> token ids [B], each row with its own temperature (0: greedy), top-k (0: all)
    and CPU generator. One uniform number per row from its generator, then inverse-CDF sampling
    for the whole batch at once."""
    vocab = logits.shape[-1]
    uniform = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)
    scaled = logits.float()
    if len(set(temperatures)) == 1:  # one temperature for all rows: a scalar, the usual case
        scaled = scaled / max(temperatures[0], 1e-6)
    else:
        scaled = scaled / torch.tensor(temperatures, dtype=torch.float32).clamp(min=1e-6).to(logits.device)[:, None]
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    if min(ks) < vocab:  # keep each row's k best
        best = torch.topk(scaled, max(ks), dim=-1).values
        kth = best[:, -1:] if len(set(ks)) == 1 else best.gather(1, torch.tensor(ks, device=logits.device)[:, None] - 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    cdf = torch.softmax(scaled, -1).cumsum(-1)
    u = uniform[:, None] * cdf[:, -1:]  # strictly below the total: never past the last token
    sampled = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=vocab - 1)
    greedy = [t <= 0 for t in temperatures]
    if any(greedy):
        sampled = torch.where(torch.tensor(greedy, device=logits.device), logits.argmax(-1), sampled)
    return sampled
