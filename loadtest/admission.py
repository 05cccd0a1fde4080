"""Admission under a burst: many `Converse` calls opened at once against a gateway that takes
`--max-calls` of them. The admitted calls must keep the load test's objective (p95 first audio
< 200 ms, < 1 % missed tick deadlines, every call run) and the rest must be refused at once with
RESOURCE_EXHAUSTED, a message naming the limit and a `retry-after-ms` trailing hint.

    python -m loadtest.admission                                  # tiny, 50 calls at once, --max-calls 4
    python -m loadtest.admission --calls 12 --max-calls 2 --call-s 4
    python -m loadtest.admission --gateway host:50060 --gateway-metrics host:9100 --max-calls 8

Every call is the load test's `answer` scenario (`loadtest.scenarios`: HALF_DUPLEX, a synthetic
voice or an asterisk prompt, streamed in 20 ms chunks in real time, then silence), all opened
together (no spread). Each sends its config, then its audio once the gateway's SessionStarted says
it was admitted: a grpc.aio client that writes while the server ends the stream can see INTERNAL
instead of the refusal (grpc/grpc#36066); `--no-wait-started` streams at once, to see it. The
default capacity, 4, is the load test's measured capacity of the full mix (tiny, 2 CPU cores;
loadtest/README.md). A warm-up call goes first; after the burst, one more call must be admitted
again (the slots came back).

Per call (client clock): its outcome (admitted: it ran, or got audio; refused: RESOURCE_EXHAUSTED
before any audio; anything else is a failure), the status, `retry-after-ms`, and the time from
opening the stream to the refusal. For the admitted calls, the load test's level figures
(`loadtest.run.level_row`): first audio, response, missed ticks and RTF from the gateway's
metrics, CPU per stage. Calls that end early can free a slot while the burst is still being
decided, so the admitted count is checked against [max-calls, max-calls + admitted calls that
had ended before the last refusal]; with every call longer than the burst, that is exactly
max-calls.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from loadtest import run
from loadtest.common import (
    MAX_FIRST_AUDIO_MS,
    MAX_MISSED,
    backbone_deltas,
    cpu_snapshot,
    cpu_use,
    gateway_deltas,
    percentiles,
    save_figure,
    say,
    scrape,
    write_report,
)
from loadtest.scenarios import Speech, load_speech, plan_call

REFUSED = "RESOURCE_EXHAUSTED"
DEFAULT_MAX_CALLS = 4  # the load test's capacity with the full mix (tiny, 2 CPU cores)
LEAD_S, AFTER_SPEECH_S = 0.3, 1.0  # the answer scenario: silence before the speech, room after it


def outcome(r: run.CallRecord) -> str:
    """admitted (the call ran, or got audio before it failed), refused (RESOURCE_EXHAUSTED before
    any audio: an admission refusal), or failed (any other error, without audio)."""
    if r.status == REFUSED and r.first_audio_ms is None:
        return "refused"
    if r.status == "OK" or r.first_audio_ms is not None:
        return "admitted"
    return "failed"


def names_limit(message: str | None, max_calls: int) -> bool:
    return bool(message) and re.search(rf"(?<![\d.]){max_calls}(?![\d.])", message) is not None


def assess(records: list[run.CallRecord], max_calls: int, refusal_bound_ms: float) -> dict:
    """The burst's verdict from its call records (pure): counts, refusal latency, and checks."""
    by = {k: [r for r in records if outcome(r) == k] for k in ("admitted", "refused", "failed")}
    admitted, refused = by["admitted"], by["refused"]
    t0 = min((r.opened for r in records), default=0.0)
    decided = max((r.opened + r.wall_s for r in refused), default=t0)  # the last refusal
    early = [r for r in admitted if r.opened + r.wall_s < decided]  # freed a slot meanwhile
    lo, hi = min(max_calls, len(records)), max_calls + len(early)
    refusal_ms = [1e3 * r.wall_s for r in refused]
    retry = [r.retry_after_ms for r in refused if r.retry_after_ms is not None]
    named = sum(names_limit(r.error, max_calls) for r in refused)
    checks = {
        "every call admitted or refused": not by["failed"],
        f"admitted in [{lo}, {hi}]": lo <= len(admitted) <= hi,
        "every refusal has retry-after-ms": len(retry) == len(refused),
        "every refusal names the limit": named == len(refused),
        f"every refusal within {refusal_bound_ms:.0f} ms": all(ms < refusal_bound_ms for ms in refusal_ms),
    }
    return {"calls": len(records), "max_calls": max_calls, "admitted": len(admitted), "refused": len(refused),
            "failed": len(by["failed"]), "expected_admitted": [lo, hi], "admitted_after_early_end": len(early),
            "status_codes": dict(Counter(r.status for r in records)),
            "refusals_with_retry_after": len(retry), "retry_after_ms": percentiles(retry),
            "retry_after_values": sorted(set(retry)), "refusals_naming_limit": named,
            "refusal_ms": percentiles(refusal_ms), "refusal_bound_ms": refusal_bound_ms,
            "refusal_messages": sorted({r.error for r in refused if r.error})[:3],
            "failures": [r.error for r in by["failed"]], "checks": checks}


