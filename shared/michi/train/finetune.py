"""Fine-tuning on a target speaker from a folder of their recordings (the seed: under an hour).

The folder goes through the same pipeline as any audio (`michi data audio`: VAD segmentation,
Whisper transcription with word timestamps), is encoded with the model's own (frozen) codec, and
the backbone and speak head continue the joint stage on it, with pure text still mixed in so the
LM keeps what it knew. The latent normalisation stays the base model's: the codec is unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..api import resolve_source
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import TICK_S
from .batches import SequenceBank
from .loop import StageBudget, run_stage, setup, stage_info
from .recipe import encode_corpus, text_bank
from .stages import OptimConfig, SequenceConfig, SequenceStage


@torch.no_grad()
def speech_loss(model, bank: SequenceBank, batches: int = 8, seed: int = 0) -> dict[str, float]:
    """Mean flow and text losses on `bank` with fixed draws: the same number before and after."""
    from .stages import SequenceLosses

    losses = SequenceLosses(model, flow_repeats=4)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    model.eval()
    sums = {"flow": 0.0, "text": 0.0}
    for _ in range(batches):
        b = bank.batch(8, 128, gen, phone_frames=model.cfg.phone_frames)
        out = losses.speech(**{k: v.to(dev) for k, v in vars(b).items()})
        for key in sums:
            sums[key] += out[key].item() / batches
    return sums


def finetune(model: str | None, audio_dir: str | Path, out: str | Path, steps: int = 500,
             minutes: float | None = None, device: str | None = None, speaker: str = "target",
             whisper_model: str | None = None, lr: float = 2e-4, text_ratio: float = 0.2,
             workers: int = 2, progress: Callable[[str], None] = print) -> Path:
    from ..data.audio_corpus import run_audio

    out = Path(out)
    corpus = out / "corpus"
    d = setup(device)
    if not run_audio(str(audio_dir), str(corpus), whisper_model=whisper_model, speaker=speaker,
                     heldout_fraction=0.1, workers=workers, verbose=False):
        raise RuntimeError(f"the audio pipeline failed on {audio_dir}; see {corpus}")
    base = resolve_source(model or "default")
    net, info = load_checkpoint(base, device=d.device)
    if not (out / "latents" / "manifest.json").is_file():
        encode_corpus(net.eval(), corpus, out / "latents", progress=progress)
    speech = SequenceBank(out / "latents", "train", pad_token=net.backbone.vocab.pad)
    progress(f"[finetune] {len(speech.utterances)} utterances, {speech.ticks * TICK_S / 60:.1f} min of {speaker}")
    before = speech_loss(net, speech)
    sc = SequenceConfig(batch_size=16, text_ratio=text_ratio)
    stage = SequenceStage("finetune", "joint", net, d, sc, OptimConfig(lr=lr, warmup_steps=min(50, steps // 5 + 1)),
                          speech, text_bank(net) if text_ratio > 0 else None)
    run_stage(stage, out / "finetune", StageBudget(steps=steps, minutes=minutes), d, progress=progress)
    after = speech_loss(net, speech)
    progress(f"[finetune] loss on {speaker}: flow {before['flow']:.4f} -> {after['flow']:.4f}, "
             f"text {before['text']:.4f} -> {after['text']:.4f}")
    if d.main:
        save_checkpoint(net, out / "model", info={
            "trained": True, "what": f"fine-tuned on speaker {speaker!r} from {audio_dir}",
            "base_model": str(base), "base_sha256": info.get("sha256"),
            "finetune": stage_info(out / "finetune"), "speaker_minutes": round(speech.ticks * TICK_S / 60, 2),
            "loss_before": before, "loss_after": after})
        progress(f"model written to {out / 'model'}")
    return out / "model"
