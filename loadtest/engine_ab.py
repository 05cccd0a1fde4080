"""Before vs after for the batched engine tick, in one run: this checkout against a git revision.

    python -m loadtest.engine_ab --before HEAD~1 --batches 1,16,64 --json loadtest/results/engine-ab-cpu.json

The revision is checked out into a temporary git worktree; each round times one batched tick
(backbone + text head + speak head, all Euler steps; `BackboneEngine.tick`, random tiny weights
unless --preset) for B live calls in a fresh process per side, round and batch size, alternating
before / after, so both sides see the same machine load. Reports each round's median tick per
side, their after/before ratio, and the median over rounds; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import median

from .common import say
from .trees import short_rev, sides

# Runs inside each side's tree (only the engine API both sides share).
PROBE = r"""
import json, sys, time, torch
import michi
from michi.engine import BackboneEngine, TickInput
preset, device, batch, ticks, warmup, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
torch.set_num_threads(threads)
m = michi.load(preset, device=device)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
engine = BackboneEngine(m.model, rows=batch)
for i in range(batch):
    engine.open(f"call{i}", seed=i)
gen = torch.Generator().manual_seed(0)
times = []
for t in range(warmup + ticks):
    inputs = {f"call{i}": TickInput(torch.randn(m.cfg.latent_dim, generator=gen), [98] if (i + t) % 4 == 0 else [])
              for i in range(batch)}
    sync(); t0 = time.perf_counter(); engine.tick(inputs); sync()
    if t >= warmup:
        times.append(1e3 * (time.perf_counter() - t0))
print(json.dumps({"times_ms": times}))
"""


def run_side(env: dict[str, str], args, batch: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", PROBE, args.preset, args.device, str(batch), str(args.ticks),
                          str(args.warmup), str(args.threads)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["times_ms"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision to compare against (e.g. HEAD~1)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--ticks", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="alternating before/after runs per batch size")
    p.add_argument("--json", type=Path, default=Path("loadtest/results/engine-ab.json"))
    args = p.parse_args()
    rev, after_rev = short_rev(args.before), short_rev("HEAD")
    with sides(rev) as both:
        results = {}
        for batch in [int(b) for b in args.batches.split(",")]:
            rounds = {"before": [], "after": []}  # per-round medians
            for r in range(args.rounds):
                for side, _, env in both:
                    rounds[side].append(median(run_side(env, args, batch)))
                    say(f"{batch} calls, round {r + 1}/{args.rounds}, {side}: median {rounds[side][-1]:.2f} ms")
            ratios = [a / b for a, b in zip(rounds["after"], rounds["before"])]
            results[str(batch)] = {"before_median_ms": median(rounds["before"]),
                                   "after_median_ms": median(rounds["after"]),
                                   "after_over_before": median(ratios), "round_ratios": ratios,
                                   "rounds_ms": rounds, "ticks_per_round": args.ticks}
    from michi.bench import machine_info

    report = {"what": "BackboneEngine.tick, before vs after, alternating processes in one run",
              "before": rev, "after": f"{after_rev} + working tree", "preset": args.preset,
              "machine": machine_info(args.device), "command": "python -m loadtest.engine_ab " + " ".join(sys.argv[1:]),
              "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    for batch, r in results.items():
        print(f"{batch:>4} calls: before {r['before_median_ms']:8.2f} ms  after {r['after_median_ms']:8.2f} ms  "
              f"ratio {r['after_over_before']:.2f}")
    say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
