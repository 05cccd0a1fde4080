"""`michi` command line: info, synth, continue, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .api import UNTRAINED_WARNING, Michi, load
from .config import MichiConfig, preset
from .model.backbone import backbone_config_from_hf
from .model.michi import MichiModel


def _warn_untrained(michi: Michi) -> None:
    if not michi.trained:
        print(f"WARNING: {UNTRAINED_WARNING}", file=sys.stderr)


def _config_for(source: str, backbone: str | None) -> tuple[MichiConfig, dict]:
    from .checkpoint import CONFIG_FILE, read_checkpoint_config

    if (Path(source) / CONFIG_FILE).is_file():
        return read_checkpoint_config(source)
    cfg = preset(source)
    if backbone:
        cfg.backbone = backbone_config_from_hf(backbone)
    return cfg, {"trained": False, "weights": "random init"}


def cmd_info(args: argparse.Namespace) -> int:
    cfg, info = _config_for(args.model, args.backbone)
    with torch.device("meta"):  # count parameters without allocating them
        counts = MichiModel(cfg, load_pretrained=False).parameter_counts()
    b = cfg.backbone
    print(f"model: {args.model} (preset {cfg.preset}); weights: {'trained' if info.get('trained') else 'UNTRAINED'}"
          f" ({info.get('weights', info.get('note', ''))})")
    print(f"backbone: hidden {b.hidden_size}, {b.num_layers} layers, {b.num_heads}/{b.num_kv_heads} heads, "
          f"FFN {b.ffn_size}, vocab {b.vocab_size} (+stream tokens), tokenizer {b.tokenizer}")
    print(f"audio: {cfg.sample_rate_hz} Hz, {cfg.frame_samples} samples per 80 ms tick, latent dim {cfg.latent_dim}")
    print("parameters:")
    for part, n in counts.items():
        print(f"  {part:<14}{n:>14,}  ({n / 1e6:.1f}M)")
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "parameters": counts, "info": info}, indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .audio.io import write_wav
    from .generate import tts

    michi = load(args.model, seed=args.seed)
    _warn_untrained(michi)
    t0 = time.perf_counter()
    gen = tts(michi, args.text, continue_ticks=args.continue_ticks, seed=args.seed)
    elapsed = time.perf_counter() - t0
    write_wav(args.out, gen.audio, michi.cfg.sample_rate_hz)
    seconds = len(gen.audio) / michi.cfg.sample_rate_hz
    print(f"wrote {args.out}: {seconds:.2f} s of 24 kHz audio in {len(gen.ticks)} ticks "
          f"({elapsed:.2f} s, {elapsed / seconds:.2f} x real time)")
    print(f"agent text: {gen.text!r}")
    return 0


def cmd_continue(args: argparse.Namespace) -> int:
    from .audio.io import read_wav, write_wav
    from .generate import continue_audio

    michi = load(args.model, seed=args.seed)
    _warn_untrained(michi)
    pcm, rate = read_wav(args.prompt)
    gen = continue_audio(michi, pcm, rate, ticks=args.ticks, seed=args.seed)
    write_wav(args.out, gen.audio, michi.cfg.sample_rate_hz)
    print(f"wrote {args.out}: {len(gen.audio) / michi.cfg.sample_rate_hz:.2f} s continuing "
          f"{len(pcm) / rate:.2f} s of prompt")
    print(f"agent text: {gen.text!r}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run_bench

    presets = args.presets.split(",")
    ticks = {name: args.ticks if args.ticks else (100 if name == "tiny" else 30) for name in presets}
    report = run_bench(presets, ticks, args.warmup, args.device, Path(args.json))
    print(format_report(report))
    print(f"report: {args.json}")
    if any(not r["trained_weights"] for r in report["presets"].values()):
        print("(random weights: timing only)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="michi", description="Michi: a full-duplex speech language model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="tiny", help="preset (tiny, full) or checkpoint directory")
        sp.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("info", help="config and parameter count per part")
    sp.add_argument("--model", default="tiny", help="preset (tiny, full) or checkpoint directory")
    sp.add_argument("--backbone", default=None, help="local Hugging Face Llama checkpoint directory")
    sp.add_argument("--json", action="store_true", help="also print the config as JSON")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("synth", help="text to a 24 kHz WAV (causal TTS)")
    sp.add_argument("text")
    sp.add_argument("--out", "-o", default="michi.wav")
    sp.add_argument("--continue-ticks", type=int, default=12, help="free ticks after the text")
    model_arg(sp)
    sp.set_defaults(func=cmd_synth)

    sp = sub.add_parser("continue", help="continue an audio prompt, to a 24 kHz WAV")
    sp.add_argument("prompt", help="audio file (WAV, FLAC, ...), any common rate")
    sp.add_argument("--out", "-o", default="michi-continued.wav")
    sp.add_argument("--ticks", type=int, default=25, help="ticks (80 ms each) to generate")
    model_arg(sp)
    sp.set_defaults(func=cmd_continue)

    sp = sub.add_parser("bench", help="per-tick latency of each part; JSON report")
    sp.add_argument("--presets", default="tiny,full")
    sp.add_argument("--ticks", type=int, default=0, help="measured ticks (default 100 tiny, 30 full)")
    sp.add_argument("--warmup", type=int, default=5)
    sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sp.add_argument("--json", default="bench.json")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
