"""The recipe end to end through the CLI, resume by rerunning, torchrun, and speaker fine-tuning."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import michi
from michi.cli import main
from michi.generate import tts

TINY_STEPS = ["--steps", "text=4,codec=4,vocoder=2,hearing=2,speak=3,joint=5", "--codec",
              "batch_size=2,ctc_batch_size=2,disc_width=0.0625,adversarial_after=0.5",
              "--hearing", "batch_size=2,max_seconds=3", "--sequence", "batch_size=4,text_batch_size=4,max_text_tokens=48"]


def _recipe(corpus, text_file, out, *extra):
    return main(["--threads", "2", "train", "recipe", "--corpus", str(corpus), "--text", str(text_file),
                 "--out", str(out), "--device", "cpu", *TINY_STEPS, *extra])


@pytest.mark.slow
def test_recipe_end_to_end_and_resume(mini_corpus, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _recipe(mini_corpus, text_file, out) == 0
    model = michi.load(out / "model")
    assert model.trained
    stages = model.info["stages"]
    assert [stages[s]["steps"] for s in ("text", "codec", "vocoder", "speak", "joint")] == [4, 4, 2, 3, 5]
    assert "disc" in stages["codec"]["final_losses"]  # the adversarial half ran
    for stage in ("text", "codec", "vocoder", "speak", "joint", "baseline"):
        assert (out / stage / "losses.png").is_file(), stage
    baseline = michi.load(out / "baseline" / "model")
    assert baseline.trained and json.loads((out / "baseline" / "progress.json").read_text())["step"] == 5
    speech = tts(model, "hi", continue_ticks=2)
    assert speech.audio.shape[0] % model.cfg.frame_samples == 0 and speech.text.startswith("hi")

    states = {p: p.stat().st_mtime_ns for p in out.glob("*/state.pt")}
    capsys.readouterr()
    assert _recipe(mini_corpus, text_file, out) == 0  # the same command again: nothing to redo
    assert capsys.readouterr().out.count("already finished") == 7  # text, codec, vocoder, hearing, speak, joint, baseline
    assert states == {p: p.stat().st_mtime_ns for p in out.glob("*/state.pt")}

    # A new vocoder for a trained model: only the vocoder stage runs; the listen encoder (the latent
    # space the speak head learned) is kept, and the vocoder starts afresh.
    assert _recipe(mini_corpus, text_file, tmp_path / "revoc", "--init", str(out / "model"), "--new-vocoder",
                   "--stages", "vocoder") == 0
    revoc = michi.load(tmp_path / "revoc" / "model")
    assert list(revoc.info["stages"]) == ["vocoder"]
    for part in ("listen", "backbone", "speak_head"):
        for (name, a), b in zip(getattr(model.model, part).state_dict().items(),
                                getattr(revoc.model, part).state_dict().values()):
            assert torch.equal(a, b), (part, name)
    assert not torch.equal(model.model.vocoder.conv_pre.weight, revoc.model.vocoder.conv_pre.weight)
    assert _recipe(mini_corpus, text_file, tmp_path / "bad", "--new-vocoder") == 2  # needs --init


@pytest.mark.slow
def test_torchrun_two_ranks(text_file, tmp_path):
    """Two CPU ranks (gloo): each draws its own batches, DDP averages, rank 0 alone writes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "michi.train", "recipe",
           "--corpus", "unused", "--text", str(text_file), "--out", str(out), "--stages", "text", "--device", "cpu",
           "--steps", "text=4", "--sequence", "text_batch_size=2,max_text_tokens=32"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "text" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4]  # one writer
    assert done.stdout.count("[text] step 4/4") == 1


@pytest.mark.slow
def test_finetune_on_a_real_speaker(tmp_path):
    """A folder of one person's recordings (the asterisk prompts) through the audio pipeline, then a
    few steps on that speaker: the model's speech loss on them falls."""
    sounds = Path("/usr/share/asterisk/sounds/en")
    prompts = sorted(sounds.glob("vm-*.wav"))[:24]
    if len(prompts) < 10:
        pytest.skip("asterisk-core-sounds-en-wav is not installed")
    folder = tmp_path / "speaker"
    folder.mkdir()
    for p in prompts:
        shutil.copy(p, folder / p.name)
    from michi.train.finetune import finetune

    out = finetune(None, folder, tmp_path / "ft", steps=30, device="cpu", speaker="asterisk", workers=1,
                   progress=lambda _: None)
    info = michi.load(out).info
    assert info["trained"] and info["base_model"].endswith("michi-tiny")
    assert info["loss_after"]["flow"] < info["loss_before"]["flow"]
