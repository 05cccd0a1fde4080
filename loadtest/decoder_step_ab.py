"""The voiced decoder's streaming step per 80 ms tick, before and after its voicing net and
envelope phase changed, timed in one run (random weights are fine for timing):

    python -m loadtest.decoder_step_ab --json loadtest/results/decoder-step-ab-cpu.json

"before": the first voicing net (3 convolutions, 128 wide, f0 regressed) and a zero-phase
envelope; "now": the tiny-melpca preset's net and the minimum-phase envelope. One stream, one
thread, the two interleaved over `--rounds` rounds so that drift hits both alike.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from michi.config import VoicingNetConfig, preset
from michi.model import voiced

from .common import say


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.decoder_step_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=200, help="ticks per round and design")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="loadtest/results/decoder-step-ab-cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    k = preset("tiny-melpca").latent_dim
    decoders = {"before": voiced.VoicedMelPCADecoder(k, voicing=VoicingNetConfig()).eval(),
                "now": voiced.VoicedMelPCADecoder(k, voicing=preset("tiny-melpca").voicing).eval()}
    decoders["before"].envelope_phase = torch.zeros_like
    times: dict[str, list[float]] = {name: [] for name in decoders}
    latent = 0.1 * torch.randn(1, 1, k, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, dec in decoders.items():
                state = dec.init_state(1)
                for i in range(args.ticks + 10):
                    t0 = time.perf_counter()
                    dec.step(latent, state)
                    if i >= 10:  # warm-up
                        times[name].append(time.perf_counter() - t0)
    figures = {name: {"median_ms": 1e3 * float(np.median(t)), "p95_ms": 1e3 * float(np.percentile(t, 95))}
               for name, t in times.items()}
    report = {"command": "python -m loadtest.decoder_step_ab", "threads": 1, "ticks": args.ticks * args.rounds,
              "designs": figures, "ratio_now_over_before": figures["now"]["median_ms"] / figures["before"]["median_ms"]}
    for name, f in figures.items():
        say(f"{name}: median {f['median_ms']:.2f} ms, p95 {f['p95_ms']:.2f} ms per tick")
    say(f"now / before: {report['ratio_now_over_before']:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
