"""Probe of the phoneme labels: how much of the latent, and of the words, do they carry?

    python -m michi.eval.template_probe MODEL --labels corpus --latents RUN/latents [--limit 10]
    python -m michi.eval.template_probe MODEL --labels piper --corpus data/synth [--fit 300] [--limit 12]

A closed-form template, no network: ridge regression from a tick's phoneme labels to its latent,
fit on training utterances, then decoded for held-out sentences with their true timing through
the model's analytic decoder and judged by Whisper (tiny.en, as `michi eval`). If the labels are
right, even this linear map says some words; the latent error left over is what a model must
learn from context. Two sources of labels:
- `corpus`: the shards' phoneme slots (`data.align.align_phonemes`: Whisper word times, each
  word's phonemes spread evenly over its ticks); features: this tick's slots, the last tick's
  phonemes, the next waiting one.
- `piper`: the TTS voice's own phoneme timings (piper-tts `include_alignments`, exact to its
  256-sample hop), one label per 10 ms frame, 8 a tick; the sentences are re-synthesised at the
  corpus's stretch (`--corpus` gives the training and held-out texts).

Prints per sentence and writes a JSON report (`--out`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..model.phonemes import NUM_PHONEME_IDS as V

FRAMES_PER_TICK = 8
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


def corpus_features(phones: np.ndarray) -> np.ndarray:
    """[n, slots] phoneme slots of a shard utterance -> features."""
    from ..train.batches import next_phones

    n, slots = phones.shape
    ph = np.where(phones > 0, phones, -1).astype(np.int64)
    prev = np.vstack([np.full((1, slots), -1), ph[:-1]])
    nxt = next_phones(phones).astype(np.int64)
    silent = np.where((phones > 0).any(1), -1, 0)
    cols = [np.where(ph[:, s] >= 0, s * V + ph[:, s], -1) for s in range(slots)]
    cols += [np.where(prev[:, s] >= 0, slots * V + prev[:, s], -1) for s in range(slots)]
    cols += [np.where(nxt > 0, (slots + 1) * V + nxt, -1), np.where(silent == 0, (slots + 2) * V, -1)]
    return one_hot(n, cols, (slots + 2) * V + 1)


def frame_features(labels: np.ndarray) -> np.ndarray:
    """[n, 8] phoneme id per 10 ms frame (0: none) -> features."""
    return one_hot(len(labels), [k * V + labels[:, k] for k in range(FRAMES_PER_TICK)], FRAMES_PER_TICK * V)


def piper_synth(stretch: float) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    """text -> (24 kHz audio, phoneme id per 24 kHz sample), from piper-joe with its alignments."""
    from piper.config import SynthesisConfig

    from ..audio.io import resample
    from ..data.voices import VOICES, load_piper

    voice = load_piper(VOICES["piper-joe"].name, alignments=True)
    rate = voice.config.sample_rate

    def synth(text: str) -> tuple[np.ndarray, np.ndarray]:
        audio, labels = [], []
        for chunk in voice.synthesize(text, SynthesisConfig(length_scale=stretch, normalize_audio=True),
                                      include_alignments=True):
            audio.append(chunk.audio_float_array)
            spans = [(a.phoneme_ids[0], int(a.num_samples)) for a in chunk.phoneme_alignments]
            spans.append((0, len(chunk.audio_float_array) - sum(k for _, k in spans)))
            labels += [np.full(max(k, 0), pid, np.int64) for pid, k in spans]
        pcm, lab = np.concatenate(audio), np.concatenate(labels)[: sum(len(a) for a in audio)]
        pcm24 = resample(pcm, rate, 24_000).astype(np.float32)
        at = np.minimum((np.arange(len(pcm24)) * rate / 24_000).astype(int), len(lab) - 1)
        return pcm24, lab[at]

    return synth


def tick_labels(labels_24k: np.ndarray, n_ticks: int, frame_samples: int) -> np.ndarray:
    """Per-sample labels -> [n_ticks, 8]: the label at the centre of each 10 ms frame."""
    hop = frame_samples // FRAMES_PER_TICK
    centres = np.arange(n_ticks * FRAMES_PER_TICK) * hop + hop // 2
    out = np.where(centres < len(labels_24k), labels_24k[np.minimum(centres, len(labels_24k) - 1)], 0)
    return out.reshape(n_ticks, FRAMES_PER_TICK)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a mel-PCA model (its encoder and analytic decoder)")
    ap.add_argument("--labels", choices=["corpus", "piper"], required=True)
    ap.add_argument("--latents", help="shard set (--labels corpus)")
    ap.add_argument("--corpus", help="synthetic corpus whose texts piper reads (--labels piper)")
    ap.add_argument("--fit", type=int, default=300, help="training sentences piper reads (--labels piper)")
    ap.add_argument("--stretch", type=float, default=None, help="piper's length scale (default: the corpus voice's)")
    ap.add_argument("--limit", type=int, default=10, help="held-out sentences judged")
    ap.add_argument("--out", default="template_probe.json")
    args = ap.parse_args(argv)

    import michi
    from ..data.shards import iter_utterances
    from ..data.voices import VOICES
    from . import speech
    from .wer import corpus_wer

    torch.set_num_threads(1)
    model = michi.load(args.model, device="cpu").model.eval()
    if model.cfg.codec != "melpca":
        ap.error("the probe decodes with the analytic decoder of a mel-PCA model")
    t0 = time.perf_counter()
    if args.labels == "corpus":
        if not args.latents:
            ap.error("--labels corpus needs --latents")
        w, ticks = fit((corpus_features(u.phones), u.latents) for u in iter_utterances(args.latents, "train"))
        held = [(u.text, u.latents, corpus_features(u.phones))
                for _, u in zip(range(args.limit), iter_utterances(args.latents, "heldout_sentence"))]
    else:
        if not args.corpus:
            ap.error("--labels piper needs --corpus")
        synth = piper_synth(args.stretch or VOICES["piper-joe"].stretch)
        segments = [json.loads(line) for line in (Path(args.corpus) / "segments.jsonl").open()]
        train = [s["text"] for s in segments if s["split"] == "train" and s["speaker"] == "piper-joe"][: args.fit]
        texts = list(dict.fromkeys(s["text"] for s in segments if s["split"] == "heldout_sentence"))[: args.limit]

        def encoded(text: str) -> tuple[np.ndarray, np.ndarray]:
            pcm, labels = synth(text)
            with torch.inference_mode():
                latents = model.listen(torch.from_numpy(pcm)[None]).latents[0].float().numpy()
            return frame_features(tick_labels(labels, len(latents), model.cfg.frame_samples)), latents

        w, ticks = fit(encoded(t) for t in train)
        held = [(t, *encoded(t)[::-1]) for t in texts]
    print(f"[template] {args.labels} labels: fit on {ticks} ticks in {time.perf_counter() - t0:.0f} s", flush=True)

    judge = speech.WhisperJudge(None)

    def heard(latents: np.ndarray) -> str:
        with torch.inference_mode():
            audio = model.vocoder(torch.from_numpy(latents.astype(np.float32))[None])[0].float().numpy()
        return judge(audio, 24_000)

    rows = []
    for text, latents, x in held:
        template = x @ w
        rows.append({"ref": text, "real": heard(latents), "template": heard(template),
                     "latent_error": float(((template - latents) ** 2).mean() / latents.var())})
        print(f"[template] {text!r}: real {rows[-1]['real']!r} | template {rows[-1]['template']!r}", flush=True)
    report = {"model": args.model, "labels": args.labels, "fit_ticks": ticks, "sentences": len(rows),
              "real_wer": corpus_wer((r["ref"], r["real"]) for r in rows),
              "template_wer": corpus_wer((r["ref"], r["template"]) for r in rows),
              "latent_error": float(np.mean([r["latent_error"] for r in rows])), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"real WER {100 * report['real_wer']:.1f} %, template WER {100 * report['template_wer']:.1f} %, "
          f"latent error {report['latent_error']:.2f} of its variance; report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
