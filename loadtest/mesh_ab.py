"""Before vs after for the whole mesh, in one run: `loadtest.mesh_bench` of this checkout against
that of a git revision, alternating.

    python -m loadtest.mesh_ab --before 0715168~1 --rounds 2 --json loadtest/results/mesh-ab-cpu.json

Each round runs each side's own `python -m loadtest.mesh_bench` (its in-process figures, its mesh
of four stage processes and its capacity ramp; random `tiny` weights) in that side's tree
(`loadtest.trees`), before then after, so both see the same machine load. Reports each side's
median over rounds of: first audio in-process and through the mesh, the per-tick median, the mesh
overhead per tick and the capacity; and the after/before ratio of each round's figures, median
over rounds. Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from .common import say
from .trees import short_rev, sides

FIGURES = {  # name -> path in a mesh_bench report
    "in_process_first_audio_ms": ("in_process", "first_audio", "median_ms"),
    "mesh_first_audio_ms": ("mesh", "first_audio", "median_ms"),
    "in_process_tick_ms": ("in_process", "tick", "median_ms"),
    "mesh_tick_ms": ("mesh", "tick", "median_ms"),
    "mesh_overhead_ms_per_tick": ("mesh_overhead_ms_per_tick",),
    "capacity_calls": ("mesh", "capacity_calls"),
}


def run_side(tree: Path, env: dict[str, str], args, out: Path) -> dict[str, float]:
    """One `loadtest.mesh_bench` run of `tree` in `env`: its FIGURES."""
    cmd = [sys.executable, "-m", "loadtest.mesh_bench", "--json", str(out), "--calls", str(args.calls),
           "--ticks", str(args.ticks), "--max-calls", str(args.max_calls)]
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    figures = {}
    for name, path in FIGURES.items():
        value = report
        for key in path:
            value = value[key]
        figures[name] = float(value)
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision to compare against (e.g. HEAD~1)")
    p.add_argument("--rounds", type=int, default=2, help="alternating before/after mesh benches")
    p.add_argument("--calls", type=int, default=10, help="mesh_bench --calls (sequential first-audio calls)")
    p.add_argument("--ticks", type=int, default=100, help="mesh_bench --ticks")
    p.add_argument("--max-calls", type=int, default=8, help="mesh_bench --max-calls (the capacity ramp's top)")
    p.add_argument("--json", type=Path, default=Path("loadtest/results/mesh-ab.json"))
    args = p.parse_args(argv)
    rev, after_rev = short_rev(args.before), short_rev("HEAD")
    rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with sides(rev) as both, tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, tree, env in both:
                rounds[side].append(run_side(tree, env, args, Path(tmp) / f"{side}-{r}.json"))
                say(f"round {r + 1}/{args.rounds}, {side}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in rounds[side][-1].items()))
    summary = {name: {"before": median([f[name] for f in rounds["before"]]),
                      "after": median([f[name] for f in rounds["after"]]),
                      "after_over_before": median([a[name] / b[name] if b[name] else float("nan")
                                                   for a, b in zip(rounds["after"], rounds["before"])])}
               for name in FIGURES}
    from michi.bench import machine_info

    report = {"what": "loadtest.mesh_bench, before vs after, alternating in one run",
              "before": rev, "after": f"{after_rev} + working tree", "machine": machine_info("cpu"),
              "command": "python -m loadtest.mesh_ab " + " ".join(sys.argv[1:]),
              "summary": summary, "rounds": rounds}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    for name, s in summary.items():
        print(f"{name:>28}: before {s['before']:8.2f}  after {s['after']:8.2f}  ratio {s['after_over_before']:.2f}")
    say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
