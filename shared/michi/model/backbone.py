"""The backbone: a Llama-family causal LM that reads one fused position per 80 ms tick.

A tick position is the SUM of the embeddings of the four streams at that tick (agent text token,
agent audio latent, user audio latent, user text tokens). Text-only positions (prompts, documents,
tool results) are plain token embeddings, exactly what a pretrained LM was trained on, and can sit
between ticks: the KV cache does not care which kind of position it holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..config import BackboneConfig, MichiConfig
from .phonemes import FRAMES_PER_TICK, NO_PHONE, NUM_PHONEME_IDS
from .streaming import StreamingModule, StreamingState
from .tokenizer import NUM_STREAM_TOKENS, StreamVocab


def llama_config(b: BackboneConfig) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=b.hidden_size, num_hidden_layers=b.num_layers, num_attention_heads=b.num_heads,
        num_key_value_heads=b.num_kv_heads, intermediate_size=b.ffn_size, vocab_size=b.vocab_size,
        rope_theta=b.rope_theta, rms_norm_eps=b.rms_norm_eps, max_position_embeddings=b.max_positions,
        tie_word_embeddings=b.tie_embeddings,
    )


def backbone_config_from_hf(path: str | Path) -> BackboneConfig:
    """Read the shape of a local Hugging Face Llama-family checkpoint directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    hf = json.loads(cfg_file.read_text())
    if hf.get("model_type") not in {"llama", "mistral", "qwen2"} and "Llama" not in str(hf.get("architectures")):
        raise ValueError(f"{path}: model_type {hf.get('model_type')!r} is not a Llama-family causal LM")
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
    return BackboneConfig(
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        ffn_size=hf["intermediate_size"], vocab_size=hf["vocab_size"], rope_theta=float(rope),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5), max_positions=hf.get("max_position_embeddings", 8192),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        tokenizer=str(path) if has_tokenizer else "bytes", hf_path=str(path),
    )


class KVCache(StreamingState):
    """Keys and values of every layer for a batch of independent rows (calls), each with its own
    length, in buffers of doubling capacity.

    An append writes only the new positions (amortised O(1) per tick); transformers' DynamicCache
    concatenates the whole cache at every step instead, which for the full-size backbone is about
    300 MB copied per tick after five minutes of call. Rows are what lets one forward pass carry
    the ticks of many calls; rows are freed and reused with `reset(mask)`."""

    def __init__(self, num_layers: int, rows: int = 1):
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = torch.zeros(rows, dtype=torch.long)  # on the CPU: read every step

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add_rows(self, count: int) -> None:
        self.lengths = torch.cat([self.lengths, torch.zeros(count, dtype=torch.long)])
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i] = torch.cat([k, k.new_zeros(count, *k.shape[1:])])
                self.values[i] = torch.cat([v, v.new_zeros(count, *v.shape[1:])])

    def reset_own(self, mask: torch.Tensor) -> None:
        """Empty the masked rows [rows] bool: a length of 0 hides whatever their buffers hold."""
        self.lengths = self.lengths.masked_fill(mask.to(self.lengths.device), 0)

    def reserve(self, layer: int, like: torch.Tensor, total: int) -> None:
        """Room for `total` positions in every row of this layer (like: [*, kv_heads, *, head_dim])."""
        k = self.keys[layer]
        if k is not None and total <= k.shape[-2]:
            return
        shape = (self.rows, like.shape[1], max(64, 2 * total), like.shape[-1])
        new_k, new_v = like.new_zeros(shape), like.new_zeros(shape)
        if k is not None:
            new_k[..., : k.shape[-2], :] = k
            new_v[..., : k.shape[-2], :] = self.values[layer]
        self.keys[layer], self.values[layer] = new_k, new_v


@dataclass
class BackboneState(StreamingState):
    """The KV cache of a batch of rows (calls); `length` counts row 0's positions (ticks and
    text-only) seen."""

    cache: KVCache

    @property
    def length(self) -> int:
        return int(self.cache.lengths[0])


