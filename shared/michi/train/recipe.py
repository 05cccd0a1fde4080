"""The staged recipe, in one run directory:

    text -> codec -> vocoder -> (latents) -> speak -> joint    the model (learned codec)
    text -> basis -> voicing -> durations -> (latents) -> speak -> joint    the model (mel-PCA codec)
    text -------------------------------------------> baseline    same budget as joint, text only

The vocoder stage trains the vocoder alone on the frozen listen encoder's latents (with
`new_vocoder`, a fresh vocoder of the preset's design in place of the init model's).

A model whose codec is "melpca" (the `tiny-melpca` preset) has no codec to train: the `basis`
stage fits its log-mel PCA basis on the training corpus (`basis.py`) and takes the place of the
codec stage, and the `voicing` stage (`voicing.py`) that of the vocoder stage: it trains the voiced
decoder's voicing net (a model with the analytic decoder has nothing to train there); the latent normalisation
is the basis's whitening, not statistics of the shards. A model with a duration predictor
(`durations` in its config) learns it in the `durations` stage (`durations.py`) from the TTS
voices' phoneme timings. For a learned model the `basis` stage is
skipped. `init` with a mel-PCA preset and a learned-codec checkpoint (e.g. the shipped model)
starts from that checkpoint's backbone: every backbone tensor but the latent input projections
(their width is the latent dim) is copied; the heads and the codec are the preset's.

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
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from ..config import TICK_S
from ..config import preset as preset_config
from ..model.lexicon import LEXICON_FILE
from ..model.michi import MichiModel
from ..model.textlm import LM_FILE, CharLM
from ..model.tokenizer import StreamVocab, load_tokenizer
from ..model.vocoder import Vocoder
from ..model.wordlm import WORD_LM_FILE
from .basis import BASIS_FILE, BasisConfig, run_basis_stage
from .basis import INFO_FILE as BASIS_INFO_FILE
from .batches import AudioBank, SequenceBank, TextBank, load_segments, read_audio
from .durations import DurationBank, DurationConfig, DurationStage
from .hearing import (
    HearingConfig,
    HearingStage,
    clips_from_bank,
    clips_from_items,
    hearing_lexicon,
    hearing_lm,
    hearing_word_lm,
    heldout_sets,
    plot_curve,
)
from .loop import LOG_FILE, StageBudget, barrier, run_stage, setup, stage_info
from .stages import CodecConfig, CodecStage, OptimConfig, SequenceConfig, SequenceStage
from .voicing import VoicingConfig, VoicingStage

STAGES = ("text", "basis", "codec", "vocoder", "voicing", "durations", "hearing", "speak", "joint", "baseline")
VOICING_HELDOUT = 20  # held-out voice clips the voicing stage reports on (none trained on)
HEARING_HELDOUT = 40  # clips per held-out set of the hearing stage's curve (none trained on)
CODEC_STAGES = {"learned": ("codec", "vocoder"), "melpca": ("basis", "voicing")}  # what fits each codec


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
        "text": 2000, "codec": 3000, "vocoder": 1000, "voicing": 1500, "durations": 2000, "hearing": 3000,
        "speak": 1000, "joint": 3000})
    minutes: dict[str, float] = field(default_factory=dict)  # optional wall-time cap per stage
    # Every this many minutes of the speak and joint stages, a checkpoint in <run>/snapshots/ (for
    # the learning curve: `python -m michi.eval.curve RUN`); None: none.
    snapshot_minutes: float | None = None
    lr: dict[str, float] = field(default_factory=lambda: {
        "text": 1e-3, "codec": 2e-4, "vocoder": 2e-4, "voicing": 2e-3, "durations": 2e-3, "hearing": 1e-3,
        "speak": 1e-3, "joint": 5e-4})
    codec: CodecConfig = field(default_factory=CodecConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    voicing: VoicingConfig = field(default_factory=VoicingConfig)
    durations: DurationConfig = field(default_factory=DurationConfig)
    hearing: HearingConfig = field(default_factory=HearingConfig)
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


def transplant_backbone(model: MichiModel, source: MichiModel) -> list[str]:
    """Copy `source`'s backbone into `model`'s, but for the latent input projections (their input
    width is the latent dim, and they read another latent space). The backbone shapes must agree.
    Returns the names copied."""
    mine, theirs = asdict(model.cfg.backbone), asdict(source.cfg.backbone)
    for cfg in (mine, theirs):
        cfg.pop("hf_path")
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ValueError(f"--init: its backbone differs from the preset's in {diff}; cannot start from it")
    fresh = ("agent_latent_in.", "user_latent_in.")
    target = model.backbone.state_dict()
    copied = {k: v for k, v in source.backbone.state_dict().items()
              if not k.startswith(fresh) and k in target and v.shape == target[k].shape}
    model.backbone.load_state_dict(copied, strict=False)
    return sorted(copied)


def initial_model(rc: RecipeConfig, device: torch.device, log: Callable[[str], None]) -> MichiModel:
    """The preset's random init, or `rc.init` (see the module doc for a mel-PCA preset)."""
    if not rc.init:
        if rc.new_vocoder:
            raise ValueError("new_vocoder replaces the vocoder of --init; without --init every part is new")
        return MichiModel(preset_config(rc.preset)).to(device)
    target = preset_config(rc.preset)
    init_cfg, _ = read_checkpoint_config(rc.init)
    if target.codec == "melpca" and init_cfg.codec != "melpca":
        if rc.new_vocoder:
            raise ValueError("new_vocoder: a mel-PCA model's vocoder is its analytic decoder, for now")
        source, _ = load_checkpoint(rc.init)
        model = MichiModel(target, load_pretrained=False)
        copied = transplant_backbone(model, source)
        log(f"[init] {rc.preset} from {rc.init}: {len(copied)} backbone tensors copied (all but the "
            f"latent input projections); speak head, listen text head and codec new")
        return model.to(device)
    if init_cfg.listen.whisper_tuned > target.listen.whisper_tuned:
        raise ValueError(f"--init {rc.init}: its Whisper front's last {init_cfg.listen.whisper_tuned} layers are "
                         f"trained (listen.whisper_tuned); the {rc.preset} preset would drop them: use a preset "
                         f"that keeps them (e.g. tiny-mel-whisper-tuned)")
    model, _ = load_checkpoint(rc.init, device=device)
    reshaped = any(getattr(target, k) != getattr(model.cfg, k)
                   for k in ("phone_slots", "phone_frames", "agent_feedback", "decoder", "durations", "voicing",
                            "listen"))
    if target.codec == "melpca" and reshaped:
        # The preset adds (or drops) the phoneme stream or the latent feedback, or has another
        # voicing net or listen text head: new parts start new, dropped ones are left behind, the rest is copied.
        grown = MichiModel(target, load_pretrained=False).to(device)
        mine, theirs = grown.state_dict(), model.state_dict()
        copied = {k: v for k, v in theirs.items() if k in mine and v.shape == mine[k].shape}
        grown.load_state_dict(copied, strict=False)

        def parts(names):  # the backbone's parts by name, the model's others whole
            return ', '.join(sorted({k.split('.')[k.startswith('backbone.')] for k in names})) or 'none'

        log(f"[init] {rc.preset} from {rc.init}: {len(copied)} tensors copied; new: "
            f"{parts(k for k in mine if k not in copied)}; left behind: "
            f"{parts(k for k in theirs if k not in copied)}")
        return grown
    if rc.new_vocoder:
        if model.cfg.codec == "melpca":
            raise ValueError("new_vocoder: a mel-PCA model's vocoder is its analytic decoder, for now")
        model.cfg.vocoder = preset_config(rc.preset).vocoder
        model.vocoder = Vocoder(model.cfg).to(device)
        log(f"[init] new vocoder ({rc.preset} preset): {sum(p.numel() for p in model.vocoder.parameters())} parameters")
    return model


