"""Probe of the mel-PCA latent (`michi.model.melpca`) with its analytic decoder: does a fixed
linear latent keep the words, with no training at all?

    python -m michi.eval.melpca_probe [--fit 150] [--limit 20] [--ks 32 64] [--out DIR]

1. Fits the basis on `--fit` training sentences read by piper-joe (the first of the synthetic
   corpus plan's piper-joe "train" items: WordNet example sentences outside the held-out split).
2. Evaluates on the sets `michi eval all` uses, `--limit` items each: held-out sentences
   (`michi.eval.speech.default_sentences`) read by piper-joe (seed 0, as the TTS reference) and by
   the held-out voice flite-awb, and the Asterisk human prompts (8 kHz telephone speech).
3. Per set and per K: the Whisper judge's WER (tiny.en, as `michi eval`) on the original and on the
   analytic resynthesis (encode -> decode, the decoder's 720-sample delay removed); the log-mel L1
   between them (`michi.audio.mel.log_mel_spectrogram`: 100 mels, hop 256, as `michi eval codec`
   reports it) and on the codec's own 80-bin causal log-mel; the L1 of the projection alone (log-mel
   -> latent -> log-mel, no audio); the share of log-mel variance the latent keeps; and voicing
   agreement (`voicing`: autocorrelation periodicity per 10 ms frame).

Writes `report.json` and `spectrogram.png` (original and resynthesis at each K, one item per set)
to `--out` (default shared/weights/melpca-probe). About 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..audio.mel import log_mel_spectrogram
from ..model import melpca
from ..model.melpca import MelPCACodec, causal_log_mel, fit_basis, tick_vectors
from .voicing import F0_RANGE_HZ, SPEECH_DB, VOICING_THRESHOLD, voicing_counts, voicing_figures
from .wer import summary, word_errors

RATE = melpca.SAMPLE_RATE
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "weights" / "melpca-probe"

def _l1(a: torch.Tensor, b: torch.Tensor, time_dim: int) -> tuple[float, int]:
    """(sum of |a - b|, count) over the frames both have; `time_dim` is the frame axis."""
    n = min(a.shape[time_dim], b.shape[time_dim])
    d = a.narrow(time_dim, 0, n) - b.narrow(time_dim, 0, n)
    return float(d.abs().sum()), d.numel()


def log(msg: str, t0: float) -> None:
    print(f"[melpca-probe {time.perf_counter() - t0:6.0f} s] {msg}", flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m michi.eval.melpca_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", type=int, default=150, help="piper-joe training sentences the basis is fit on")
    ap.add_argument("--limit", type=int, default=20, help="items per evaluation set")
    ap.add_argument("--ks", type=int, nargs="+", default=[32, 64], help="latent sizes to evaluate")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="directory for report.json and spectrogram.png")
    ap.add_argument("--whisper-threads", type=int, default=2)
    ap.add_argument("--save-basis", action="store_true", help="also write basis.safetensors (largest K)")
    return ap.parse_args(argv)


def _fit_texts(n_fit: int, limit: int) -> tuple[list[str], list[str]]:
    """(fit sentences, held-out sentences); raises if they overlap."""
    from ..data.synth import make_plan
    from . import speech

    plan = make_plan()
    fit_texts = [it.text for it in plan if it.voice == "piper-joe" and it.split == "train"][:n_fit]
    held_texts = speech.default_sentences(limit)
    overlap = set(fit_texts) & set(held_texts)
    if overlap:
        raise RuntimeError(f"fit and held-out sentences overlap: {sorted(overlap)[:3]}")
    return fit_texts, held_texts


def _synth_fit_clips(fit_texts: list[str], t0: float) -> list:
    from ..data import voices

    fit_clips = []
    for i, text in enumerate(fit_texts):
        fit_clips.append(voices.synthesize("piper-joe", text, seed=1000 + i))
        if (i + 1) % 25 == 0 or i + 1 == len(fit_texts):
            log(f"fit corpus: {i + 1}/{len(fit_texts)} sentences synthesised by piper-joe", t0)
    return fit_clips


def _fit(args: argparse.Namespace, out: Path, fit_texts: list[str], timings: dict[str, float],
         t: float, t0: float) -> tuple[Any, float, dict[int, MelPCACodec]]:
    """Synthesise the fit corpus, fit the basis; (full basis, fit audio seconds, codec per K)."""
    fit_clips = _synth_fit_clips(fit_texts, t0)
    timings["synth_fit"] = time.perf_counter() - t
    t = time.perf_counter()
    kmax = max(args.ks)
    full = fit_basis(fit_clips, k=max(kmax, 128))
    timings["fit"] = time.perf_counter() - t
    fit_audio_s = sum(len(c) for c in fit_clips) / RATE
    log(f"basis fit on {full.ticks} ticks ({fit_audio_s:.0f} s of audio) in {timings['fit']:.1f} s; variance "
        f"kept " + ", ".join(f"K={k}: {100 * full.truncate(k).variance_kept:.1f} %"
                             for k in sorted({*args.ks, 16, 128})), t0)
    codecs = {k: MelPCACodec.from_basis(full.truncate(k)).eval() for k in args.ks}
    if args.save_basis:
        full.truncate(kmax).save(out / "basis.safetensors")
    return full, fit_audio_s, codecs


def _eval_sets(held_texts: list[str], limit: int) -> dict[str, list]:
    from ..data import voices
    from . import speech

    return {
        "heldout_sentence_piper_joe": [speech.SpeechItem(id=f"piper-joe-{i:03d}", text=s,
                                                         pcm=voices.synthesize("piper-joe", s, seed=0),
                                                         split="heldout_sentence", speaker="joe")
                                       for i, s in enumerate(held_texts)],
        "heldout_voice_flite_awb": speech.synthetic_items(held_texts, voices.DEFAULT_HELDOUT_VOICE),
        "asterisk": speech.asterisk_prompts(limit),
    }


def _evaluate_item(item: Any, set_name: str, index: int, codecs: dict[int, MelPCACodec], judge: Any,
                   examples: dict[str, dict[str, np.ndarray]], acc: dict[str, float]) -> dict[str, Any]:
    """One item's row: the judge on the original and, per K, on the resynthesis, plus the L1s and
    voicing; adds to acc's "codec", "judge" and "audio" seconds."""
    pcm = item.audio(RATE).astype(np.float32)
    acc["audio"] += len(pcm) / RATE
    tj = time.perf_counter()
    row: dict[str, Any] = {"id": item.id, "set": set_name, "ref": item.text,
                           "duration_s": len(pcm) / RATE, "hyp_original": judge(pcm, RATE)}
    acc["judge"] += time.perf_counter() - tj
    x = torch.from_numpy(pcm)
    mel100_o, mel80_o = log_mel_spectrogram(x), causal_log_mel(x)
    ticks = tick_vectors(pcm, pad_end=True)
    if index == 0:
        examples[set_name] = {"original": pcm}
    for k, codec in codecs.items():
        tc = time.perf_counter()
        with torch.no_grad():
            resynth = codec.resynthesize(pcm).numpy()
            projected = codec.basis.reconstruct(codec.basis.project(ticks))
        acc["codec"] += time.perf_counter() - tc
        tj = time.perf_counter()
        hyp = judge(resynth, RATE)
        acc["judge"] += time.perf_counter() - tj
        res = torch.from_numpy(resynth)
        row[f"k{k}"] = {
            "hyp": hyp, "wer": word_errors(item.text, hyp).wer,
            "mel_l1": _l1(log_mel_spectrogram(res), mel100_o, -1),
            "mel80_l1": _l1(causal_log_mel(res), mel80_o, 0),
            "projection_l1": (float((projected - ticks).abs().sum()), ticks.numel()),
            "sq_error": float((projected - ticks).square().sum()),
            "voicing": voicing_counts(pcm, resynth)}
        if index == 0:
            examples[set_name][f"K = {k}"] = resynth
    row["wer_original"] = word_errors(item.text, row["hyp_original"]).wer
    row["_ticks"] = ticks
    return row


