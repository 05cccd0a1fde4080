"""The recipe for a mel-PCA model: the `basis` stage fits the codec on the corpus, then latents and
the speak stage run as for a learned codec; `--init` from a learned-codec model keeps its backbone."""
import json

import torch

import michi
from michi.checkpoint import save_checkpoint
from michi.cli import main
from michi.config import preset
from michi.model.melpca import MelPCABasis
from michi.model.michi import MichiModel
from michi.model.tokenizer import StreamVocab
from michi.train.basis import BASIS_FILE, INFO_FILE, BasisConfig, pick_segments, run_basis_stage
from michi.train.batches import SequenceBank, load_segments
from michi.train.loop import Dist, StageBudget, run_stage
from michi.train.recipe import encode_corpus
from michi.train.stages import OptimConfig, SequenceConfig, SequenceStage

CPU = Dist()
LEARNED = michi.DEFAULT_MODEL.parent / "michi-tiny-learned"  # the learned-codec model
SMALL = SequenceConfig(batch_size=4, max_ticks=32, text_batch_size=4, max_text_tokens=48, flow_repeats=2)


def test_pick_segments_spreads_over_voices_deterministically(mini_corpus):
    segments = load_segments(mini_corpus)
    picked = pick_segments(segments, 8.0, seed=0)
    assert picked == pick_segments(list(reversed(segments)), 8.0, seed=0)
    speakers = [s["speaker"] for s in picked]
    assert set(speakers) == {"en-us", "en+f3"} and abs(speakers.count("en-us") - speakers.count("en+f3")) <= 1
    assert sum(s["duration_s"] for s in picked[:-1]) < 8.0 <= sum(s["duration_s"] for s in picked)
    assert all(s["split"] == "train" for s in picked)


