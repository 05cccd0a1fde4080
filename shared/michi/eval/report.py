"""The `michi eval` report: one JSON file (what model, on what machine, every metric and per-item
row, wall time) and PNG figures beside it (per-item WER bars, log-mel spectrograms of one sentence:
reference voice, model TTS, held-out original, codec resynthesis)."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

REPORT_FORMAT = "michi-eval-report"
REPORT_VERSION = 1


def describe_model(source: str, michi) -> dict[str, Any]:
    """Where the model came from, whether it is trained, and the SHA-256 of its weights file (the
    one `config.json` records, checked when the checkpoint was loaded; computed if absent)."""
    from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, sha256_file

    path = Path(source)
    out: dict[str, Any] = {"source": str(source), "preset": michi.cfg.preset, "trained": michi.trained,
                           "sha256": None, "parameters": michi.parameter_counts().get("total")}
    if (path / CONFIG_FILE).is_file():
        out["path"] = str(path.resolve())
        out["sha256"] = michi.info.get("sha256")
        if not out["sha256"] and (path / WEIGHTS_FILE).is_file():
            out["sha256"] = sha256_file(path / WEIGHTS_FILE)
    out["info"] = {k: v for k, v in michi.info.items() if k != "sha256"}
    return out


def machine_info(device: str | None = None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        import faster_whisper

        info["faster_whisper"] = faster_whisper.__version__
    except (ImportError, AttributeError):
        pass
    try:  # the code version, when run from a git checkout
        root = Path(__file__).resolve().parents[3]  # shared/michi/eval -> the repo root
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def new_report(command: str, model: dict[str, Any], machine: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model, "machine": machine,
            "options": options, "results": {}, "timings_s": {}, "figures": []}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _clean(obj: Any) -> Any:
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(report), indent=2, ensure_ascii=False, default=_json_default))
    tmp.replace(path)
    return path


# ---- figures ----------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wer_figure(results: dict[str, Any], path: Path, max_items: int = 40) -> Path | None:
    """Per-item WER bars: TTS (model vs reference voice), codec (original vs resynthesis), listen
    (per item, coloured by set)."""
    panels = []
    if "tts" in results and results["tts"].get("rows"):
        rows = results["tts"]["rows"][:max_items]
        series = {"model TTS": [r["wer"] for r in rows]}
        if any("reference_wer" in r for r in rows):
            series["reference voice"] = [r.get("reference_wer", float("nan")) for r in rows]
        panels.append(("TTS: judge WER per sentence", [r["id"] for r in rows], series))
    if "codec" in results and results["codec"].get("rows"):
        rows = results["codec"]["rows"][:max_items]
        panels.append(("codec: judge WER per item", [f"{r['set']}:{r['id']}" for r in rows],
                       {"original": [r["wer_original"] for r in rows],
                        "resynthesis": [r["wer_resynth"] for r in rows]}))
    if "listen" in results and results["listen"].get("rows"):
        rows = results["listen"]["rows"]
        by_set: dict[str, list[dict]] = {}
        for r in rows:
            by_set.setdefault(r["set"], []).append(r)
        keep = [r for set_rows in by_set.values() for r in set_rows[: max(1, max_items // len(by_set))]]
        panels.append(("listen text head: WER / CER per item", [f"{r['set']}:{r['id']}" for r in keep],
                       {"WER": [r["wer"] for r in keep], "CER": [r["cer"] for r in keep]}))
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.3 * max_items), 3.2 * len(panels)), squeeze=False)
    for ax, (title, labels, series) in zip(axes[:, 0], panels):
        x = np.arange(len(labels))
        width = 0.8 / len(series)
        for k, (name, values) in enumerate(series.items()):
            ax.bar(x + (k - (len(series) - 1) / 2) * width, np.minimum(values, 2.0), width, label=name)
        ax.set_xticks(x, [label[:28] for label in labels], rotation=70, ha="right", fontsize=6)
        ax.set_ylim(0, 2.05)
        ax.set_ylabel("WER (capped at 2)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spectrogram_figure(panels: list[tuple[str, str | Path]], path: Path) -> Path | None:
    """Log-mel spectrograms of WAV files, one row each, on one colour scale."""
    import torch

    from ..audio.io import read_wav
    from ..audio.mel import log_mel_spectrogram
    from ..config import SAMPLE_RATE_HZ

    mels = []
    for label, wav in panels:
        if wav and Path(wav).is_file():
            pcm, _ = read_wav(wav, rate_out_hz=SAMPLE_RATE_HZ)
            mels.append((label, log_mel_spectrogram(torch.from_numpy(pcm)).numpy()))
    if not mels:
        return None
    plt = _plt()
    width = max(m.shape[1] for _, m in mels)
    fig, axes = plt.subplots(len(mels), 1, figsize=(10, 2.0 * len(mels)), squeeze=False)
    lo = min(float(np.percentile(m, 1)) for _, m in mels)
    hi = max(float(m.max()) for _, m in mels)
    for ax, (label, mel) in zip(axes[:, 0], mels):
        ax.imshow(mel, origin="lower", aspect="auto", vmin=lo, vmax=hi, cmap="magma",
                  extent=(0, mel.shape[1] * 256 / SAMPLE_RATE_HZ, 0, mel.shape[0]))
        ax.set_xlim(0, width * 256 / SAMPLE_RATE_HZ)
        ax.set_ylabel("mel bin")
        ax.set_title(label, fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def spectrogram_panels(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The first sentence with saved audio: reference voice and model TTS; the first codec item
    (the same sentence when the sets line up): original and resynthesis."""
    panels: list[tuple[str, str]] = []
    tts = results.get("tts", {})
    first = next((r for r in tts.get("rows", []) if r.get("wav")), None)
    if first is not None:
        if first.get("reference_wav"):
            panels.append((f"reference voice ({tts['reference_voice']['voice']}): judge heard "
                           f"{first['reference_hyp']!r}", first["reference_wav"]))
        panels.append((f"model TTS: judge heard {first['hyp']!r}", first["wav"]))
    codec = results.get("codec", {})
    rows = [r for r in codec.get("rows", []) if r.get("wav_original")]
    if rows:
        text = first["ref"] if first is not None else None
        row = next((r for r in rows if r["ref"] == text), rows[0])
        panels.append((f"original ({row['set']}:{row['id']}): judge heard {row['hyp_original']!r}",
                       row["wav_original"]))
        panels.append((f"codec resynthesis: judge heard {row['hyp_resynth']!r}", row["wav_resynth"]))
    return panels


