"""Probe of the phoneme labels: how much of the latent, and of the words, do they carry?

    python -m michi.eval.template_probe MODEL --latents RUN/latents [--limit 10]

A closed-form template, no network: ridge regression from a tick's 8 frame labels (the shards'
`frames`: the phoneme sounding in each 10 ms frame and where one begins, `data.align`) to its
latent, fit on the training utterances, then decoded for held-out sentences with their true
timing through the model's analytic decoder and judged by Whisper (tiny.en, as `michi eval`). If
the labels are right, even this linear map says some words; the latent error left over is what a
model must learn from context. Prints per sentence and writes a JSON report (`--out`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..config import SAMPLE_RATE_HZ
from ..model.phonemes import FRAME_START, FRAMES_PER_TICK

LABELS = 2 * FRAME_START  # frame label values: a phoneme id, FRAME_START added where it begins
RIDGE = 1.0


def fit(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, int]:
    """(features [n, F], latents [n, D]) pairs -> ridge weights [F, D], ticks seen."""
    a = b = None
    ticks = 0
    for x, y in pairs:
        if a is None:
            a, b = np.zeros((x.shape[1], x.shape[1])), np.zeros((x.shape[1], y.shape[1]))
        a += x.T @ x
        b += x.T @ y
        ticks += len(x)
    if a is None:
        raise ValueError("no training utterances to fit the template on")
    return np.linalg.solve(a + RIDGE * np.eye(len(a)), b), ticks


def one_hot(n: int, columns: list[np.ndarray], width: int) -> np.ndarray:
    """Rows with a 1 in each given column (one array of n column indices each, -1: none) and a bias."""
    x = np.zeros((n, width + 1), np.float32)
    for cols in columns:
        rows = np.flatnonzero(cols >= 0)
        np.add.at(x, (rows, cols[rows]), 1.0)
    x[:, -1] = 1.0
    return x


def frame_features(frames: np.ndarray) -> np.ndarray:
    """[n, 8] frame labels (`model.phonemes`: id, FRAME_START added where one begins) -> features:
    one column per frame position, phoneme and start flag."""
    return one_hot(len(frames), [k * LABELS + frames[:, k] for k in range(FRAMES_PER_TICK)],
                   FRAMES_PER_TICK * LABELS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a mel-PCA model (its encoder and analytic decoder)")
    ap.add_argument("--latents", required=True, help="shard set made with this model's codec")
    ap.add_argument("--limit", type=int, default=10, help="held-out sentences judged")
    ap.add_argument("--out", default="template_probe.json")
    args = ap.parse_args(argv)

    import michi

    from ..data.shards import iter_utterances
    from . import speech
    from .wer import corpus_wer

    torch.set_num_threads(1)
    model = michi.load(args.model, device="cpu").model.eval()
    if model.cfg.codec != "melpca":
        ap.error("the probe decodes with the analytic decoder of a mel-PCA model")
    t0 = time.perf_counter()
    w, ticks = fit((frame_features(u.frames), u.latents) for u in iter_utterances(args.latents, "train"))
    held = [(u.text, u.latents, frame_features(u.frames))
            for _, u in zip(range(args.limit), iter_utterances(args.latents, "heldout_sentence"))]
    print(f"[template] fit on {ticks} ticks in {time.perf_counter() - t0:.0f} s", flush=True)

    judge = speech.WhisperJudge(None)

    def heard(latents: np.ndarray) -> str:
        with torch.inference_mode():
            audio = model.vocoder(torch.from_numpy(latents.astype(np.float32))[None])[0].float().numpy()
        return judge(audio, SAMPLE_RATE_HZ)

    rows = []
    for text, latents, x in held:
        template = x @ w
        rows.append({"ref": text, "real": heard(latents), "template": heard(template),
                     "latent_error": float(((template - latents) ** 2).mean() / latents.var())})
        print(f"[template] {text!r}: real {rows[-1]['real']!r} | template {rows[-1]['template']!r}", flush=True)
    report = {"model": args.model, "latents": args.latents, "fit_ticks": ticks, "sentences": len(rows),
              "real_wer": corpus_wer((r["ref"], r["real"]) for r in rows),
              "template_wer": corpus_wer((r["ref"], r["template"]) for r in rows),
              "latent_error": float(np.mean([r["latent_error"] for r in rows])), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"real WER {100 * report['real_wer']:.1f} %, template WER {100 * report['template_wer']:.1f} %, "
          f"latent error {report['latent_error']:.2f} of its variance; report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