def train_recipe(rc: RecipeConfig, progress: Callable[[str], None] = print) -> Path:
    d = setup(rc.device)
    out = Path(rc.out)
    out.mkdir(parents=True, exist_ok=True)
    log = progress if d.main else (lambda *_: None)
    if d.main:
        (out / "recipe.json").write_text(json.dumps(asdict(rc), indent=2, default=str))
    torch.manual_seed(rc.seed)
    model = initial_model(rc, d.device, log)
    tokenizer = load_tokenizer(model.cfg.backbone.tokenizer, model.cfg.backbone.vocab_size)

    texts = text_bank(model, rc.text_file) if {"text", "joint", "baseline"} & set(rc.stages) else None
    if "text" in rc.stages:
        run_stage(SequenceStage("text", "text", model, d, rc.sequence, _optim(rc, "text"), text=texts,
                                seed=rc.seed), out / "text", _budget(rc, "text"), d, progress=log)
    fits = _codec_fits(rc, model, log)
    _run_basis(rc, model, d, out, log)
    # The baseline starts here: after the text stage (or from the initial weights without it) and
    # the basis, so that a mel-PCA baseline has its codec too.
    text_state = copy.deepcopy(model.state_dict())

    _run_codec_stages(rc, model, d, out, fits, tokenizer, log)
    _run_durations(rc, model, d, out, log)
    _run_hearing(rc, model, d, out, tokenizer, log)
    speech = _speech_bank(rc, model, d, out, log) if {"speak", "joint"} & set(rc.stages) else None
    _run_sequence_stages(rc, model, d, out, speech, texts, log)
    info = recipe_info(rc, out)
    if d.main:
        heard = ((out / "hearing" / LOG_FILE).is_file() or model.cfg.codec == "learned"
                 or bool(rc.init and read_checkpoint_config(rc.init)[1].get("listen_text_trained")))
        save_checkpoint(model, out / "model", info={**info, "trained": True, "listen_text_trained": heard})
        for name in (LM_FILE, LEXICON_FILE, WORD_LM_FILE):  # the LMs and lexicon its listen text head decodes with
            found = next((p for p in (out / "hearing" / name, Path(rc.init or out / "none") / name) if p.is_file()), None)
            if found is not None:
                shutil.copyfile(found, out / "model" / name)
        log(f"model written to {out / 'model'}")

    if "baseline" in rc.stages:
        _run_baseline(rc, model, d, out, text_state, texts, info, log)
    barrier(d)
    return out / "model"