def fitting_speech(speech: list[Speech], call_s: float) -> list[Speech]:
    """The utterances whose turn (and an end of turn) fits a `call_s` answer call."""
    fits = [s for s in speech if LEAD_S + (s.end_s - s.onset_s) + AFTER_SPEECH_S <= call_s]
    if not fits:
        raise ValueError(f"no utterance fits a {call_s} s call: "
                         + ", ".join(f"{s.source} {s.end_s - s.onset_s:.1f} s" for s in speech))
    return fits


def burst(address: str, speech: list[Speech], calls: int, call_s: float, seed: int = 0,
          wait_started: bool = True) -> list[run.CallRecord]:
    """`calls` answer calls opened together, the utterances taken in turn; each streams its audio
    once SessionStarted says it was admitted (`wait_started`, see `run.run_call`)."""
    plans = [plan_call("answer", speech[i % len(speech)], call_s) for i in range(calls)]

    async def together():
        return list(await asyncio.gather(*(run.run_call(address, p, calls, seed + i, wait_started=wait_started)
                                           for i, p in enumerate(plans))))
    return asyncio.run(together())


def run_admission(address: str, metrics: dict, pids: dict[str, int], *, calls: int, max_calls: int,
                  call_s: float, refusal_bound_ms: float, speech: list[Speech], seed: int = 0,
                  wait_started: bool = True) -> dict:
    speech = fitting_speech(speech, call_s)
    say(f"speech: {len(speech)} utterances fit a {call_s:g} s call: "
        + "; ".join(s.source.split(':')[0] for s in speech))
    warm = burst(address, speech, 1, min(call_s, 3.0), seed + 10_000, wait_started)[0]
    say(f"warm-up call: {warm.status} ({warm.error or 'admitted'})")
    g0 = scrape(metrics["gateway"]) if metrics.get("gateway") else {}
    b0 = scrape(metrics["backbone"]) if metrics.get("backbone") else {}
    c0 = cpu_snapshot(pids) if pids else None
    load = os.getloadavg()[0]
    say(f"burst: {calls} calls at once, the gateway admits {max_calls}")
    t = time.perf_counter()
    with run.GpuSampler() as gpu:
        records = burst(address, speech, calls, call_s, seed, wait_started)
    wall = time.perf_counter() - t
    g1 = scrape(metrics["gateway"]) if metrics.get("gateway") else {}
    b1 = scrape(metrics["backbone"]) if metrics.get("backbone") else {}
    cpu = cpu_use(c0, cpu_snapshot(pids)) if pids else None
    verdict = assess(records, max_calls, refusal_bound_ms)
    admitted = [r for r in records if outcome(r) == "admitted"]
    row = run.level_row(len(admitted), admitted, gateway_deltas(g0, g1),
                        backbone_deltas(b0, b1) if b0 else None, cpu, gpu.summary(), wall)
    row["loadavg_1min_before"] = load
    gauge = lambda d, name: d.get(f"{name}{{stage=gateway}}")  # noqa: E731 - None: no such metric
    refused_after, refused_before = gauge(g1, "michi_refused_calls_total"), gauge(g0, "michi_refused_calls_total")
    verdict["gateway_metrics"] = {
        "capacity_calls": gauge(g1, "michi_capacity_calls"),
        "refused_calls": None if refused_after is None else refused_after - (refused_before or 0.0)}
    verdict["checks"]["admitted calls hold the objective"] = row["passed"]
    verdict["checks"]["admitted calls: missed ticks < 1 %"] = row["missed_pct"] < 100 * MAX_MISSED
    after = burst(address, speech, 1, min(call_s, 3.0), seed + 20_000, wait_started)[0]
    say(f"after the burst: one more call: {after.status} ({after.error or 'admitted'})")
    verdict["checks"]["a call after the burst is admitted"] = outcome(after) == "admitted" and not after.error
    verdict["passed"] = all(verdict["checks"].values())
    t0 = min(r.opened for r in records)
    calls_out = [asdict(r) | {"outcome": outcome(r), "start_ms": 1e3 * (r.opened - t0)} for r in records]
    return {"burst": verdict, "admitted_calls": row, "calls": calls_out, "warm_up": asdict(warm),
            "after_burst": asdict(after), "speech": [s.source for s in speech]}


