"""The backbone: a Llama-family causal LM that reads one fused position per 80 ms tick.

A tick position is the SUM of the embeddings of the four streams at that tick (agent text token,
agent audio latent, user audio latent, user text tokens). Text-only positions (prompts, documents,
tool results) are plain token embeddings, exactly what a pretrained LM was trained on, and can sit
between ticks: the KV cache does not care which kind of position it holds.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LlamaModel

from ..config import BackboneConfig, MichiConfig
from .tokenizer import NUM_STREAM_TOKENS, StreamVocab


# transformers renamed `past_key_values` to `cache` in 5.2x; accept both, so the GPU image's
# older transformers runs the same code.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


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


@dataclass
class BackboneState:
    """Per-session KV cache; `length` counts positions (ticks and text-only) seen so far."""

    cache: DynamicCache
    length: int = 0
    meta: dict = field(default_factory=dict)


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
        return BackboneState(cache=DynamicCache(config=self.lm.config))

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
        """[B, L, H] positions -> last hidden states [B, L, H]. With a state, positions continue its
        KV cache (and extend it); without one, this is a plain full forward from position 0."""
        start = state.length if state is not None else 0
        positions = torch.arange(start, start + embeds.shape[1], device=embeds.device).unsqueeze(0)
        cache = {_CACHE_KWARG: state.cache} if state is not None else {}
        out = self.lm.model(inputs_embeds=embeds, position_ids=positions, use_cache=state is not None, **cache)
        if state is not None:
            state.length += embeds.shape[1]
        return out.last_hidden_state

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the base vocabulary followed by the stream tokens."""
        return torch.cat([self.lm.lm_head(hidden), self.stream_head(hidden)], dim=-1)