def _evaluate(sets: dict[str, list], codecs: dict[int, MelPCACodec], judge: Any, t0: float
              ) -> tuple[list[dict[str, Any]], dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """(rows, example audio per set, {"codec", "judge", "audio"} seconds)."""
    rows: list[dict[str, Any]] = []
    examples: dict[str, dict[str, np.ndarray]] = {}
    acc = {"codec": 0.0, "judge": 0.0, "audio": 0.0}
    for set_name, items in sets.items():
        for index, item in enumerate(items):
            rows.append(_evaluate_item(item, set_name, index, codecs, judge, examples, acc))
            done = len(rows)
            total = sum(len(v) for v in sets.values())
            if done % 5 == 0 or done == total:
                log(f"evaluated {done}/{total} items (judge {acc['judge']:.0f} s, codec {acc['codec']:.1f} s)", t0)
    return rows, examples, acc


def _figures(set_rows: list[dict], ks: list[int]) -> dict[str, Any]:
    out_: dict[str, Any] = {"items": len(set_rows), "audio_s": sum(r["duration_s"] for r in set_rows),
                            "wer_original": summary(set_rows, "ref", "hyp_original")["wer"]}
    ticks = torch.cat([r["_ticks"] for r in set_rows])
    total_var = float((ticks - ticks.mean(0)).square().sum())
    for k in ks:
        sub = [r[f"k{k}"] | {"ref": r["ref"]} for r in set_rows]
        s = summary(sub, "ref", "hyp")
        mel = [sum(x[key][i] for x in sub)
               for key in ("mel_l1", "mel80_l1", "projection_l1") for i in (0, 1)]
        vc = {key: sum(x["voicing"][key] for x in sub) for key in sub[0]["voicing"]}
        out_[f"k{k}"] = {"wer": s["wer"], "cer": s["cer"], "counts": s["counts"],
                         "mel_l1": mel[0] / mel[1], "mel80_l1": mel[2] / mel[3],
                         "projection_l1": mel[4] / mel[5],
                         "variance_kept": 1 - sum(x["sq_error"] for x in sub) / total_var,
                         **voicing_figures(vc), "voicing_counts": vc}
    return out_


def _metric_descriptions() -> dict[str, str]:
    return {
        "wer": "corpus WER of the Whisper judge (michi.eval.wer normalisation)",
        "mel_l1": "mean |log-mel difference|, log_mel_spectrogram (100 mels, hop 256), as michi eval codec",
        "mel80_l1": "the same on the codec's own causal 80-bin log-mel (hop 240)",
        "projection_l1": "log-mel -> latent -> log-mel, no audio: what the projection alone loses",
        "variance_kept": "1 - squared projection error / total variance of the set's tick vectors",
        "voicing": f"per 10 ms frame within {SPEECH_DB:.0f} dB of the clip's loudest: voiced when the "
                   "autocorrelation peak (spectrally flattened, window-normalised) over f0 "
                   f"{F0_RANGE_HZ[0]:.0f}-{F0_RANGE_HZ[1]:.0f} Hz "
                   f">= {VOICING_THRESHOLD}; agreement = same decision as the original; voiced_recall = "
                   "original's voiced frames also voiced in the resynthesis; f0_agreement = frames voiced "
                   "in both "
                   "whose f0 (autocorrelation peak) agrees within 5 %; periodicity = mean peak normalised "
                   "autocorrelation on the original's voiced frames, original -> resynthesis"}


def _report(argv: list[str] | None, args: argparse.Namespace, fit_texts: list[str], full: Any,
            fit_audio_s: float, judge: Any, per_set: dict[str, Any], timings: dict[str, float],
            audio_s: float, wall: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "what": "mel-PCA latent + analytic decoder (random phase, overlap-add), no training",
        "command": "python -m michi.eval.melpca_probe " + " ".join(argv if argv is not None else sys.argv[1:]),
        "codec": {"sample_rate": RATE, "hop": melpca.HOP, "window": melpca.WINDOW, "n_fft": melpca.N_FFT,
                  "n_mels": melpca.N_MELS, "f_max": melpca.F_MAX, "log_floor": melpca.LOG_FLOOR,
                  "frames_per_tick": melpca.FRAMES_PER_TICK, "decoder_delay_samples": melpca.DECODER_DELAY,
                  "ks": args.ks},
        "fit": {"voice": "piper-joe", "sentences": len(fit_texts), "source": "michi.data.synth.make_plan() "
                "piper-joe train items (WordNet examples, train split), piper seed 1000 + index",
                "ticks": full.ticks, "audio_s": fit_audio_s,
                "variance_kept": {str(k): full.truncate(k).variance_kept for k in sorted({*args.ks, 16, 128})}},
        "sets_source": {"heldout_sentence_piper_joe":
                        "michi.eval.speech.default_sentences(limit), piper-joe seed 0",
                        "heldout_voice_flite_awb": "the same sentences by the held-out voice flite-awb",
                        "asterisk": "michi.eval.speech.asterisk_prompts(limit): one human speaker, 8 kHz"},
        "judge": judge.describe(),
        "metrics": _metric_descriptions(),
        "sets": per_set,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "timings_s": {**timings, "audio_evaluated_s": audio_s, "wall": wall},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    from . import speech

    # ---- fit ----
    t = time.perf_counter()
    fit_texts, held_texts = _fit_texts(args.fit, args.limit)
    full, fit_audio_s, codecs = _fit(args, out, fit_texts, timings, t, t0)

    # ---- evaluation sets ----
    t = time.perf_counter()
    sets = _eval_sets(held_texts, args.limit)
    timings["synth_eval"] = time.perf_counter() - t
    log("evaluation sets: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()), t0)

    judge = speech.WhisperJudge(threads=args.whisper_threads)
    rows, examples, acc = _evaluate(sets, codecs, judge, t0)
    timings.update(judge=acc["judge"], codec=acc["codec"])

    # ---- figures ----
    per_set = {name: _figures([r for r in rows if r["set"] == name], args.ks) for name in sets}
    for r in rows:
        del r["_ticks"]
    wall = time.perf_counter() - t0
    report = _report(argv, args, fit_texts, full, fit_audio_s, judge, per_set, timings, acc["audio"], wall, rows)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_spectrograms(examples, out / "spectrogram.png")
    log(f"wrote {out / 'report.json'} and {out / 'spectrogram.png'}", t0)
    print_table(per_set, args.ks)
    print(f"wall time {wall:.0f} s")
    return 0


def print_table(per_set: dict[str, Any], ks: list[int]) -> None:
    head = f"{'set':30s} {'WER orig':>9s}" + "".join(f" {'WER K=' + str(k):>9s}" for k in ks)
    print(head)
    for name, f in per_set.items():
        wers = "".join(f" {100 * f[f'k{k}']['wer']:8.1f}%" for k in ks)
        print(f"{name:30s} {100 * f['wer_original']:8.1f}%{wers}")
    for k in ks:
        for name, f in per_set.items():
            g = f[f"k{k}"]
            print(f"K={k:<3d} {name:30s} mel L1 {g['mel_l1']:.3f}  mel80 L1 {g['mel80_l1']:.3f}  "
                  f"projection L1 {g['projection_l1']:.3f}  variance kept {100 * g['variance_kept']:.1f} %  "
                  f"voicing agreement {100 * g['voicing_agreement']:.1f} %  voiced recall "
                  f"{100 * (g['voiced_recall'] or 0):.1f} %  "
                  f"f0 agreement {100 * (g['f0_agreement'] or 0):.1f} %  "
                  f"periodicity {g['periodicity_original'] or 0:.2f} -> {g['periodicity_resynth'] or 0:.2f}")


def plot_spectrograms(examples: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(examples)
    kinds = list(next(iter(examples.values())))
    fig, axes = plt.subplots(len(kinds), len(names), figsize=(5.5 * len(names), 2.4 * len(kinds)),
                             squeeze=False, constrained_layout=True)
    for j, name in enumerate(names):
        for i, kind in enumerate(kinds):
            mel = causal_log_mel(torch.from_numpy(examples[name][kind])).numpy().T
            ax = axes[i][j]
            ax.imshow(mel, origin="lower", aspect="auto", vmin=-11.5, vmax=max(2.0, float(mel.max())),
                      extent=(0, mel.shape[1] / 100, 0, mel.shape[0]), cmap="magma")
            ax.set_title(f"{name}: {kind}", fontsize=9)
            ax.set_ylabel("mel bin", fontsize=8)
            if i == len(kinds) - 1:
                ax.set_xlabel("s", fontsize=8)
    fig.suptitle("log-mel (80 bins, hop 10 ms): original vs mel-PCA latent -> analytic decoder", fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    shrink_png(path)


def shrink_png(path: Path) -> None:
    """Re-save a figure with a 256-colour palette: half the bytes, no visible change on a colormap."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        quantized = im.convert("RGB").quantize(256)
    quantized.save(path, optimize=True)


if __name__ == "__main__":
    raise SystemExit(main())