# ---- report --------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, calls = report["burst"], sorted(report["calls"], key=lambda c: c["start_ms"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colour = {"admitted": "C2", "refused": "C3", "failed": "k"}
    for y, c in enumerate(calls):
        start, end = c["start_ms"] / 1e3, c["start_ms"] / 1e3 + c["wall_s"]
        if c["outcome"] == "admitted":
            left.plot([start, end], [y, y], color=colour["admitted"], lw=3, solid_capstyle="butt")
            if c["first_audio_ms"] is not None:
                left.plot(start + c["first_audio_ms"] / 1e3, y, "|", color="k", ms=7)
        else:
            left.plot(end, y, "x", color=colour[c["outcome"]], ms=5)
    for k in ("admitted", "refused", "failed"):
        if b[k]:
            bar = k == "admitted"
            left.plot([], [], color=colour[k], marker=None if bar else "x", lw=3 if bar else 0,
                      label=f"{k}: {b[k]}" + (" (bar: the call, |: first audio)" if bar else " (x: status)"))
    left.set(xlabel="seconds since the burst began", ylabel="call (in the order opened)",
             title=f"{b['calls']} calls at once, --max-calls {b['max_calls']}")
    left.set_xscale("symlog", linthresh=0.1)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="center right")

    def cdf(values, **kw):
        x = np.sort([v for v in values if v is not None])
        if x.size:
            right.step(x, np.arange(1, x.size + 1) / x.size, where="post", **kw)
    refused = [c["wall_s"] * 1e3 for c in calls if c["outcome"] == "refused"]
    admitted = [c for c in calls if c["outcome"] == "admitted"]
    fmt = lambda p: f"p50 {p['p50']:.0f}, p95 {p['p95']:.0f} ms" if p else "none"  # noqa: E731
    cdf(refused, color="C3", label=f"refusal: stream opened -> status ({fmt(b['refusal_ms'])})")
    cdf([c["first_audio_ms"] for c in admitted], color="C2",
        label=f"admitted: first audio ({fmt(report['admitted_calls']['latency']['audio_first_audio_ms'])})")
    cdf([v for c in admitted for v in c["response_ms"]], color="C2", ls="--", label="admitted: response after speech")
    right.axvline(b["refusal_bound_ms"], color="C3", ls=":", lw=1)
    right.axvline(MAX_FIRST_AUDIO_MS, color="C2", ls=":", lw=1)
    row = report["admitted_calls"]
    right.set(xlabel="ms", ylabel="fraction", xscale="log",
              title=f"admitted: {row['missed_ticks']}/{row['ticks']} ticks missed ({row['missed_pct']:.2f} %), "
                    f"RTF {row['rtf']:.2f} -> {'pass' if report['burst']['passed'] else 'FAIL'}")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8, loc="lower right")
    save_figure(fig, report, "admission under a burst", path)


