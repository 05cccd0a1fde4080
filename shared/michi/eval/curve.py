"""The learning curve: held-out TTS judge WER against training minutes.

    python -m michi.eval.curve RUN --corpus data/synth [--start MODEL --start-minutes M]

Evaluates every checkpoint the recipe wrote in `RUN/snapshots/` (`--snapshot-minutes`), plus
optionally the model the run started from (at `--start-minutes`, what it was trained before),
with `michi eval tts` on the corpus's held-out sentences (the same sentences and seeds each
time), and writes `RUN/curve.json` and `RUN/curve.png`. Points already in curve.json are kept,
so it can be rerun while the run goes on. The x axis is cumulative: the speak stage's minutes,
then the joint stage's after them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STAGE_ORDER = ("speak", "joint")


def snapshots(run: Path) -> list[tuple[str, float, Path]]:
    """(stage, stage minutes, path) of each snapshot, in training order."""
    from ..checkpoint import read_checkpoint_config

    out = []
    for path in sorted((run / "snapshots").glob("*/")):
        _, info = read_checkpoint_config(path)
        snap = info.get("snapshot") or {}
        if snap.get("stage") in STAGE_ORDER:
            out.append((snap["stage"], float(snap["minutes"]), path))
    return sorted(out, key=lambda s: (STAGE_ORDER.index(s[0]), s[1]))


def cumulative(points: list[tuple[str, float, Path]], start_minutes: float) -> list[float]:
    """Training minutes at each snapshot: earlier stages' totals (their last snapshot) added."""
    last = {stage: minutes for stage, minutes, _ in points}
    offsets, acc = {}, start_minutes
    for stage in STAGE_ORDER:
        offsets[stage] = acc
        acc += last.get(stage, 0.0)
    return [offsets[stage] + minutes for stage, minutes, _ in points]


def evaluate(model_dir: Path, sentences, judge, seed: int, temperature: float | None = None,
             euler_steps: int | None = None, cfg_scale: float | None = None) -> dict:
    """TTS judge WER of one checkpoint; `temperature`, `euler_steps` and `cfg_scale` override its
    speak head's sampling (temperature 0 with one Euler step is the head's conditional mean)."""
    import michi

    from .speech import eval_tts

    t0 = time.perf_counter()
    model = michi.load(str(model_dir), device="cpu", seed=seed)
    head = model.model.speak_head.cfg
    head.temperature = head.temperature if temperature is None else temperature
    head.euler_steps = euler_steps or head.euler_steps
    head.cfg_scale = head.cfg_scale if cfg_scale is None else cfg_scale
    result = eval_tts(model, sentences, judge, reference_voice=False, seed=seed, save_wavs=0)
    return {"wer": result["wer"], "eval_s": round(time.perf_counter() - t0, 1)}


def plot(points: list[dict], path: Path, title: str) -> Path:
    from .report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs, ys = [p["minutes"] for p in points], [100 * p["wer"] for p in points]
    ax.plot(xs, ys, "o-")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(p["stage"], (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("held-out TTS judge WER (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="recipe run directory (with snapshots/)")
    ap.add_argument("--corpus", required=True, help="corpus with heldout_sentence segments")
    ap.add_argument("--limit", type=int, default=20, help="held-out sentences per point")
    ap.add_argument("--start", default=None, help="the model the run started from (its point: --start-minutes)")
    ap.add_argument("--start-minutes", type=float, default=0.0, help="training minutes before this run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--whisper-model", default=None)
    ap.add_argument("--temperature", type=float, default=None, help="override the speak head's sampling temperature")
    ap.add_argument("--euler-steps", type=int, default=None, help="override its Euler steps")
    ap.add_argument("--cfg-scale", type=float, default=None, help="override its classifier-free guidance scale")
    ap.add_argument("--out", default="curve", help="file stem of the JSON and PNG written in the run directory")
    args = ap.parse_args(argv)

    from . import speech

    run = Path(args.run)
    out_json = run / f"{args.out}.json"
    done = {p["path"]: p for p in json.loads(out_json.read_text())["points"]} if out_json.is_file() else {}
    every = speech.load_segments(args.corpus, splits=("heldout_sentence",))["heldout_sentence"]
    sentences = speech.spread(list({it.text: it for it in every}.values()), args.limit)
    judge = speech.WhisperJudge(args.whisper_model)
    snaps = snapshots(run)
    todo = ([("start", args.start_minutes, Path(args.start))] if args.start else []) + [
        (stage, m, p) for (stage, _, p), m in zip(snaps, cumulative(snaps, args.start_minutes))]
    points = []
    for i, (stage, minutes, path) in enumerate(todo):
        point = done.get(str(path))
        if point is None:
            point = {"path": str(path), "stage": stage, "minutes": round(minutes, 2),
                     **evaluate(path, sentences, judge, args.seed, args.temperature, args.euler_steps,
                                args.cfg_scale)}
        points.append(point)
        print(f"[curve] {i + 1}/{len(todo)} {stage} {minutes:6.1f} min: WER {100 * point['wer']:.1f} %", flush=True)
        out_json.write_text(json.dumps({"corpus": str(Path(args.corpus).resolve()), "sentences": len(sentences),
                                        "seed": args.seed, "temperature": args.temperature,
                                        "euler_steps": args.euler_steps, "cfg_scale": args.cfg_scale,
                                        "points": points}, indent=2))
    png = plot(points, run / f"{args.out}.png", f"{run.name}: held-out TTS WER, {len(sentences)} sentences")
    print(f"curve: {out_json}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
