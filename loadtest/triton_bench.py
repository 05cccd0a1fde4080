"""Listen encoder and vocoder steps in-process vs on a Triton server, in one run.

    python -m loadtest.triton_bench                       # the default model, CPU, ~2 minutes
    python -m loadtest.triton_bench --streams 1,4,16 --json loadtest/results/triton-bench-cpu.json

Per stage and execution, S concurrent streams (threads), each stepping one 80 ms frame at a time
and carrying its state, as the stages do:
- torch: the stage's in-process step (`michi.serving.execution.Torch*Stream`);
- onnxruntime: the exported step graph in this process (`--execution onnxruntime`; what Triton
  runs, without the server);
- triton: `tritonclient` gRPC to the Triton server that nvidia-pytriton bundles (Python backend
  running the same ONNX graph; dynamic batching across streams), as `--execution triton` does.
Reports per-frame latency (p50/p95/p99) and frames/s, and the bytes of state each frame carries
to Triton and back. Needs the .venv-triton environment (README). Writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import michi
from michi.bench import machine_info
from michi.serving.execution import (
    GraphEncoderStream,
    GraphVocoderStream,
    OnnxStep,
    TorchEncoderStream,
    TorchVocoderStream,
)
from michi.serving.launcher import free_port
from michi.serving.triton.client import TritonStep
from michi.serving.triton.export import MODELS, ONNX_FILE, write_repository
from michi.serving.triton.server import DEFAULT_ENV, TritonServer

from .common import percentiles, say, write_report

STAGES = ("listen", "vocoder")
EXECUTIONS = ("torch", "onnxruntime", "triton")


def make_stream(execution: str, stage: str, model, steps):
    """One stream's step function, as the stage runs it for `execution`."""
    if execution == "torch":
        s = TorchEncoderStream(model) if stage == "listen" else TorchVocoderStream(model)
    else:
        step = steps[execution][stage]
        s = GraphEncoderStream(model, step) if stage == "listen" else GraphVocoderStream(step)
    return s.encode if stage == "listen" else (lambda x: s.decode(x[None]))


def run_level(make, frames: int, streams: int, x: np.ndarray) -> dict:
    """`streams` threads, each its own stream, `frames` frames each; per-frame latency and frames/s."""
    latencies: list[list[float]] = [[] for _ in range(streams)]
    barrier = threading.Barrier(streams + 1)

    def worker(i: int) -> None:
        step = make()
        step(x)  # warm-up frame
        barrier.wait()
        for _ in range(frames):
            t0 = time.perf_counter()
            step(x)
            latencies[i].append(1e3 * (time.perf_counter() - t0))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"streams": streams, "frames_per_s": streams * frames / wall,
            "frame_ms": percentiles([v for row in latencies for v in row])}


def plot(report: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stage in zip(axes, STAGES):
        for execution in EXECUTIONS:
            rows = report["results"][stage][execution]
            ax.plot([r["streams"] for r in rows], [r["frame_ms"]["p50"] for r in rows], "o-", label=execution)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("p50 ms per 80 ms frame")
        ax.set_title(f"{stage} step ({report['model']})")
        ax.axhline(80, color="grey", lw=0.8, ls="--")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def summary(report: dict) -> str:
    lines = [f"{'stage':<8} {'execution':<12} {'streams':>7} {'p50 ms':>8} {'p95 ms':>8} {'frames/s':>9}"]
    for stage in STAGES:
        for execution in EXECUTIONS:
            for r in report["results"][stage][execution]:
                f = r["frame_ms"]
                lines.append(f"{stage:<8} {execution:<12} {r['streams']:>7} {f['p50']:>8.2f} {f['p95']:>8.2f} "
                             f"{r['frames_per_s']:>9.1f}")
    for stage, b in report["state_bytes_per_frame"].items():
        lines.append(f"{stage}: {b / 1024:.1f} KiB of state to Triton and the same back, per frame")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--streams", default="1,4,16", help="concurrency levels")
    p.add_argument("--frames", type=int, default=40, help="measured frames per stream and level")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime / Triton threads")
    p.add_argument("--env", default=str(DEFAULT_ENV), help="the Triton server's Python environment")
    p.add_argument("--json", type=Path, default=Path("loadtest/results/triton-bench-cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(s) for s in args.streams.split(",")]
    model = michi.load(args.model)
    rng = np.random.default_rng(0)
    inputs = {"listen": (0.1 * rng.standard_normal(model.cfg.frame_samples)).astype(np.float32),
              "vocoder": rng.standard_normal(model.cfg.latent_dim).astype(np.float32)}
    with tempfile.TemporaryDirectory() as repo:
        say("exporting the step graphs")
        specs = write_repository(model, repo, backend="python", max_batch_size=max(levels))
        onnx = {s: OnnxStep(Path(repo) / MODELS[s] / "1" / ONNX_FILE, specs[s], args.threads) for s in STAGES}
        os.environ["MICHI_TRITON_THREADS"] = str(args.threads)
        with TritonServer(repo, free_port(), args.env) as server:
            steps = {"onnxruntime": onnx, "triton": {s: TritonStep(server.url, MODELS[s]) for s in STAGES}}
            results = {s: {e: [] for e in EXECUTIONS} for s in STAGES}
            for stage in STAGES:
                for execution in EXECUTIONS:
                    for n in levels:
                        r = run_level(lambda execution=execution, stage=stage: make_stream(execution, stage, model, steps),
                                      args.frames, n, inputs[stage])
                        results[stage][execution].append(r)
                        say(f"{stage} {execution} x{n}: p50 {r['frame_ms']['p50']:.2f} ms, "
                            f"{r['frames_per_s']:.0f} frames/s")
    state_bytes = {s: sum(t.dtype.itemsize * int(np.prod(t.dims)) for t in specs[s].inputs if t.name.startswith("state_in_"))
                   for s in STAGES}
    report = {"what": "listen/vocoder step: in-process torch vs ONNX Runtime vs Triton (tritonclient gRPC)",
              "model": args.model, "command": "python -m loadtest.triton_bench " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json"),
              "machine": machine_info("cpu"), "triton": "nvidia-pytriton 0.7.0 tritonserver, Python backend, CPU",
              "state_bytes_per_frame": state_bytes, "results": results}
    write_report(report, args.json, plot, summary)


if __name__ == "__main__":
    main()