class Backbone(StreamingModule, nn.Module):
    def __init__(self, cfg: MichiConfig, load_pretrained: bool = True):
        super().__init__()
        b = cfg.backbone
        self.cfg = b
        self.vocab = StreamVocab(b.vocab_size)
        if b.hf_path and load_pretrained:
            self.lm = LlamaForCausalLM.from_pretrained(b.hf_path, local_files_only=True, dtype=torch.float32)
        else:
            self.lm = LlamaForCausalLM(llama_config(b))
        hidden = b.hidden_size
        # Stream tokens live outside the pretrained vocabulary (see tokenizer.py).
        self.stream_embed = nn.Embedding(NUM_STREAM_TOKENS, hidden)
        self.stream_head = nn.Linear(hidden, NUM_STREAM_TOKENS, bias=False)
        nn.init.normal_(self.stream_embed.weight, std=0.02)
        nn.init.normal_(self.stream_head.weight, std=0.02)
        self.agent_latent_in = nn.Linear(cfg.latent_dim, hidden) if cfg.agent_feedback else None
        self.user_latent_in = nn.Linear(cfg.latent_dim, hidden)
        # Tells user text apart from agent text, which share the token table.
        self.user_text_tag = nn.Parameter(torch.zeros(hidden))
        self.phone_slots, self.phone_frames = cfg.phone_slots, cfg.phone_frames
        self.phone_width = cfg.phone_width  # 0: no phoneme stream
        if self.phone_frames:
            # The agent's phoneme stream as frame labels (model.phonemes): one table row per frame
            # position, phoneme and start flag, so the sum keeps which phoneme sounds where; the
            # next one waiting; and the advance head: per frame of the next tick, does one begin.
            self.phone_embed = nn.Embedding(FRAMES_PER_TICK * 2 * NUM_PHONEME_IDS, hidden)
            self.next_phone_embed = nn.Embedding(NUM_PHONEME_IDS, hidden, padding_idx=NO_PHONE)
            self.phone_head = nn.Linear(hidden, FRAMES_PER_TICK)
            nn.init.normal_(self.phone_embed.weight, std=0.02 / FRAMES_PER_TICK ** 0.5)
            nn.init.normal_(self.next_phone_embed.weight, std=0.02)
            with torch.no_grad():
                self.next_phone_embed.weight[NO_PHONE].zero_()
        elif self.phone_slots:
            # The agent's phoneme stream as slots: this tick's phonemes (one row per slot,
            # so their order counts), the next one waiting, and the advance head: how many
            # phonemes the next tick takes (0..slots).
            self.phone_embed = nn.Embedding(NUM_PHONEME_IDS, hidden, padding_idx=NO_PHONE)
            self.phone_slot = nn.Parameter(torch.zeros(self.phone_slots, hidden))
            self.next_phone_embed = nn.Embedding(NUM_PHONEME_IDS, hidden, padding_idx=NO_PHONE)
            self.phone_head = nn.Linear(hidden, self.phone_slots + 1)
            for table in (self.phone_embed, self.next_phone_embed):
                nn.init.normal_(table.weight, std=0.02)
                with torch.no_grad():
                    table.weight[NO_PHONE].zero_()

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def init_state(self, batch_size: int = 1, device=None, dtype: torch.dtype = torch.float32, *,
                   rows: int | None = None) -> BackboneState:
        """An empty cache of `batch_size` (alias `rows`) rows; its buffers take the device and dtype
        of the first positions stepped."""
        return BackboneState(cache=KVCache(self.cfg.num_layers, batch_size if rows is None else rows))

    def step(self, x: torch.Tensor, state: BackboneState,
             exec_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, BackboneState]:
        """Positions [B, n, H], one block per row, each row at its own length -> hidden [B, n, H].
        Rows where `exec_mask` is False are computed and forgotten (their length stays)."""
        return self.cached_forward(x, state.cache, advance=exec_mask), state

    # ---- inputs -------------------------------------------------------------------------------
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (base vocabulary or stream tokens) -> embeddings, any shape."""
        base = self.vocab.base
        is_stream = ids >= base
        text = self.lm.model.embed_tokens(ids.clamp(0, base - 1))
        stream = self.stream_embed((ids - base).clamp(0, NUM_STREAM_TOKENS - 1))
        return torch.where(is_stream.unsqueeze(-1), stream, text)

    def embed_tick(self, agent_text: torch.Tensor, agent_latent: torch.Tensor, user_latent: torch.Tensor,
                   user_text: torch.Tensor, phones: torch.Tensor | None = None,
                   next_phone: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse one tick per row: agent_text [B], latents [B, D] (normalised), user_text [B, S]
        (-1 = no token), and with a phoneme stream phones [B, slots] and next_phone [B]
        (NO_PHONE = none; both absent = none), or with frame labels phones [B, 8] -> [B, 1, H]."""
        present = (user_text >= 0).unsqueeze(-1).to(agent_latent.dtype)
        user_text_emb = ((self.embed_text(user_text.clamp(min=0)) + self.user_text_tag) * present).sum(1)
        fused = self.embed_text(agent_text) + self.user_latent_in(user_latent) + user_text_emb
        if self.agent_latent_in is not None:
            fused = fused + self.agent_latent_in(agent_latent)
        if self.phone_width and phones is not None:
            fused = fused + self.embed_phones(phones, next_phone)
        return fused.unsqueeze(1)

    def embed_phones(self, phones: torch.Tensor, next_phone: torch.Tensor) -> torch.Tensor:
        """phones [..., slots] or frame labels [..., 8], next_phone [...] -> [..., H]."""
        if self.phone_frames:
            rows = torch.arange(FRAMES_PER_TICK, device=phones.device) * (2 * NUM_PHONEME_IDS) + phones
            return self.phone_embed(rows).sum(-2) + self.next_phone_embed(next_phone)
        phones = phones[..., : self.phone_slots]
        slot = self.phone_slot[: phones.shape[-1]] * (phones != NO_PHONE).unsqueeze(-1).to(self.phone_slot.dtype)
        return (self.phone_embed(phones) + slot).sum(-2) + self.next_phone_embed(next_phone)

    # ---- the LM -------------------------------------------------------------------------------
    def forward(self, embeds: torch.Tensor, state: BackboneState | None = None) -> torch.Tensor:
        """[B, L, H] positions -> last hidden states [B, L, H]. Without a state this is transformers'
        own full forward from position 0; with one, positions continue the state's KV cache."""
        if state is None:
            return self.lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self.cached_forward(embeds, state.cache)

    def cached_forward(self, x: torch.Tensor, cache: KVCache, row: int | None = None,
                       advance: torch.Tensor | None = None) -> torch.Tensor:
        """The serving path: the same Llama modules and weights as the full forward, without
        transformers' generic cache and mask machinery (most of a small model's step time).
        Tests hold it equal to the full forward.

        row=None: x [rows, n, H], one block of positions for every row of the cache, each row at
        its own length (a batched tick of all live calls). `advance` [rows] bool says which rows
        really move on; the others (idle or free rows) are computed and forgotten.
        row=r: x [1, n, H] for that row only (text prefill of one call, others untouched)."""
        model = self.lm.model
        batch, n = x.shape[:2]
        lengths = cache.lengths if row is None else cache.lengths[row:row + 1]
        if len(lengths) != batch:
            raise ValueError(f"{batch} input rows for {len(lengths)} cache rows")
        offsets = torch.arange(n)
        positions = (lengths[:, None] + offsets).to(x.device)  # [B, n]
        total = int(lengths.max()) + n
        same_length = batch == 1 or bool((lengths == lengths[0]).all())
        mask = None  # one position at a common length sees every key so far: no mask, fast path
        if n > 1 or not same_length:  # query i of row b sees keys up to its own position
            mask = (torch.arange(total)[None, None, :] <= (lengths[:, None] + offsets)[:, :, None])
            mask = mask[:, None].to(x.device)  # [B, 1, n, total]
        start = int(lengths[0])
        cos, sin = model.rotary_emb(x, positions)
        rows = slice(None) if row is None else slice(row, row + 1)
        batch_index = torch.arange(batch, device=x.device)[:, None]
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, n, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, n, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, n, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.reserve(i, k, total)
            keys, values = cache.keys[i][rows], cache.values[i][rows]
            if same_length:  # a plain slice write
                keys[:, :, start:start + n] = k
                values[:, :, start:start + n] = v
            else:  # each row at its own position
                keys[batch_index, :, positions] = k.transpose(1, 2)
                values[batch_index, :, positions] = v.transpose(1, 2)
            o = F.scaled_dot_product_attention(q, keys[..., :total, :], values[..., :total, :], attn_mask=mask,
                                               scale=attn.scaling, enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(batch, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if row is not None:
            cache.lengths[row] += n
        else:
            cache.lengths += n if advance is None else advance.to(torch.long).cpu() * n
        return model.norm(x)

    def phone_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The advance head. Slots: how many phonemes the next tick takes, logits over 0..slots.
        Frames: per frame of the next tick, the logit that a phoneme begins there."""
        return self.phone_head(hidden)

    def phone_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """The advance head's answer as the phoneme queue reads it (`model.phonemes`)."""
        logits = self.phone_head(hidden).float()
        return logits.sigmoid() if self.phone_frames else logits.softmax(-1)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the base vocabulary followed by the stream tokens."""
        return torch.cat([self.lm.lm_head(hidden), self.stream_head(hidden)], dim=-1)