def _codec_fits(rc: RecipeConfig, model: MichiModel, log: Callable[..., None]) -> tuple[str, ...]:
    """The codec stages this model has; logs the requested ones it has not."""
    codec = model.cfg.codec
    fits = tuple(s for s in CODEC_STAGES[codec] if s != "voicing" or model.cfg.decoder == "voiced")
    skipped = [s for s in ("basis", "codec", "vocoder", "voicing") if s in rc.stages and s not in fits]
    if skipped:
        log(f"[{skipped[0]}] skipping {', '.join(skipped)}: not stages of a {codec!r} codec model "
            f"with the {model.cfg.decoder!r} decoder")
    return fits


def _run_basis(rc: RecipeConfig, model: MichiModel, d, out: Path, log: Callable[..., None]) -> None:
    """The mel-PCA basis: fit on rank 0 (or found where an earlier run fit it), loaded by the rest."""
    # A rerun without the basis stage still finds the basis an earlier run fit.
    saved_basis = (out / "basis" / BASIS_FILE).is_file() and not model.basis_fitted
    if model.cfg.codec == "melpca" and ("basis" in rc.stages or saved_basis):
        if d.main:
            run_basis_stage(model, rc.corpus, out / "basis", rc.basis, seed=rc.seed, progress=log)
        barrier(d)
        if not d.main:  # the other ranks load what rank 0 fit
            run_basis_stage(model, rc.corpus, out / "basis", rc.basis, seed=rc.seed, progress=log, main=False)


def _run_codec_stages(rc: RecipeConfig, model: MichiModel, d, out: Path, fits: tuple[str, ...], tokenizer,
                      log: Callable[..., None]) -> None:
    """The codec, vocoder and voicing stages (those requested that this model has) on the corpus audio."""
    codec_stages = [s for s in ("codec", "vocoder", "voicing") if s in rc.stages and s in fits]
    if codec_stages:
        log(f"[{codec_stages[0]}] loading audio from {rc.corpus}")
        bank = AudioBank(rc.corpus, load_segments(rc.corpus))
        log(f"[{codec_stages[0]}] {len(bank.audio)} segments, {bank.seconds / 60:.1f} min of audio")
        for stage in codec_stages:
            if stage == "voicing":
                held = load_segments(rc.corpus, ("heldout_voice",))[:VOICING_HELDOUT]
                heldout = [(a / 32768.0).astype(np.float32) for a in read_audio(rc.corpus, held)] if held else None
                trainer = VoicingStage(model, bank, rc.voicing, _optim(rc, stage), seed=rc.seed, heldout=heldout)
            else:
                trainer = CodecStage(model, bank, tokenizer, d, rc.codec, _optim(rc, stage), seed=rc.seed, name=stage)
            run_stage(trainer, out / stage, _budget(rc, stage), d, progress=log)
        del bank


