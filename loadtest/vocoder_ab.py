"""Vocoder designs trained side by side in one run: the tiny preset's HiFi-GAN with an inverse-STFT
head against the 24 kHz HiFi-GAN it replaced.

    python -m loadtest.vocoder_ab --corpus data/synth --minutes 5 --json loadtest/results/vocoder-ab-cpu.json

Each design gets a fresh vocoder, trained by the recipe's vocoder stage (mel L1, no
discriminators) on the latents of the same frozen listen encoder (the default model's), with the
same batches, optimiser and wall-time budget, one after the other on this machine. Reported per
design: steps, steps per second, the training mel L1 over time, and the log-mel L1 of held-out
utterances resynthesised at the end (lower is better). Writes JSON and a PNG of the curves.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from .common import say

# The tiny preset's vocoder before the iSTFT head: HiFi-GAN V3-style, upsampling to 24 kHz.
HIFIGAN_24K = dict(initial_channels=128, upsample_rates=(8, 8, 5, 6), upsample_kernel_sizes=(16, 16, 10, 12),
                   resblock_kernel_sizes=(3, 7), resblock_dilations=((1, 2), (3, 12)), resblock_type=2)


def designs() -> dict:
    from michi.config import VocoderConfig, tiny

    return {"hifigan-24k": VocoderConfig(**HIFIGAN_24K), "istft": tiny().vocoder}


def heldout_mel_l1(model, audio: list[np.ndarray]) -> float:
    """Mean log-mel L1 of encode -> vocode resynthesis over whole utterances."""
    from michi.model.discriminators import mel_l1_loss

    frame = model.cfg.frame_samples
    losses = []
    with torch.inference_mode():
        for pcm in audio:
            x = torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None]
            x = torch.nn.functional.pad(x, (0, -x.shape[1] % frame))
            fake = model.vocoder(model.listen(x).latents)
            losses.append(float(mel_l1_loss(x, fake)))
    return float(np.mean(losses))


def train_design(name: str, vc, args, bank, heldout, work: Path) -> dict:
    from michi.checkpoint import load_checkpoint
    from michi.model.tokenizer import load_tokenizer
    from michi.model.vocoder import Vocoder
    from michi.train.loop import Dist, StageBudget, run_stage
    from michi.train.stages import CodecConfig, CodecStage, OptimConfig

    model, _ = load_checkpoint(args.model)
    model.cfg.vocoder = vc
    torch.manual_seed(args.seed)
    model.vocoder = Vocoder(model.cfg)
    params = sum(p.numel() for p in model.vocoder.parameters())
    tok = load_tokenizer(model.cfg.backbone.tokenizer, model.cfg.backbone.vocab_size)
    cc = CodecConfig(batch_size=args.batch, adversarial_after=1.0)
    stage = CodecStage(model, bank, tok, Dist(), cc, OptimConfig(lr=args.lr, warmup_steps=50),
                       seed=args.seed, name="vocoder")
    say(f"[{name}] {params / 1e6:.2f}M parameters, {args.minutes} min")
    run_stage(stage, work / name, StageBudget(steps=10**9, minutes=args.minutes, log_every=20, save_every=10**9),
              Dist(), progress=lambda line: say(f"[{name}] {line}"))
    rows = [json.loads(line) for line in (work / name / "losses.jsonl").read_text().splitlines()]
    model.eval()
    steps, wall = rows[-1]["step"], rows[-1]["wall_s"]
    result = {"parameters": params, "steps": steps, "wall_s": wall, "steps_per_s": round(steps / wall, 3),
              "final_train_mel_l1": rows[-1]["mel"], "heldout_mel_l1": round(heldout_mel_l1(model, heldout), 4),
              "curve": [{"step": r["step"], "wall_s": r["wall_s"], "mel": round(r["mel"], 4)} for r in rows]}
    say(f"[{name}] {steps} steps ({result['steps_per_s']}/s), held-out mel L1 {result['heldout_mel_l1']}")
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        wall = [c["wall_s"] for c in r["curve"]]
        mel = [c["mel"] for c in r["curve"]]
        axes[0].plot(wall, mel, label=f"{name} (held-out {r['heldout_mel_l1']:.3f})")
        axes[1].plot([c["step"] for c in r["curve"]], mel, label=name)
    axes[0].set(xlabel="wall time (s)", ylabel="training mel L1", title="same wall time")
    axes[1].set(xlabel="step", ylabel="training mel L1", title="per step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="corpus directory (michi data synth)")
    p.add_argument("--model", default="default", help="whose frozen listen encoder makes the latents")
    p.add_argument("--minutes", type=float, default=5.0, help="wall time per design")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heldout", type=int, default=40, help="held-out utterances for the final mel L1")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="loadtest/results/vocoder-ab-cpu.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from michi.api import resolve_source

    args.model = str(resolve_source(args.model))
    from michi.train.batches import AudioBank, load_segments, read_audio

    say(f"loading audio from {args.corpus}")
    bank = AudioBank(args.corpus, load_segments(args.corpus))
    heldout = read_audio(args.corpus, load_segments(args.corpus, ("heldout_sentence",))[:args.heldout])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, vc in designs().items():
            results[name] = train_design(name, vc, args, bank, heldout, Path(tmp))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "designs": results,
              "ratios": {"steps_per_s": round(results["istft"]["steps_per_s"] / results["hifigan-24k"]["steps_per_s"], 2),
                         "heldout_mel_l1": round(results["istft"]["heldout_mel_l1"]
                                                 / results["hifigan-24k"]["heldout_mel_l1"], 3)}}
    out.write_text(json.dumps(report, indent=2))
    plot(results, out.with_suffix(".png"))
    say(f"istft / hifigan-24k: {report['ratios']['steps_per_s']}x the steps per second, held-out mel L1 "
        f"ratio {report['ratios']['heldout_mel_l1']}; wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
