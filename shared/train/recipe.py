"""The staged recipe, in one run directory:

    text -> codec -> vocoder -> (latents) -> speak -> joint    the model
    text -------------------------------------------> baseline    same budget as joint, text only

The vocoder stage trains the vocoder alone on the frozen listen encoder's latents (with
`new_vocoder`, a fresh vocoder of the preset's design in place of the init model's).

Each stage lives in `<run>/<stage>/` (state.pt, losses.jsonl, losses.png) and is skipped when
finished, so rerunning the same command resumes the recipe where it stopped. Between codec and
speak, the corpus is encoded with the just-trained listen encoder into `<run>/latents/` (shards
and manifest) and the latent normalisation statistics are set from the training shards. The
results are two Michi checkpoints: `<run>/model/` (joint) and `<run>/baseline/model/`.
"""
from __future__ import annotations

import copy
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import preset as preset_config
from ..model.michi import MichiModel
from ..model.tokenizer import StreamVocab, load_tokenizer
from ..model.vocoder import Vocoder
from .batches import AudioBank, SequenceBank, TextBank, load_segments, read_audio
from .loop import StageBudget, barrier, run_stage, setup, stage_info
from .stages import CodecConfig, CodecStage, OptimConfig, SequenceConfig, SequenceStage

STAGES = ("text", "codec", "vocoder", "speak", "joint", "baseline")


