"""In-process vs mesh, in one run, at one preset on this machine: time to first audio, per-tick
latency, and how many concurrent real-time calls the mesh holds.

    python -m loadtest.mesh_bench                      # tiny, CPU; ~2-4 minutes on 2 cores
    python -m loadtest.mesh_bench --json out.json --max-calls 16

1. In-process (`michi.load`, torch threads = --threads): first audio = open a session, push the
   first 80 ms of user audio, step once (1920 agent samples); per tick = wall time of
   `Session.step()` over --ticks ticks after --warmup.
2. Mesh (listen, backbone, vocoder, gateway processes, --threads each, in-process session store):
   first audio as the client sees it (`CallResult.first_audio_ms`: connect, session, the three
   stage streams, the first tick) over --calls sequential calls on the real-time gateway; per tick
   = the client-side interval between consecutive `AgentAudio` messages of one call on a second
   gateway started with `--no-realtime` (it ticks as fast as the stages answer).
3. Capacity: N concurrent calls on the real-time gateway (N = 1, 2, 3, 4, 6, 8, 12, ...), each
   streaming --call-s of audio in real time (20 ms chunks, starts spread over --spread-s); per level the
   gateway's missed tick deadlines / ticks (its Prometheus metrics, before/after), p95 first audio
   and the backbone's mean batch size. A level passes with < 1 % missed ticks and p95 first audio
   < 200 ms; the ramp stops at the first failing level; capacity = the last passing N.

Random weights: timing only. Writes a JSON report and a PNG next to it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch

import michi
from loadtest.common import MAX_FIRST_AUDIO_MS, MAX_MISSED, T0, delta, say, scrape, write_report
from michi.audio.io import read_wav
from michi.bench import machine_info
from michi.config import TICK_S
from michi.proto.gateway.v1 import gateway_pb2_grpc
from michi.serving import client
from michi.serving.launcher import Mesh, free_port, wait_healthy
from michi.serving.server import CHANNEL_OPTIONS

SPEECH = Path("/usr/share/asterisk/sounds/en/demo-congrats.wav")
LEVELS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def stats(values) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)),
            "mean_ms": float(a.mean()), "n": int(a.size)}


def user_audio() -> tuple[np.ndarray, int, str]:
    if SPEECH.exists():
        pcm, rate = read_wav(SPEECH)
        return pcm, rate, str(SPEECH)
    rate = 16_000
    t = np.arange(30 * rate) / rate
    return (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, "220 Hz sine"


def clip(pcm: np.ndarray, rate: int, seconds: float, offset_s: float = 0.0) -> np.ndarray:
    start = int(offset_s * rate) % max(1, len(pcm) - int(seconds * rate))
    return pcm[start:start + int(seconds * rate)]


# ---- 1. in-process -----------------------------------------------------------------------------
def bench_in_process(args, pcm: np.ndarray, rate: int) -> dict:
    say(f"in-process: loading {args.model} ({torch.get_num_threads()} torch threads)")
    model = michi.load(args.model)
    first_80ms = clip(pcm, rate, TICK_S)
    first = []
    for i in range(args.calls + 2):  # 2 warm-up sessions
        t = time.perf_counter()
        session = model.session(seed=i)
        session.push_audio(first_80ms, rate)
        tick = session.step()
        ms = (time.perf_counter() - t) * 1e3
        assert len(tick.agent_audio) == model.cfg.frame_samples
        if i >= 2:
            first.append(ms)
    say(f"in-process: first audio median {np.median(first):.1f} ms over {len(first)} sessions")
    session = model.session(seed=0)  # silence in: the same input as the mesh per-tick call
    ticks = []
    for i in range(args.warmup + args.ticks):
        t = time.perf_counter()
        session.step()
        if i >= args.warmup:
            ticks.append((time.perf_counter() - t) * 1e3)
    say(f"in-process: tick median {np.median(ticks):.1f} ms, p95 {np.percentile(ticks, 95):.1f} ms "
        f"over {len(ticks)} ticks")
    return {"first_audio": stats(first), "tick": stats(ticks), "tick_ms": ticks, "first_audio_ms": first}


# ---- 2./3. the mesh ----------------------------------------------------------------------------
async def tick_intervals(address: str, ticks: int) -> list[float]:
    """One call of `ticks` ticks (no audio sent: the caller's frames are silence); the intervals
    between consecutive AgentAudio arrivals, ms."""
    arrivals = []
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        async for response in stub.Converse(iter([client.config(max_ticks=ticks)])):
            if response.WhichOneof("response") == "audio":
                arrivals.append(time.perf_counter())
    return list(np.diff(arrivals) * 1e3)


async def one_call(address: str, pcm: np.ndarray, rate: int, chunk_ms: int, delay_s: float = 0.0):
    await asyncio.sleep(delay_s)
    return await client.converse(address, client.config(rate_in=rate),
                                 client.audio_requests(pcm, rate, chunk_ms=chunk_ms), timeout_s=120)


async def level(gateway: str, ports: dict, n: int, pcm: np.ndarray, rate: int, call_s: float, spread_s: float) -> dict:
    g0, b0 = scrape(ports["gateway"]), scrape(ports["backbone"])
    t = time.perf_counter()
    results = await asyncio.gather(*(one_call(gateway, clip(pcm, rate, call_s, 1.7 * i), rate, 20,
                                              spread_s * i / n) for i in range(n)))
    wall = time.perf_counter() - t
    g1, b1 = scrape(ports["gateway"]), scrape(ports["backbone"])
    ticks = delta(g0, g1, 'michi_tick_seconds_count{stage=gateway}')
    missed = delta(g0, g1, "michi_missed_tick_deadlines_total{}")
    batches = delta(b0, b1, "michi_backbone_batch_size_count{}")
    first = [r.first_audio_ms for r in results if r.first_audio_ms is not None]
    row = {
        "calls": n, "ticks": int(ticks), "missed_ticks": int(missed), "missed_pct": 100 * missed / max(ticks, 1),
        "first_audio": stats(first) if first else None, "calls_without_audio": n - len(first),
        "gateway_tick_mean_ms": 1e3 * delta(g0, g1, 'michi_tick_seconds_sum{stage=gateway}') / max(ticks, 1),
        "backbone_mean_batch": delta(b0, b1, "michi_backbone_batch_size_sum{}") / max(batches, 1),
        "backbone_forward_mean_ms": 1e3 * delta(b0, b1, 'michi_tick_seconds_sum{stage=backbone}') / max(batches, 1),
        "wall_s": wall,
    }
    row["passed"] = (not row["calls_without_audio"] and row["missed_pct"] < 100 * MAX_MISSED
                     and row["first_audio"]["p95_ms"] < MAX_FIRST_AUDIO_MS)
    return row


def bench_mesh(args, pcm: np.ndarray, rate: int) -> dict:
    ports = {s: free_port() for s in ("gateway", "listen", "backbone", "vocoder")}
    metrics = {"gateway": free_port(), "backbone": free_port()}
    logs = tempfile.mkdtemp(prefix="michi-mesh-bench-")
    admit = ["--max-calls", str(args.max_calls)]  # the ramp measures capacity: the gateways admit all of it
    mesh = Mesh(model=args.model, ports=ports, threads=args.threads, log_dir=logs, gateway_args=admit,
                stage_args={s: ["--metrics-port", str(p)] for s, p in metrics.items()})
    say(f"mesh: starting listen, backbone, vocoder, gateway ({args.threads} torch thread each; logs in {logs})")
    mesh.start(timeout_s=240)
    try:
        fast_port = free_port()
        fast = mesh._spawn("gateway-fast", "gateway", fast_port, [
            "--listen", mesh.addresses["listen"][0], "--backbone", mesh.addresses["backbone"][0],
            "--vocoder", mesh.addresses["vocoder"][0], "--no-realtime", *admit])
        wait_healthy(f"127.0.0.1:{fast_port}", 120, fast)
        fast_address = f"127.0.0.1:{fast_port}"
        say("mesh: up; warm-up calls on both gateways")
        asyncio.run(tick_intervals(fast_address, 20))
        asyncio.run(one_call(mesh.gateway, clip(pcm, rate, 1.0), rate, 80))

        intervals = asyncio.run(tick_intervals(fast_address, args.warmup + args.ticks + 1))[args.warmup:]
        say(f"mesh: tick (no-realtime gateway) median {np.median(intervals):.1f} ms, "
            f"p95 {np.percentile(intervals, 95):.1f} ms over {len(intervals)} ticks")

        first = []
        for i in range(args.calls):  # the first 80 ms in one chunk, as in-process
            result = asyncio.run(one_call(mesh.gateway, clip(pcm, rate, 1.0, 1.3 * i), rate, 80))
            first.append(result.first_audio_ms)
        say(f"mesh: first audio median {np.median(first):.1f} ms, p95 {np.percentile(first, 95):.1f} ms "
            f"over {args.calls} sequential calls")

        # the same ramp on a second real-time gateway whose calls tick each on its own phase
        unaligned_metrics = free_port()
        unaligned_port = free_port()
        unaligned = mesh._spawn("gateway-unaligned", "gateway", unaligned_port, [
            "--listen", mesh.addresses["listen"][0], "--backbone", mesh.addresses["backbone"][0],
            "--vocoder", mesh.addresses["vocoder"][0], "--no-align-ticks", "--metrics-port", str(unaligned_metrics), *admit])
        wait_healthy(f"127.0.0.1:{unaligned_port}", 120, unaligned)
        ramps = {}
        for name, address, gateway_metrics in (("aligned", mesh.gateway, metrics["gateway"]),
                                               ("unaligned", f"127.0.0.1:{unaligned_port}", unaligned_metrics)):
            ramps[name] = ramp(args, address, dict(metrics, gateway=gateway_metrics), pcm, rate, name)
    finally:
        codes = mesh.stop()
        say(f"mesh: stopped (exit codes {codes})")
    return {"first_audio": stats(first), "tick": stats(intervals), "tick_ms": intervals, "first_audio_ms": first,
            "levels": ramps["aligned"]["levels"], "capacity_calls": ramps["aligned"]["capacity_calls"],
            "capacity_ramp_stopped": ramps["aligned"]["capacity_ramp_stopped"],
            "unaligned": ramps["unaligned"]}


def ramp(args, address: str, metrics: dict, pcm: np.ndarray, rate: int, name: str) -> dict:
    """Concurrent real-time calls, more and more, until a level fails the objective."""
    asyncio.run(one_call(address, clip(pcm, rate, 1.0), rate, 80))  # warm-up: this gateway's first call
    levels = []
    for n in [n for n in LEVELS if n <= args.max_calls]:
        row = asyncio.run(level(address, metrics, n, pcm, rate, args.call_s, args.spread_s))
        levels.append(row)
        fa = row["first_audio"]["p95_ms"] if row["first_audio"] else float("nan")
        say(f"capacity ({name} ticks): {n:>2} calls: {row['missed_ticks']}/{row['ticks']} missed ticks "
            f"({row['missed_pct']:.2f} %), first audio p95 {fa:.0f} ms, mean batch "
            f"{row['backbone_mean_batch']:.2f}, gateway tick {row['gateway_tick_mean_ms']:.1f} ms"
            f" -> {'pass' if row['passed'] else 'FAIL'}")
        if not row["passed"]:
            break
    capacity = 0
    for row in levels:
        if not row["passed"]:
            break
        capacity = row["calls"]
    return {"levels": levels, "capacity_calls": capacity,
            "capacity_ramp_stopped": "at a failing level" if levels and not levels[-1]["passed"] else "at --max-calls"}


# ---- report ------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, key in (("in-process", "in_process"), ("mesh (no-realtime gateway)", "mesh")):
        x = np.sort(report[key]["tick_ms"])
        left.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=f"{name}: median {np.median(x):.1f} ms")
    left.set(xlabel="per-tick latency (ms)", ylabel="fraction of ticks", title="Per-tick latency (CDF)")
    left.grid(alpha=0.3)
    left.legend()

    levels = report["mesh"]["levels"]
    n = [r["calls"] for r in levels]
    right.plot(n, [r["missed_pct"] for r in levels], "o-", color="C3", label="missed ticks (%), aligned ticks")
    other = report["mesh"]["unaligned"]["levels"]
    right.plot([r["calls"] for r in other], [r["missed_pct"] for r in other], "o--", color="C1",
               label="missed ticks (%), each call on its own phase")
    right.axhline(100 * MAX_MISSED, color="C3", ls=":", lw=1)
    right.set(xlabel="concurrent real-time calls", ylabel="missed tick deadlines (%)",
              title=f"Capacity: {report['mesh']['capacity_calls']} calls "
                    f"({report['mesh']['unaligned']['capacity_calls']} unaligned)")
    right.set_xticks(sorted(set(n) | {r["calls"] for r in other}))
    right.set_ylim(0, max(2.0, 1.1 * max(r["missed_pct"] for r in levels + other)))
    twin = right.twinx()
    twin.plot(n, [r["first_audio"]["p95_ms"] if r["first_audio"] else np.nan for r in levels], "s-", color="C0",
              label="p95 first audio (ms)")
    twin.axhline(MAX_FIRST_AUDIO_MS, color="C0", ls=":", lw=1)
    twin.set_ylabel("p95 time to first audio (ms)")
    twin.set_ylim(0, max(1.25 * MAX_FIRST_AUDIO_MS, *(1.1 * r["first_audio"]["p95_ms"] for r in levels if r["first_audio"])))
    lines = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    right.legend(lines, [h.get_label() for h in lines], loc="upper left")
    right.grid(alpha=0.3)
    fig.suptitle(f"Michi {report['model']} on {report['machine']['cpu']} ({report['machine']['cpu_count']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(report: dict) -> str:
    ip, mesh = report["in_process"], report["mesh"]
    lines = [f"{'(ms)':<24}{'in-process':>12}{'mesh':>12}{'mesh - in':>12}"]
    for label, key, stat in (("first audio median", "first_audio", "median_ms"), ("first audio p95", "first_audio", "p95_ms"),
                             ("tick median", "tick", "median_ms"), ("tick p95", "tick", "p95_ms")):
        a, b = ip[key][stat], mesh[key][stat]
        lines.append(f"{label:<24}{a:>12.1f}{b:>12.1f}{b - a:>12.1f}")
    lines.append(f"mesh overhead per tick (median): {report['mesh_overhead_ms_per_tick']:.1f} ms")
    lines.append("")
    lines.append(f"{'calls':>5}{'ticks':>7}{'missed':>8}{'missed %':>10}{'FA p50':>8}{'FA p95':>8}"
                 f"{'batch':>7}{'gw tick':>9}{'bb fwd':>8}  result")
    for r in mesh["levels"]:
        fa = r["first_audio"] or {"median_ms": float("nan"), "p95_ms": float("nan")}
        lines.append(f"{r['calls']:>5}{r['ticks']:>7}{r['missed_ticks']:>8}{r['missed_pct']:>10.2f}"
                     f"{fa['median_ms']:>8.0f}{fa['p95_ms']:>8.0f}{r['backbone_mean_batch']:>7.2f}"
                     f"{r['gateway_tick_mean_ms']:>9.1f}{r['backbone_forward_mean_ms']:>8.1f}  "
                     f"{'pass' if r['passed'] else 'FAIL'}")
    lines.append(f"capacity: {mesh['capacity_calls']} concurrent real-time calls (< {100 * MAX_MISSED:.0f} % missed "
                 f"ticks and p95 first audio < {MAX_FIRST_AUDIO_MS:.0f} ms; ramp stopped {mesh['capacity_ramp_stopped']})")
    lines.append(f"same ramp, each call ticking on its own phase (--no-align-ticks): "
                 f"{mesh['unaligned']['capacity_calls']} calls; mean batch per level "
                 f"{[round(r['backbone_mean_batch'], 2) for r in mesh['unaligned']['levels']]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=1, help="torch threads in-process and per stage")
    p.add_argument("--ticks", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--calls", type=int, default=10, help="sequential first-audio calls / sessions")
    p.add_argument("--call-s", type=float, default=4.0, help="audio per call in the capacity ramp")
    p.add_argument("--spread-s", type=float, default=0.5,
                   help="capacity calls start evenly over this long (0: all at once, ticks in phase)")
    p.add_argument("--max-calls", type=int, default=32, help="stop the ramp here even if it passes")
    p.add_argument("--json", type=Path, default=Path("loadtest/results/mesh-bench-cpu.json"))
    args = p.parse_args(argv)
    os.environ.pop("REDIS_URL", None)  # the in-process session store
    torch.set_num_threads(args.threads)
    pcm, rate, source = user_audio()
    say(f"mesh bench: {args.model} on CPU, user audio {source} ({rate} Hz)")
    report = {"machine": machine_info("cpu"), "model": args.model, "threads_per_process": args.threads,
              "execution": os.environ.get("MICHI_EXECUTION", "torch"),  # where listen and vocoder ran
              "user_audio": source, "settings": vars(args) | {"json": str(args.json)},
              "criteria": {"max_missed_ticks": MAX_MISSED, "max_p95_first_audio_ms": MAX_FIRST_AUDIO_MS}}
    report["in_process"] = bench_in_process(args, pcm, rate)
    report["mesh"] = bench_mesh(args, pcm, rate)
    report["mesh_overhead_ms_per_tick"] = report["mesh"]["tick"]["median_ms"] - report["in_process"]["tick"]["median_ms"]
    report["wall_s"] = time.perf_counter() - T0
    write_report(report, args.json, plot, summary)


if __name__ == "__main__":
    sys.exit(main())