def make_figures(results: dict[str, Any], out_dir: str | Path) -> list[str]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [wer_figure(results, out_dir / "wer_per_item.png"),
            spectrogram_figure(spectrogram_panels(results), out_dir / "spectrograms.png")]
    return [str(p) for p in made if p is not None]


# ---- terminal summary -------------------------------------------------------------------------
def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else "n/a"


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    if "tts" in results:
        r = results["tts"]
        ref = r.get("reference_voice")
        lines.append(f"tts     WER {_pct(r['wer'])} on {r['items']} sentences"
                     + (f"; reference voice {ref['voice']}: {_pct(ref['wer'])}" if ref else ""))
    if "codec" in results:
        r = results["codec"]
        mel = r.get("mel_l1")
        comp = r.get("mel_l1_delay_compensated")
        lines.append(f"codec   WER resynthesis {_pct(r['wer_resynth'])} vs original {_pct(r['wer_original'])} "
                     f"on {r['items']} items; log-mel L1 {mel if mel is None else f'{mel:.3f}'} "
                     f"({comp if comp is None else f'{comp:.3f}'} at {r['delay_ms']:.1f} ms delay); voicing "
                     f"agreement {_pct(r.get('voicing_agreement'))}, f0 agreement {_pct(r.get('f0_agreement'))}")
        for name, s in r.get("sets", {}).items():
            lines.append(f"        {name}: WER {_pct(s['wer_resynth'])} vs {_pct(s['wer_original'])}, voicing "
                         f"agreement {_pct(s.get('voicing_agreement'))}")
    if "listen" in results:
        for source, r in results["listen"].get("sources", {"head": results["listen"]}).items():
            per = ", ".join(f"{name} {_pct(s['wer'])} (CER {_pct(s['cer'])}, {s['items']})"
                            for name, s in r["sets"].items())
            lag = r.get("lag_s") or {}
            lag_text = (f"; lag p50 {lag['p50'] * 1e3:.0f} ms, p95 {lag['p95'] * 1e3:.0f} ms"
                        if lag.get("p50") is not None else "")
            rtf = f"; RTF {r['rtf']:.3f}" if "rtf" in r else ""
            lines.append(f"listen  {source}: WER {per}{lag_text}{rtf}")
    for name, r in results.items():
        if name not in ("tts", "codec", "listen"):
            if isinstance(r, dict) and "error" in r:
                lines.append(f"{name:<7} error: {r['error']}")
            else:
                lines.append(f"{name:<7} see the report")
    return lines
