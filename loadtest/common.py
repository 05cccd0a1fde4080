"""Pieces shared by the load tests (`mesh_bench`, `run`): the objective, logging, Prometheus
scrapes and their deltas, percentiles, and CPU time of processes from /proc."""
from __future__ import annotations

import math
import os
import time
import urllib.request

import numpy as np

from michi.config import TICK_MS

# The objective a load level must hold (README, "Measured: the mesh vs in-process").
MAX_MISSED = 0.01  # < 1 % missed tick deadlines
MAX_FIRST_AUDIO_MS = 200.0  # p95 time to first audio
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def scrape(port: int | str) -> dict[str, float]:
    """Prometheus text -> {"name{label=value,...}": value}; `port` or "host:port"."""
    from prometheus_client.parser import text_string_to_metric_families

    where = port if isinstance(port, str) and ":" in port else f"127.0.0.1:{port}"
    text = urllib.request.urlopen(f"http://{where}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def delta(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def percentiles(values) -> dict | None:
    """p50/p95/p99/mean/max (ms, as given) of the finite values; None when there are none."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not a.size:
        return None
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max()), "n": int(a.size)}


def objective(first_audio_p95_ms: float | None, missed_pct: float, failed_calls: int = 0) -> bool:
    """A level holds the objective: every call ran, p95 first audio < 200 ms, < 1 % missed ticks."""
    return (not failed_calls and first_audio_p95_ms is not None and first_audio_p95_ms < MAX_FIRST_AUDIO_MS
            and missed_pct < 100 * MAX_MISSED)


def gateway_deltas(before: dict, after: dict) -> dict:
    """What a level did on the gateway: ticks, missed tick deadlines, compute per tick."""
    ticks = delta(before, after, "michi_tick_seconds_count{stage=gateway}")
    missed = delta(before, after, "michi_missed_tick_deadlines_total{}")
    tick_s = delta(before, after, "michi_tick_seconds_sum{stage=gateway}")
    mean_ms = 1e3 * tick_s / ticks if ticks else float("nan")
    return {"ticks": int(ticks), "missed_ticks": int(missed), "missed_pct": 100 * missed / max(ticks, 1),
            "gateway_tick_mean_ms": mean_ms, "rtf": mean_ms / TICK_MS}


def backbone_deltas(before: dict, after: dict) -> dict:
    batches = delta(before, after, "michi_backbone_batch_size_count{}")
    fwd_ms = 1e3 * delta(before, after, "michi_tick_seconds_sum{stage=backbone}") / batches if batches else float("nan")
    return {"backbone_batches": int(batches),
            "backbone_mean_batch": delta(before, after, "michi_backbone_batch_size_sum{}") / max(batches, 1),
            "backbone_forward_mean_ms": fwd_ms, "backbone_rtf": fwd_ms / TICK_MS}


# ---- CPU of processes, from /proc ---------------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def cpu_snapshot(pids: dict[str, int]) -> dict:
    return {"t": time.monotonic(), "cpu_s": {name: process_cpu_s(pid) for name, pid in pids.items()}}


def cpu_use(before: dict, after: dict) -> dict[str, float]:
    """Per process: % of one core between two snapshots (100 = one core busy), and "total"."""
    wall = max(after["t"] - before["t"], 1e-9)
    out = {}
    for name, a in after["cpu_s"].items():
        b = before["cpu_s"].get(name)
        if a is not None and b is not None:
            out[name] = 100 * (a - b) / wall
    out["total"] = sum(out.values())
    return out


def save_figure(fig, report: dict, what: str, path) -> None:
    """Title a report's figure with what it shows and the machine it ran on, write it, close it."""
    import matplotlib.pyplot as plt

    m = report["machine"]
    fig.suptitle(f"Michi {what}, {report['model']}, {m['cpu']} ({m['cpu_count']} cores)"
                 + (f", {m['gpu']}" if m.get("gpu") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(report: dict, path, plot, summary) -> None:
    """The JSON report, its PNG beside it (`plot(report, png)`), and the summary table printed."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    png = path.with_suffix(".png")
    plot(report, png)
    print()
    print(summary(report))
    say(f"wrote {path} and {png}")