def summary(report: dict) -> str:
    b, row = report["burst"], report["admitted_calls"]
    p = lambda s, unit=" ms": f"{s['p50']:.0f} / {s['p95']:.0f} / {s['max']:.0f}{unit}" if s else "-"  # noqa: E731
    lat = row["latency"]
    gm = b["gateway_metrics"]
    lines = [
        f"{b['calls']} calls at once, --max-calls {b['max_calls']}: {b['admitted']} admitted "
        f"(expected {b['expected_admitted'][0]}..{b['expected_admitted'][1]}), {b['refused']} refused, "
        f"{b['failed']} failed; status codes {b['status_codes']}",
        f"refusals: retry-after-ms on {b['refusals_with_retry_after']}/{b['refused']} "
        f"(values {b['retry_after_values'][:5]}), naming the limit {b['refusals_naming_limit']}/{b['refused']}; "
        f"stream opened -> status p50 / p95 / max {p(b['refusal_ms'])}",
        f"gateway metrics: capacity {gm['capacity_calls']}, refused during the burst {gm['refused_calls']}",
        f"admitted calls: first audio p50 / p95 / max {p(lat['audio_first_audio_ms'])}, response "
        f"{p(lat['all']['response_ms'])}, missed ticks {row['missed_ticks']}/{row['ticks']} "
        f"({row['missed_pct']:.2f} %), RTF {row['rtf']:.2f}, realtime ratio "
        f"{p(lat['all']['realtime_ratio'], '')}, failed {row['failed_calls']} -> objective "
        f"{'pass' if row['passed'] else 'FAIL'} (p95 first audio < {MAX_FIRST_AUDIO_MS:.0f} ms, "
        f"< {100 * MAX_MISSED:.0f} % missed)",
    ]
    if b["refusal_messages"]:
        lines.append(f"a refusal: {b['refusal_messages'][0]}")
    if b["failures"]:
        lines.append(f"failures: {b['failures'][:3]}")
    lines.append("checks: " + "; ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in b["checks"].items()))
    lines.append(f"-> {'pass' if b['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from michi.bench import machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (random weights, timing only) by default")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage process (own mesh)")
    p.add_argument("--calls", type=int, default=50, help="calls opened at once")
    p.add_argument("--max-calls", type=int, default=DEFAULT_MAX_CALLS,
                   help="the gateway's --max-calls (with --gateway: what that gateway was given)")
    p.add_argument("--call-s", type=float, default=5.0, help="length of each call (then 1.5 s for the last replies)")
    p.add_argument("--refusal-bound-ms", type=float, default=1000.0, help="every refusal must come within this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-wait-started", action="store_true",
                   help="stream audio right after the config, before SessionStarted (as the load test does): "
                        "a grpc.aio client may then see some refusals as INTERNAL (grpc/grpc#36066)")
    p.add_argument("--gateway", help="host:port of a running gateway (default: start a mesh here)")
    p.add_argument("--gateway-metrics", help="host:port of that gateway's Prometheus metrics")
    p.add_argument("--backbone-metrics", help="host:port of the backbone's Prometheus metrics")
    p.add_argument("--json", type=Path, default=Path("loadtest/results/admission-cpu.json"))
    args = p.parse_args(argv)
    os.environ.pop("REDIS_URL", None)  # own mesh: the in-process session store
    device = "cuda" if shutil.which("nvidia-smi") else "cpu"
    report = {"command": "python -m loadtest.admission " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "machine": machine_info(device), "model": str(args.model), "settings": vars(args) | {"json": str(args.json)},
              "criteria": {"max_missed_ticks": MAX_MISSED, "max_p95_first_audio_ms": MAX_FIRST_AUDIO_MS,
                           "refusal_bound_ms": args.refusal_bound_ms}}
    t = time.perf_counter()
    kw = dict(calls=args.calls, max_calls=args.max_calls, call_s=args.call_s,
              refusal_bound_ms=args.refusal_bound_ms, speech=load_speech(), seed=args.seed,
              wait_started=not args.no_wait_started)
    if args.gateway:
        report |= run_admission(args.gateway, {"gateway": args.gateway_metrics, "backbone": args.backbone_metrics},
                                {}, **kw)
    else:
        mesh, metrics = run.start_mesh(args, ["--max-calls", str(args.max_calls)])
        try:
            report |= run_admission(mesh.gateway, metrics, {n: proc.pid for n, proc in mesh.processes.items()}, **kw)
        finally:
            say(f"mesh: stopped (exit codes {mesh.stop()})")
    report["wall_s"] = time.perf_counter() - t
    write_report(report, args.json, plot, summary)
    return 0 if report["burst"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
