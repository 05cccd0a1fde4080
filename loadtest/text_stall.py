"""Do text-only calls make concurrent audio calls miss their ticks? Two real-time audio calls
(`answer`, `barge_in`), alone and then with a third, TEXT_ONLY call (a USER text every 3 s),
alternately, --reps times each; missed tick deadlines from the gateway's metrics.

    python -m loadtest.text_stall            # tiny, CPU, about 2 minutes

Why it can: the backbone runs a TEXT_ONLY reply (`GenerateText`, up to 64 tokens) as one
operation of its batcher, so the ticks of every other call wait until the whole reply is done.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from loadtest.common import gateway_deltas, say, scrape
from loadtest.run import level, start_mesh
from loadtest.scenarios import load_speech, plan_call


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--call-s", type=float, default=12.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("loadtest/results/text-only-stall-cpu.json"))
    args = p.parse_args(argv)
    os.environ.pop("REDIS_URL", None)
    speech = load_speech(synthetic=2, human=0, voices=("flite-slt",))
    mesh, metrics = start_mesh(args)
    rows = []
    try:
        asyncio.run(level(mesh.gateway, [plan_call("answer", speech[0], 3.0)], 0, 0.0, 0))  # warm-up
        for rep in range(args.reps):
            for with_text in (False, True):
                plans = [plan_call("answer", speech[0], args.call_s), plan_call("barge_in", speech[1], args.call_s)]
                plans += [plan_call("text_only", None, args.call_s)] if with_text else []
                before = scrape(metrics["gateway"])
                records = asyncio.run(level(mesh.gateway, plans, len(plans), 0.5, rep))
                g = gateway_deltas(before, scrape(metrics["gateway"]))
                row = {"text_only_call": with_text, "audio_calls": 2, **g, "loadavg_1min": os.getloadavg()[0],
                       "text_reply_ms": [x for r in records for x in r.text_reply_ms],
                       "errors": [r.error for r in records if r.error]}
                rows.append(row)
                say(f"2 audio calls{' + 1 text-only' if with_text else ''}: {g['missed_ticks']}/{g['ticks']} missed "
                    f"({g['missed_pct']:.2f} %), text replies {[round(x) for x in row['text_reply_ms']]} ms")
    finally:
        mesh.stop()
    report = {"command": "python -m loadtest.text_stall " + " ".join(argv or sys.argv[1:]), "model": args.model,
              "settings": vars(args) | {"json": str(args.json)}, "runs": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
