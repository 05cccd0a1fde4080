"""The floor of one tick: bytes that must be read and FLOPs that must be done, against a GPU's
memory bandwidth and matrix rate. No GPU needed: sizes come from the config, FLOPs of the conv
parts from torch's FlopCounterMode on meta tensors.

    michi bench --floor --presets full --json floor.json

Per tick, for B live calls at C positions of context each, in 16-bit weights and KV cache:
- backbone: every weight once (embedding lookups aside; a tied text head reads the table), plus every call's KV cache
  (layers x kv_heads x head_dim x 2 x 2 bytes per position); 2 x params x B FLOPs for the
  projections and the text head, 4 x layers x heads x head_dim x C x B for attention;
- speak head: its weights once per Euler step (x2 with classifier-free guidance), FLOPs measured;
- vocoder and listen encoder: one 80 ms frame per call, FLOPs measured, weights once.
The floor is the larger of bytes / bandwidth and FLOPs / matrix rate, summed over the parts run
one after another. Real kernels reach perhaps 60-80 % of either; launches and Python add more.
"""
from __future__ import annotations

from typing import Any

import torch

from .config import MichiConfig

BYTES = 2  # bf16 / fp16 weights and KV cache

# Vendor data-sheet figures: memory bandwidth (bytes/s) and dense 16-bit tensor-core rate (FLOP/s).
GPUS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bandwidth": 3.35e12, "matrix": 989e12},
    "H100 PCIe": {"bandwidth": 2.0e12, "matrix": 756e12},
    "H200": {"bandwidth": 4.8e12, "matrix": 989e12},
    "RTX 4090": {"bandwidth": 1.008e12, "matrix": 165e12},  # FP16 accumulate; half that with FP32 accumulate
}


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def part_sizes(cfg: MichiConfig) -> dict[str, Any]:
    """Parameters and per-call FLOPs of each part, from a model built on the meta device."""
    from .model.michi import MichiModel

    with torch.device("meta"):
        m = MichiModel(cfg, load_pretrained=False)
        counts = m.parameter_counts()
        frame = torch.zeros(1, cfg.frame_samples)
        vocoder = _flops(lambda: m.vocoder.step(torch.zeros(1, 1, cfg.latent_dim), m.vocoder.init_state(1, "meta")))
        listen = _flops(lambda: m.listen.step(frame, m.listen.init_state(1, "meta")))
        speak = _flops(lambda: m.speak_head.sample(torch.zeros(1, cfg.backbone.hidden_size),
                                                   noise=torch.zeros(1, cfg.latent_dim)))
        lm = m.backbone.lm
        # Embedding lookups read a few rows; a tied text head still reads the whole matrix.
        tied = lm.lm_head.weight is lm.model.embed_tokens.weight
        lookup_only = 0 if tied else lm.model.embed_tokens.weight.numel()
        lookup_only += m.backbone.stream_embed.weight.numel()
    return {"params": counts, "backbone_lookup_params": lookup_only,
            "flops_per_call": {"vocoder": vocoder, "listen": listen, "speak_head": speak}}


def tick_floor(cfg: MichiConfig, batch: int, context: int, gpu: dict[str, float],
               sizes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bytes, FLOPs and the time floor (ms) of one tick of `batch` calls at `context` positions."""
    sizes = sizes or part_sizes(cfg)
    b, p = cfg.backbone, sizes["params"]
    head_dim = b.hidden_size // b.num_heads
    passes = cfg.speak_head.euler_steps * (2 if cfg.speak_head.cfg_scale != 1.0 else 1)
    kv_per_position = b.num_layers * b.num_kv_heads * head_dim * 2 * BYTES
    matmul_params = p["backbone"] - sizes["backbone_lookup_params"]
    projection_flops = 2 * matmul_params * batch
    attention_flops = 4 * b.num_layers * b.num_heads * head_dim * context * batch
    parts = {
        "backbone": {"bytes": BYTES * matmul_params + batch * context * kv_per_position,
                     "flops": projection_flops + attention_flops,
                     "projection_flops": projection_flops, "attention_flops": attention_flops},
        "speak_head": {"bytes": BYTES * p["speak_head"] * passes,
                       "flops": sizes["flops_per_call"]["speak_head"] * batch},
        "vocoder": {"bytes": BYTES * p["vocoder"], "flops": sizes["flops_per_call"]["vocoder"] * batch},
        "listen": {"bytes": BYTES * (p["listen"] + p["listen_text"]), "flops": sizes["flops_per_call"]["listen"] * batch},
    }
    for part in parts.values():
        part["memory_ms"] = 1e3 * part["bytes"] / gpu["bandwidth"]
        part["compute_ms"] = 1e3 * part["flops"] / gpu["matrix"]
        part["floor_ms"] = max(part["memory_ms"], part["compute_ms"])
        part["bound"] = "memory" if part["memory_ms"] >= part["compute_ms"] else "compute"
    return {"batch": batch, "context_positions": context, "kv_bytes_per_position": kv_per_position,
            "parts": parts, "tick_floor_ms": sum(part["floor_ms"] for part in parts.values())}


def floor_report(cfg: MichiConfig, batches=(1, 64), contexts=(750, 3750)) -> dict[str, Any]:
    sizes = part_sizes(cfg)
    return {"preset": cfg.preset, "params": sizes["params"], "flops_per_call": sizes["flops_per_call"],
            "gpus": GPUS, "ticks": {name: [tick_floor(cfg, b, c, gpu, sizes) for b in batches for c in contexts]
                                    for name, gpu in GPUS.items()}}


def format_floor(report: dict[str, Any]) -> str:
    lines = [f"{report['preset']}: floor of one tick (16-bit weights and KV cache; context 750 = 1 min, 3750 = 5 min)",
             f"{'GPU':<10} {'calls':>5} {'context':>7} {'backbone':>9} {'speak':>7} {'vocoder':>8} {'listen':>7}"
             f" {'tick ms':>8}  bound"]
    for name, rows in report["ticks"].items():
        for r in rows:
            p = r["parts"]
            lines.append(f"{name:<10} {r['batch']:>5} {r['context_positions']:>7} {p['backbone']['floor_ms']:>9.3f} "
                         f"{p['speak_head']['floor_ms']:>7.3f} {p['vocoder']['floor_ms']:>8.3f} "
                         f"{p['listen']['floor_ms']:>7.3f} {r['tick_floor_ms']:>8.3f}  "
                         f"backbone {p['backbone']['bound']}")
    return "\n".join(lines)