def _run_durations(rc: RecipeConfig, model: MichiModel, d, out: Path, log: Callable[..., None]) -> None:
    """The duration predictor's stage, on the TTS voices' phoneme timings."""
    if "durations" in rc.stages:
        if model.durations is None:
            log("[durations] skipping: this model has no duration predictor (config durations: false)")
        else:
            train = DurationBank(rc.corpus, "train", rc.tts_speakers)
            heldout = DurationBank(rc.corpus, "heldout_sentence", rc.tts_speakers)
            log(f"[durations] {len(train.items)} clips with phoneme timings, {len(heldout.items)} held out")
            run_stage(DurationStage(model, train, heldout, rc.durations, _optim(rc, "durations"), seed=rc.seed),
                      out / "durations", _budget(rc, "durations"), d, progress=log)


def _run_hearing(rc: RecipeConfig, model: MichiModel, d, out: Path, tokenizer, log: Callable[..., None]) -> None:
    """The listen text head's stage: the corpus's training voices and the Asterisk "train" prompts;
    its curve (held-out WER against minutes) in `<run>/hearing/curve.png`."""
    if "hearing" not in rc.stages:
        return
    from ..eval.speech import asterisk_split

    # The training split only: the held-out voice's clips read the held-out sentences, so the
    # training voices' clips of those sentences would make its curve a test of seen texts.
    train = clips_from_bank(AudioBank(rc.corpus, load_segments(rc.corpus, ("train",))))
    held_voice = load_segments(rc.corpus, ("heldout_voice",))[:HEARING_HELDOUT]
    voice = clips_from_bank(AudioBank(rc.corpus, held_voice)) if held_voice else []
    held_sentences = load_segments(rc.corpus, ("heldout_sentence",))
    held_sentences = held_sentences[::max(1, len(held_sentences) // HEARING_HELDOUT)][:HEARING_HELDOUT]
    sentences = clips_from_bank(AudioBank(rc.corpus, held_sentences)) if held_sentences else []
    try:
        asterisk, held = clips_from_items(asterisk_split("train")), clips_from_items(asterisk_split("heldout"), HEARING_HELDOUT)
    except FileNotFoundError as e:
        log(f"[hearing] no Asterisk prompts ({e}): the corpus alone")
        asterisk, held = [], []
    log(f"[hearing] {len(train)} corpus clips, {len(asterisk)} Asterisk train prompts; held out: "
        f"{len(voice)} voice clips, {len(held)} Asterisk prompts, {len(sentences)} sentences of training voices")
    stage = HearingStage(model, train, rc.hearing, _optim(rc, "hearing"), tokenizer, asterisk=asterisk,
                         heldout=heldout_sets(voice, held, sentences), seed=rc.seed)
    run_stage(stage, out / "hearing", _budget(rc, "hearing"), d, progress=log)
    if d.main:
        log(f"[hearing] curve: {plot_curve(out / 'hearing' / LOG_FILE, out / 'hearing' / 'curve.png')}")
        if not (out / "hearing" / LM_FILE).is_file():
            lm = hearing_lm([c.text for c in asterisk])
            log(f"[hearing] character LM ({len(lm.counts)} n-grams): {lm.save(out / 'hearing' / LM_FILE)}")
        missing = [f for f in (LEXICON_FILE, WORD_LM_FILE) if not (out / "hearing" / f).is_file()]
        if model.listen_text.phone_out is not None and missing:  # what its phonemes decode with
            lm = CharLM.load(out / "hearing" / LM_FILE)
            if LEXICON_FILE in missing:
                lexicon = hearing_lexicon(lm, log=log)
                log(f"[hearing] lexicon ({len(lexicon)} words): {lexicon.save(out / 'hearing' / LEXICON_FILE)}")
            if WORD_LM_FILE in missing:
                word_lm = hearing_word_lm([c.text for c in asterisk], lm)
                log(f"[hearing] word LM ({len(word_lm.trigrams)} trigrams): {word_lm.save(out / 'hearing' / WORD_LM_FILE)}")


def _speech_bank(rc: RecipeConfig, model: MichiModel, d, out: Path, log: Callable[..., None]) -> SequenceBank:
    """The corpus encoded into `<run>/latents/` (once) and the latent normalisation set."""
    latents_dir = out / "latents"
    if not model.basis_fitted:
        raise ValueError("the speak and joint stages need the model's mel-PCA basis: run the basis "
                         "stage first (--stages basis,...) or --init a model that has one")
    if d.main and not (latents_dir / "manifest.json").is_file():
        model.eval()
        encode_corpus(model, rc.corpus, latents_dir, progress=log)
    barrier(d)
    speech = SequenceBank(latents_dir, "train", rc.tts_speakers, pad_token=model.backbone.vocab.pad)
    if model.cfg.codec == "melpca":  # the basis's whitening (set with the basis), not shard statistics
        log("[latents] latent normalisation: the mel-PCA basis's whitening (mean 0, its std)")
    else:
        set_latent_stats(model, speech)
    log(f"[latents] {len(speech.utterances)} utterances, {speech.ticks} ticks "
        f"({speech.ticks * TICK_S / 60:.1f} min) for the speak and joint stages")
    return speech


def _run_sequence_stages(rc: RecipeConfig, model: MichiModel, d, out: Path, speech, texts,
                         log: Callable[..., None]) -> None:
    """The speak and joint stages, with wall-clock snapshots when asked for."""
    for stage, mode in (("speak", "speak"), ("joint", "joint")):
        if stage in rc.stages:
            budget = _budget(rc, stage)
            if rc.snapshot_minutes and d.main:
                budget.snapshot_minutes = rc.snapshot_minutes
                budget.snapshot = lambda minutes, step, stage=stage: _snapshot(model, out, stage, minutes, step,
                                                                               recipe_info(rc, out))
            run_stage(SequenceStage(stage, mode, model, d, rc.sequence, _optim(rc, stage), speech, texts,
                                    seed=rc.seed), out / stage, budget, d, progress=log)


def _run_baseline(rc: RecipeConfig, model: MichiModel, d, out: Path, text_state: dict, texts, info: dict,
                  log: Callable[..., None]) -> None:
    """The text-only baseline: from `text_state`, the joint stage's budget on pure text."""
    baseline = MichiModel(model.cfg, load_pretrained=False).to(d.device)
    baseline.load_state_dict(text_state)
    run_stage(SequenceStage("baseline", "text", baseline, d, rc.sequence, _optim(rc, "baseline"),
                            text=texts, seed=rc.seed + 1), out / "baseline", _budget(rc, "baseline"), d,
              progress=log)
    if d.main:
        save_checkpoint(baseline, out / "baseline" / "model",
                        info={"trained": True, "what": "text-only baseline: the text stage, then "
                              "the joint stage's budget on pure text", "recipe": info["recipe"]})


def _snapshot(model: MichiModel, out: Path, stage: str, minutes: float, step: int, info: dict) -> None:
    """A checkpoint of the model as it is now, named by the stage's wall minutes."""
    was_training = model.training
    save_checkpoint(model.eval(), out / "snapshots" / f"{stage}-{minutes:05.1f}min",
                    info={**info, "trained": True, "snapshot": {"stage": stage, "minutes": round(minutes, 2),
                                                                "step": step}})
    model.train(was_training)


def recipe_info(rc: RecipeConfig, out: Path) -> dict[str, Any]:
    """What the model card needs: settings, steps, wall time and last losses of the model's stages
    (the baseline is its own checkpoint), hardware."""
    stages = {s: stage_info(out / s) for s in rc.stages if s != "baseline" and (out / s).is_dir()}
    if (out / "basis" / BASIS_INFO_FILE).is_file() and "basis" in stages:
        stages["basis"]["fit"] = json.loads((out / "basis" / BASIS_INFO_FILE).read_text())
    on_gpu = torch.cuda.is_available() and (rc.device or "cuda") != "cpu"
    hardware = torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine()
    return {"what": "trained by michi's recipe (michi train recipe)", "recipe": asdict(rc), "stages": stages,
            "hardware": hardware, "training_wall_s": round(sum(s["wall_s"] for s in stages.values()), 1),
            "corpus": str(rc.corpus)}