@dataclass
class RecipeConfig:
    corpus: str
    out: str
    preset: str = "tiny"
    init: str | None = None  # start from this Michi checkpoint instead of the preset's random init
    # With init: replace its vocoder by a new one of the preset's design (then train the vocoder
    # stage; the listen encoder's latents, and so what the speak head learned, stay valid).
    new_vocoder: bool = False
    device: str | None = None
    seed: int = 0
    tts_speakers: list[str] | None = None  # speak/joint train on these voices (None: all)
    text_file: str | None = None  # pure text (michi.data.text.read_texts; None: the offline corpus)
    steps: dict[str, int] = field(default_factory=lambda: {
        "text": 2000, "codec": 3000, "vocoder": 1000, "speak": 1000, "joint": 3000})
    minutes: dict[str, float] = field(default_factory=dict)  # optional wall-time cap per stage
    lr: dict[str, float] = field(default_factory=lambda: {
        "text": 1e-3, "codec": 2e-4, "vocoder": 2e-4, "speak": 1e-3, "joint": 5e-4})
    codec: CodecConfig = field(default_factory=CodecConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    stages: tuple[str, ...] = STAGES


def _budget(rc: RecipeConfig, stage: str) -> StageBudget:
    if stage == "baseline":  # exactly the steps the joint stage took (it may have hit its time cap)
        steps = stage_info(Path(rc.out) / "joint")["steps"] or rc.steps["joint"]
        return StageBudget(steps=steps, save_every=max(100, steps // 10))
    steps = rc.steps[stage]
    return StageBudget(steps=steps, minutes=rc.minutes.get(stage), save_every=max(100, steps // 10))


def _optim(rc: RecipeConfig, stage: str) -> OptimConfig:
    lr = rc.lr["joint" if stage == "baseline" else stage]
    steps = rc.steps["joint" if stage == "baseline" else stage]
    return OptimConfig(lr=lr, warmup_steps=min(100, max(1, steps // 10)))


def text_bank(model: MichiModel, text_file: str | Path | None = None) -> TextBank:
    tok = load_tokenizer(model.cfg.backbone.tokenizer, model.cfg.backbone.vocab_size)
    v = StreamVocab(model.cfg.backbone.vocab_size)
    from ..data.text import read_texts, text_corpus

    texts = read_texts(text_file) if text_file else text_corpus("train")
    return TextBank(texts, tok, v.bos, v.eos)


def encode_corpus(model: MichiModel, corpus: str | Path, out: str | Path, shard_size: int = 500,
                  progress: Callable[[str], None] = print) -> Path:
    """Latents + aligned tokens of every segment with this model's listen encoder -> shards."""
    from ..data.shards import encode_segment, write_manifest, write_shard

    out = Path(out)
    tok = load_tokenizer(model.cfg.backbone.tokenizer, model.cfg.backbone.vocab_size)
    vocab = StreamVocab(model.cfg.backbone.vocab_size)
    shards: list[dict] = []
    for split in ("train", "heldout_sentence", "heldout_voice"):
        segments = load_segments(corpus, (split,))
        for first in range(0, len(segments), shard_size):
            chunk = segments[first:first + shard_size]
            utterances = [encode_segment(model, tok, vocab, seg, pcm.astype(np.float32) / 32768.0)[0]
                          for seg, pcm in zip(chunk, read_audio(corpus, chunk))]
            name = f"shards/{split}-{len(shards):05d}.safetensors"
            write_shard(out / name, utterances)
            shards.append({"path": name, "split": split, "utterances": len(utterances),
                           "ticks": int(sum(len(u.tokens) for u in utterances))})
            progress(f"[latents] {name}: {len(utterances)} utterances")
    write_manifest(out, {"latent_dim": model.cfg.latent_dim, "delay_ticks": model.cfg.audio_delay_ticks,
                         "corpus": str(corpus), "shards": shards})
    return out


def set_latent_stats(model: MichiModel, bank: SequenceBank) -> None:
    mean, std = bank.latent_stats()
    model.latent_norm.mean.copy_(torch.from_numpy(mean))
    model.latent_norm.std.copy_(torch.from_numpy(std))


def train_recipe(rc: RecipeConfig, progress: Callable[[str], None] = print) -> Path:
    d = setup(rc.device)
    out = Path(rc.out)
    out.mkdir(parents=True, exist_ok=True)
    log = progress if d.main else (lambda *_: None)
    if d.main:
        (out / "recipe.json").write_text(json.dumps(asdict(rc), indent=2, default=str))
    torch.manual_seed(rc.seed)
    if rc.init:
        model, _ = load_checkpoint(rc.init, device=d.device)
        if rc.new_vocoder:
            model.cfg.vocoder = preset_config(rc.preset).vocoder
            model.vocoder = Vocoder(model.cfg).to(d.device)
            log(f"[init] new vocoder ({rc.preset} preset): {sum(p.numel() for p in model.vocoder.parameters())} parameters")
    elif rc.new_vocoder:
        raise ValueError("new_vocoder replaces the vocoder of --init; without --init every part is new")
    else:
        model = MichiModel(preset_config(rc.preset)).to(d.device)
    tokenizer = load_tokenizer(model.cfg.backbone.tokenizer, model.cfg.backbone.vocab_size)

    texts = text_bank(model, rc.text_file) if {"text", "joint", "baseline"} & set(rc.stages) else None
    if "text" in rc.stages:
        run_stage(SequenceStage("text", "text", model, d, rc.sequence, _optim(rc, "text"), text=texts,
                                seed=rc.seed), out / "text", _budget(rc, "text"), d, progress=log)
    # The baseline starts here: after the text stage (or from the initial weights without it).
    text_state = copy.deepcopy(model.state_dict())

    codec_stages = [s for s in ("codec", "vocoder") if s in rc.stages]
    if codec_stages:
        log(f"[{codec_stages[0]}] loading audio from {rc.corpus}")
        bank = AudioBank(rc.corpus, load_segments(rc.corpus))
        log(f"[{codec_stages[0]}] {len(bank.audio)} segments, {bank.seconds / 60:.1f} min of audio")
        for stage in codec_stages:
            run_stage(CodecStage(model, bank, tokenizer, d, rc.codec, _optim(rc, stage), seed=rc.seed, name=stage),
                      out / stage, _budget(rc, stage), d, progress=log)
        del bank

    speech = None
    if {"speak", "joint"} & set(rc.stages):
        latents_dir = out / "latents"
        if d.main and not (latents_dir / "manifest.json").is_file():
            model.eval()
            encode_corpus(model, rc.corpus, latents_dir, progress=log)
        barrier(d)
        speech = SequenceBank(latents_dir, "train", rc.tts_speakers, pad_token=model.backbone.vocab.pad)
        set_latent_stats(model, speech)
        log(f"[latents] {len(speech.utterances)} utterances, {speech.ticks} ticks "
            f"({speech.ticks * 0.08 / 60:.1f} min) for the speak and joint stages")
    for stage, mode in (("speak", "speak"), ("joint", "joint")):
        if stage in rc.stages:
            run_stage(SequenceStage(stage, mode, model, d, rc.sequence, _optim(rc, stage), speech, texts,
                                    seed=rc.seed), out / stage, _budget(rc, stage), d, progress=log)
    info = recipe_info(rc, out)
    if d.main:
        save_checkpoint(model, out / "model", info={**info, "trained": True})
        log(f"model written to {out / 'model'}")

    if "baseline" in rc.stages:
        baseline = MichiModel(model.cfg, load_pretrained=False).to(d.device)
        baseline.load_state_dict(text_state)
        run_stage(SequenceStage("baseline", "text", baseline, d, rc.sequence, _optim(rc, "baseline"),
                                text=texts, seed=rc.seed + 1), out / "baseline", _budget(rc, "baseline"), d,
                  progress=log)
        if d.main:
            save_checkpoint(baseline, out / "baseline" / "model",
                            info={"trained": True, "what": "text-only baseline: the text stage, then "
                                  "the joint stage's budget on pure text", "recipe": info["recipe"]})
    barrier(d)
    return out / "model"


def recipe_info(rc: RecipeConfig, out: Path) -> dict[str, Any]:
    """What the model card needs: settings, steps, wall time and last losses of the model's stages
    (the baseline is its own checkpoint), hardware."""
    stages = {s: stage_info(out / s) for s in rc.stages if s != "baseline" and (out / s).is_dir()}
    on_gpu = torch.cuda.is_available() and (rc.device or "cuda") != "cpu"
    hardware = torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine()
    return {"what": "trained by michi's recipe (michi train recipe)", "recipe": asdict(rc), "stages": stages,
            "hardware": hardware, "training_wall_s": round(sum(s["wall_s"] for s in stages.values()), 1),
            "corpus": str(rc.corpus)}
