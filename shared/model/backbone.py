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
from torch import nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..config import BackboneConfig, MichiConfig
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


class KVCache:
    """Keys and values of every layer, appended into buffers of doubling capacity.

    An append writes only the new positions (amortised O(1) per tick); transformers' DynamicCache
    concatenates the whole cache at every step instead, which for the full-size backbone is about
    300 MB copied per tick after five minutes of call."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, kv_heads, L, head_dim] at positions length..length+L -> all keys and values so far
        (views). The caller advances `length` once every layer has appended."""
        end = self.length + k.shape[-2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or end > buf_k.shape[-2]:
            shape = (*k.shape[:-2], max(64, 2 * end), k.shape[-1])
            new_k, new_v = k.new_empty(shape), v.new_empty(shape)
            if buf_k is not None:
                new_k[..., : self.length, :] = buf_k[..., : self.length, :]
                new_v[..., : self.length, :] = buf_v[..., : self.length, :]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[..., self.length:end, :] = k
        buf_v[..., self.length:end, :] = v
        return buf_k[..., :end, :], buf_v[..., :end, :]


@dataclass
class BackboneState:
    """Per-session KV cache; `length` counts positions (ticks and text-only) seen so far."""

    cache: KVCache

    @property
    def length(self) -> int:
        return self.cache.length


class Backbone(nn.Module):
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
        self.agent_latent_in = nn.Linear(cfg.latent_dim, hidden)
        self.user_latent_in = nn.Linear(cfg.latent_dim, hidden)
        # Tells user text apart from agent text, which share the token table.
        self.user_text_tag = nn.Parameter(torch.zeros(hidden))

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def init_state(self) -> BackboneState:
        return BackboneState(cache=KVCache(self.cfg.num_layers))

    # ---- inputs -------------------------------------------------------------------------------
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (base vocabulary or stream tokens) -> embeddings, any shape."""
        base = self.vocab.base
        is_stream = ids >= base
        text = self.lm.model.embed_tokens(ids.clamp(0, base - 1))
        stream = self.stream_embed((ids - base).clamp(0, NUM_STREAM_TOKENS - 1))
        return torch.where(is_stream.unsqueeze(-1), stream, text)

    def embed_tick(self, agent_text: torch.Tensor, agent_latent: torch.Tensor, user_latent: torch.Tensor,
                   user_text: torch.Tensor) -> torch.Tensor:
        """Fuse one tick per row: agent_text [B], latents [B, D] (normalised), user_text [B, S]
        (-1 = no token) -> [B, 1, H]."""
        present = (user_text >= 0).unsqueeze(-1).to(agent_latent.dtype)
        user_text_emb = ((self.embed_text(user_text.clamp(min=0)) + self.user_text_tag) * present).sum(1)
        fused = (self.embed_text(agent_text) + self.agent_latent_in(agent_latent)
                 + self.user_latent_in(user_latent) + user_text_emb)
        return fused.unsqueeze(1)

    # ---- the LM -------------------------------------------------------------------------------
    def forward(self, embeds: torch.Tensor, state: BackboneState | None = None) -> torch.Tensor:
        """[B, L, H] positions -> last hidden states [B, L, H]. Without a state this is transformers'
        own full forward from position 0; with one, positions continue the state's KV cache."""
        if state is None:
            return self.lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self._cached_forward(embeds, state.cache)

    def _cached_forward(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The per-tick path: the same Llama modules and weights as the full forward, without
        transformers' generic cache and mask machinery (most of a tiny model's step time).
        Tests hold it equal to the full forward."""
        model = self.lm.model
        batch, n = x.shape[:2]
        start = cache.length
        positions = torch.arange(start, start + n, device=x.device).unsqueeze(0)
        cos, sin = model.rotary_emb(x, positions)
        mask = None
        if n > 1:  # position start+i sees the cache and new positions up to itself
            mask = (torch.arange(start + n, device=x.device)[None, :]
                    <= torch.arange(start, start + n, device=x.device)[:, None])
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, n, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, n, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, n, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = cache.append(i, k, v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(batch, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.length += n
        return model.norm(x)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the base vocabulary followed by the stream tokens."""
        return torch.cat([self.lm.lm_head(hidden), self.stream_head(hidden)], dim=-1)