def test_basis_stage_then_a_speak_step(mini_corpus, tmp_path):
    torch.manual_seed(0)
    model = MichiModel(preset("tiny-melpca"))
    assert not model.basis_fitted
    basis = run_basis_stage(model, mini_corpus, tmp_path / "basis", BasisConfig(max_minutes=0.25),
                            progress=lambda _: None)
    assert basis.variance_kept > 0.9, basis.variance_kept
    assert model.basis_fitted and torch.equal(model.listen.components, basis.components)
    assert torch.equal(model.latent_norm.std, basis.std.clamp(min=1e-8))
    info = json.loads((tmp_path / "basis" / INFO_FILE).read_text())
    assert set(info["seconds_per_voice"]) == {"en-us", "en+f3"} and info["audio_s"] <= 15.0
    # Rerun: the saved basis is loaded, not fit again.
    again = MichiModel(preset("tiny-melpca"))
    run_basis_stage(again, mini_corpus, tmp_path / "basis", progress=lambda _: None)
    assert torch.equal(again.vocoder.components, basis.components)
    assert torch.equal(MelPCABasis.load(tmp_path / "basis" / BASIS_FILE).mean, basis.mean)

    model.eval()
    encode_corpus(model, mini_corpus, tmp_path / "latents", progress=lambda _: None)
    speech = SequenceBank(tmp_path / "latents", pad_token=StreamVocab(256).pad)
    assert speech.utterances[0].latents.shape[1] == 64
    run_stage(SequenceStage("speak", "speak", model, CPU, SMALL, OptimConfig(lr=1e-3, warmup_steps=1), speech),
              tmp_path / "speak", StageBudget(steps=1, log_every=1), CPU, progress=lambda _: None)
    row = json.loads((tmp_path / "speak" / "losses.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and torch.isfinite(torch.tensor(row["flow"]))
    assert torch.equal(model.listen.components, basis.components)  # the basis is frozen


def test_recipe_cli_on_tiny_melpca_from_the_learned_model_backbone(mini_corpus, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--threads", "2", "train", "recipe", "--preset", "tiny-melpca", "--corpus", str(mini_corpus),
            "--text", str(text_file), "--out", str(out), "--device", "cpu", "--init", str(LEARNED),
            "--stages", "basis,codec,voicing,speak,joint", "--steps", "voicing=2,speak=2,joint=2",
            "--basis", "max_minutes=0.25", "--voicing", "batch_size=2,ticks=4",
            "--sequence", "batch_size=2,max_ticks=32,text_batch_size=2,max_text_tokens=32,flow_repeats=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "skipping codec: not stages of a 'melpca' codec model" in printed and "[basis] K = 64" in printed
    assert "backbone tensors copied" in printed
    model = michi.load(out / "model")
    assert model.trained and model.basis_fitted and model.cfg.codec == "melpca"
    assert list(model.info["stages"]) == ["basis", "voicing", "speak", "joint"]
    assert model.cfg.decoder == "voiced" and (out / "voicing" / "losses.jsonl").is_file()
    assert model.info["stages"]["basis"]["fit"]["variance_kept"] > 0.9
    saved = MelPCABasis.load(out / "basis" / BASIS_FILE)
    assert torch.equal(model.model.listen.components, saved.components)
    shipped = michi.load(LEARNED)
    assert shipped.cfg.codec == "learned"
    for name in ("lm.model.layers.0.self_attn.q_proj.weight", "lm.model.embed_tokens.weight"):
        # the joint stage moved the backbone a little from the learned-codec one it started from
        a, b = model.model.backbone.state_dict()[name], shipped.model.backbone.state_dict()[name]
        assert _rel(a, b) < 0.05, name
    assert model.model.backbone.agent_latent_in is None  # the preset feeds back no agent latent
    assert model.model.backbone.user_latent_in.weight.shape == (256, 64)
    speech = model.session(seed=0)
    speech.force_agent_text("hi")
    assert speech.step().agent_audio.shape == (1920,)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _phoneless_melpca(corpus, tmp_path):
    """A tiny-melpca checkpoint without the phoneme stream, its basis fit on `corpus`."""
    cfg = preset("tiny-melpca")
    cfg.phone_frames, cfg.agent_feedback, cfg.durations = False, True, False
    torch.manual_seed(0)
    model = MichiModel(cfg)
    run_basis_stage(model, corpus, tmp_path / "basis", BasisConfig(max_minutes=0.25), progress=lambda _: None)
    assert model.basis_fitted
    return save_checkpoint(model.eval(), tmp_path / "phoneless", info={"trained": False, "what": "test init"},
                           dtype=torch.float16)


def test_recipe_adds_the_phoneme_stream_snapshots_and_the_curve(mini_corpus, text_file, tmp_path, capsys):
    """--init from a mel-PCA model without phonemes that feeds its latent back (like the first
    candidate): the preset's phoneme parts start new, the latent feedback is left behind, the rest
    is copied; --snapshot-minutes writes checkpoints the learning curve
    evaluates with the real Whisper judge."""
    from michi.eval import curve

    candidate = _phoneless_melpca(mini_corpus, tmp_path)
    out = tmp_path / "run"
    args = ["--threads", "2", "train", "recipe", "--preset", "tiny-melpca", "--corpus", str(mini_corpus),
            "--text", str(text_file), "--out", str(out), "--device", "cpu", "--init", str(candidate),
            "--stages", "joint", "--steps", "joint=100000", "--minutes", "joint=0.15", "--lr", "joint=1e-6",
            "--snapshot-minutes", "0.001",
            "--sequence", "batch_size=2,max_ticks=32,text_batch_size=2,max_text_tokens=32,flow_repeats=1"]
    # A snapshot's directory is named by its minutes to 0.1 min (a later one of the same name replaces
    # it): a 0.15 min joint stage leaves at least two, one from the first tenth and the final one. The
    # small learning rate keeps the copied weights near where they started, however many steps fit.
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "new: durations, next_phone_embed, phone_embed, phone_head; left behind: agent_latent_in" in printed, printed
    old, new = michi.load(candidate).model, michi.load(out / "model").model
    assert not old.cfg.phone_width and new.cfg.phone_frames and new.cfg.phone_width == 8
    assert old.backbone.agent_latent_in is not None and new.backbone.agent_latent_in is None
    assert torch.equal(new.listen.components, old.listen.components)  # the basis came along
    assert 0 < _rel(new.backbone.lm.model.embed_tokens.weight, old.backbone.lm.model.embed_tokens.weight.float()) < 0.05
    snaps = curve.snapshots(out)
    assert [s[0] for s in snaps] == ["joint"] * len(snaps) and len(snaps) >= 2  # during, and at the end
    assert curve.cumulative(snaps, 36.0)[0] == 36.0 + snaps[0][1]
    assert curve.main([str(out), "--corpus", str(mini_corpus), "--limit", "1"]) == 0
    points = json.loads((out / "curve.json").read_text())["points"]
    assert len(points) == len(snaps) and all(p["wer"] >= 0 for p in points)
    assert (out / "curve.png").stat().st_size > 1000
