"""Each stage learns, and a resumed stage ends exactly where an uninterrupted one does."""
import json

import pytest
import torch

from michi.config import tiny
from michi.model.michi import MichiModel
from michi.model.tokenizer import ByteTokenizer, StreamVocab
from michi.train.batches import AudioBank, SequenceBank, TextBank, load_segments
from michi.train.loop import Dist, StageBudget, run_stage
from michi.train.recipe import encode_corpus, set_latent_stats
from michi.train.stages import CodecConfig, CodecStage, OptimConfig, SequenceConfig, SequenceStage

CPU = Dist()
SMALL = SequenceConfig(batch_size=4, max_ticks=32, text_batch_size=4, max_text_tokens=48, flow_repeats=2)


def _text_bank(passages):
    v = StreamVocab(256)
    return TextBank(passages, ByteTokenizer(), v.bos, v.eos)


def _model(seed=0):
    torch.manual_seed(seed)
    return MichiModel(tiny())


def _losses(run_dir, key):
    rows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def test_text_stage_learns(tmp_path):
    model = _model()
    stage = SequenceStage("text", "text", model, CPU, SMALL, OptimConfig(lr=3e-3, warmup_steps=5),
                          text=_text_bank(["the cat sat on the mat. " * 8]))
    run_stage(stage, tmp_path, StageBudget(steps=60, log_every=10), CPU, progress=lambda _: None)
    lm = _losses(tmp_path, "lm")
    assert lm[-1] < 0.5 * lm[0], lm  # a repeated sentence is easy to learn
    assert (tmp_path / "losses.png").is_file()


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    text = _text_bank(["a few words to learn, again and again. " * 4])
    oc = OptimConfig(lr=1e-3, warmup_steps=2)
    budget = StageBudget(steps=6, log_every=1, save_every=3)

    whole = _model()
    run_stage(SequenceStage("text", "text", whole, CPU, SMALL, oc, text=text), tmp_path / "whole", budget, CPU,
              progress=lambda _: None)

    first = _model()
    stage = SequenceStage("text", "text", first, CPU, SMALL, oc, text=text)
    step = stage.step
    stage.step = lambda i: step(i) if i < 4 else (_ for _ in ()).throw(Interrupt())  # dies at step 5
    with pytest.raises(Interrupt):
        run_stage(stage, tmp_path / "split", budget, CPU, progress=lambda _: None)
    torch.manual_seed(123)  # a new process: other global RNG state, restored from the checkpoint
    resumed = _model(seed=99)  # and other initial weights, replaced by the checkpoint's
    run_stage(SequenceStage("text", "text", resumed, CPU, SMALL, oc, text=text), tmp_path / "split", budget,
              CPU, progress=lambda _: None)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_codec_then_speak_stages_learn(tmp_path, mini_corpus):
    model = _model()
    cc = CodecConfig(batch_size=4, crop_ticks=4, ctc_batch_size=2, adversarial_after=0.8, disc_width=0.0625)
    bank = AudioBank(mini_corpus, load_segments(mini_corpus))
    tok = ByteTokenizer()
    run_stage(CodecStage(model, bank, tok, CPU, cc, OptimConfig(lr=2e-3, warmup_steps=5)),
              tmp_path / "codec", StageBudget(steps=24, log_every=4), CPU, progress=lambda _: None)
    mel = _losses(tmp_path / "codec", "mel")
    assert mel[-1] < mel[0], mel
    assert _losses(tmp_path / "codec", "disc")  # the discriminators joined after the warm-up

    # The vocoder stage refines the vocoder alone: the encoder, and so its latents, do not move.
    listen = {k: v.clone() for k, v in model.listen.state_dict().items()}
    vocoder = {k: v.clone() for k, v in model.vocoder.state_dict().items()}
    run_stage(CodecStage(model, bank, tok, CPU, cc, OptimConfig(lr=2e-3, warmup_steps=2), name="vocoder"),
              tmp_path / "vocoder", StageBudget(steps=8, log_every=4), CPU, progress=lambda _: None)
    assert all(torch.equal(listen[k], v) for k, v in model.listen.state_dict().items())
    assert not all(torch.equal(vocoder[k], v) for k, v in model.vocoder.state_dict().items())
    assert not _losses(tmp_path / "vocoder", "ctc") and _losses(tmp_path / "vocoder", "mel")

    model.eval()
    encode_corpus(model, mini_corpus, tmp_path / "latents", progress=lambda _: None)
    speech = SequenceBank(tmp_path / "latents", pad_token=StreamVocab(256).pad)
    assert len(speech.utterances) == 10  # the heldout_sentence ones are kept apart
    set_latent_stats(model, speech)
    run_stage(SequenceStage("speak", "speak", model, CPU, SMALL, OptimConfig(lr=2e-3, warmup_steps=5), speech),
              tmp_path / "speak", StageBudget(steps=40, log_every=8), CPU, progress=lambda _: None)
    flow = _losses(tmp_path / "speak", "flow")
    assert flow[-1] < flow[0], flow
    # The speak stage trains the head on the frozen backbone: the transformer is untouched.
    fresh = _model()
    assert torch.equal(fresh.backbone.lm.model.layers[0].mlp.up_proj.weight,
                       model.backbone.lm.model.layers[0].mlp.up_proj.weight)
