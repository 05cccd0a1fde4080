"""Per-tick latency of each part and of a whole tick, per preset, on this machine.

A tick is everything one 80 ms frame costs: text prefill (if any), listen encoder, listen text head,
backbone step, text head, speak head (all Euler steps), vocoder. Random weights are fine for timing.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import load

PARTS = ("listen_encoder", "listen_text_head", "backbone", "text_head", "speak_head", "vocoder", "tick")
TICK_BUDGET_MS = 80.0


def machine_info(device: str) -> dict[str, Any]:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "mean_ms": float(a.mean())}


def bench_preset(name: str, ticks: int, warmup: int, device: str = "cpu", progress=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    michi = load(name, device=device)
    load_s = time.perf_counter() - t0
    session = michi.session(seed=0, profile=True)
    rng = np.random.default_rng(0)
    session.push_audio(0.1 * rng.standard_normal((warmup + ticks) * michi.cfg.frame_samples).astype(np.float32))
    session.push_text("You are Michi, a helpful voice agent.", role="system")
    samples: dict[str, list[float]] = {p: [] for p in PARTS}
    for i in range(warmup + ticks):
        tick = session.step()
        if i >= warmup:
            for part in PARTS:
                samples[part].append(tick.timings_ms[part])
        if progress and (i + 1) % max(1, (warmup + ticks) // 5) == 0:
            progress(f"  {name}: tick {i + 1}/{warmup + ticks}, last {tick.timings_ms['tick']:.1f} ms")
    result = {part: _stats(values) for part, values in samples.items()}
    tick_ms = result["tick"]["median_ms"]
    return {
        "preset": name, "parameters": michi.parameter_counts(), "ticks": ticks, "warmup": warmup,
        "context_positions_at_end": session.position, "load_s": load_s,
        "parts": result, "realtime_factor": tick_ms / TICK_BUDGET_MS,
        "fits_80ms_tick": tick_ms <= TICK_BUDGET_MS, "trained_weights": michi.trained,
    }


def bench_batch(name: str, batches: list[int], ticks: int, warmup: int, device: str = "cpu",
                context: int = 0, progress=print) -> dict[str, Any]:
    """One batched engine tick (backbone + text head + speak head, all Euler steps) for B live
    calls, as the backbone stage runs it: median and p95 ms per tick, per B. `context` positions
    of text are prefilled into every call first (the KV cache a tick then reads)."""
    from .engine import BackboneEngine, TickInput

    michi = load(name, device=device)
    dim, sync = michi.cfg.latent_dim, (torch.cuda.synchronize if device.startswith("cuda") else lambda: None)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for batch in batches:
        engine = BackboneEngine(michi.model, rows=batch)
        for i in range(batch):
            engine.open(f"call{i}", seed=i)
            for start in range(0, context, 64):
                engine.insert_text(f"call{i}", list(range(97, 97 + min(64, context - start))))
        times = []
        for t in range(warmup + ticks):
            inputs = {f"call{i}": TickInput(torch.randn(dim, generator=gen), [98] if (i + t) % 4 == 0 else [])
                      for i in range(batch)}
            sync()
            t0 = time.perf_counter()
            engine.tick(inputs)
            sync()
            if t >= warmup:
                times.append(1e3 * (time.perf_counter() - t0))
        out[str(batch)] = {**_stats(times), "calls": batch, "context_positions": context + warmup + ticks}
        progress(f"  {name}: {batch} calls, tick median {out[str(batch)]['median_ms']:.2f} ms")
    return {"preset": name, "ticks": ticks, "warmup": warmup, "batches": out, "trained_weights": michi.trained}


def run_bench(presets: list[str], ticks: dict[str, int], warmup: int, device: str, out: Path | None,
              progress=print) -> dict[str, Any]:
    report = {"machine": machine_info(device), "tick_budget_ms": TICK_BUDGET_MS, "presets": {}}
    for name in presets:
        progress(f"bench {name} on {device} ({ticks[name]} ticks after {warmup} warm-up)")
        report["presets"][name] = bench_preset(name, ticks[name], warmup, device, progress)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'part':<18}" + "".join(f"{name + ' med':>12}{name + ' p95':>12}" for name in report["presets"])]
    for part in PARTS:
        row = f"{part:<18}"
        for res in report["presets"].values():
            s = res["parts"][part]
            row += f"{s['median_ms']:>12.2f}{s['p95_ms']:>12.2f}"
        lines.append(row)
    for name, res in report["presets"].items():
        lines.append(f"{name}: {res['parameters']['total'] / 1e6:.1f}M params, tick median "
                     f"{res['parts']['tick']['median_ms']:.1f} ms = {res['realtime_factor']:.2f} x the 80 ms budget")
    return "\n".join(lines)
