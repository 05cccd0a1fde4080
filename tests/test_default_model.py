"""The shipped default model: trained by this project's recipe, used unless told otherwise. It is a
tiny-melpca model with the phoneme frame stream (a fixed log-mel PCA latent and a voiced decoder);
the learned-codec model it replaced ships beside it as michi-tiny-learned."""
import json

import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open

import michi
from michi.checkpoint import INT8_SCALE, read_checkpoint_config
from michi.cli import main
from michi.config import preset

LEARNED = michi.DEFAULT_MODEL.parent / "michi-tiny-learned"
HEARD_WER = 0.45  # these 8 prompts: 29 % (the card: 53 % on 40 held-out prompts)


def test_default_model_is_a_trained_melpca_model_with_phonemes():
    m = michi.load()
    # tiny-melpca whose listen text head also reads the Whisper front, its last two layers tuned
    # with the head (the hearing stage's run 10)
    assert m.trained and m.cfg.preset == "tiny-mel-whisper-tuned" and not m.warnings
    assert m.cfg.listen.text_front == "mel+whisper" and m.model.listen_text.front2 is not None
    assert m.cfg.listen.whisper_tuned == 2
    assert m.cfg.codec == "melpca" and m.cfg.phone_frames and m.cfg.latent_dim == 64
    assert m.cfg.voicing == preset("tiny-melpca").voicing and m.cfg.voicing.f0_bins  # the preset's voicing net
    assert m.basis_fitted
    _, info = read_checkpoint_config(michi.DEFAULT_MODEL)
    assert info["what"].startswith("trained by michi's recipe")
    assert info["recipe"]["preset"] == "tiny-melpca" and "joint" in info["recipe"]["stages"]
    # The basis is orthonormal: stored exactly, not rounded to fp16.
    comps = m.model.basis.components
    np.testing.assert_allclose((comps @ comps.T).numpy(), np.eye(64), atol=1e-4)


def test_default_model_hears_held_out_prompts_and_not_silence():
    """The shipped listen text head (the hearing stage) decodes with its character LM: human
    prompts it never trained on (held out by prompt text) come back as their words, and silence as
    nothing, so a silent user (TTS) feeds the backbone no text."""
    from michi.eval.listen import stream
    from michi.eval.speech import asterisk_split
    from michi.eval.wer import summary

    m = michi.load()
    assert m.hears_text and m.model.listen_text.enabled and m.text_lm is not None
    assert stream(m, "head", np.zeros(48_000, np.float32))["text"] == ""
    session = m.session(seed=0)
    session.push_audio(np.zeros(24_000, np.float32))
    assert all(session.step().user_tokens == [] for _ in range(14))
    items = asterisk_split("heldout", 8)
    rows = [{"ref": it.text, "hyp": stream(m, "head", it.audio())["text"]} for it in items]
    assert summary(rows)["wer"] <= HEARD_WER, rows


def test_an_untrained_listen_text_head_feeds_no_user_text():
    """A checkpoint whose head no training reached (`listen_text_trained: false`) emits nothing,
    so the backbone is not steered by random tokens; the learned-codec model trained its head
    with its codec, and hears."""
    m = michi.load()
    muted = michi.Michi(m.model, {**m.info, "listen_text_trained": False})
    assert not muted.hears_text and not muted.model.listen_text.enabled
    session = muted.session(seed=0)
    session.push_audio(np.random.default_rng(0).normal(0, 0.1, 24_000).astype(np.float32))
    assert all(session.step().user_tokens == [] for _ in range(14))
    assert michi.load(LEARNED).hears_text


def test_default_weights_are_fp16_with_an_fp32_basis_and_an_int8_text_head():
    """fp16, but the basis and latent statistics in fp32, and the listen text head's matrices and
    the tuned Whisper layers' in int8 with fp32 scales (the package's layers not stored at all)."""
    model = michi.load().model
    exact = model.full_precision_keys()
    with safe_open(str(michi.DEFAULT_MODEL / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    basis = {k for k in dtypes if k.startswith(("listen.", "vocoder."))}
    assert {"listen.components", "vocoder.components", "listen.mean", "vocoder.mean"} <= basis
    int8 = {k for k in dtypes if dtypes[k] == "I8"}
    assert int8 and all(dtypes[k + INT8_SCALE] == "F32" for k in int8)
    assert {k.split(".")[0] for k in int8} == {"listen_text", "listen"}
    assert {k for k in int8 if k.startswith("listen.")} == {
        f"listen.text_front.encoder.layers.{i}.{m}.weight" for i in (2, 3) for m in ("qkv", "proj", "up", "down")}
    assert not any(k.startswith(model.packaged_keys()) for k in dtypes)
    scales = {k + INT8_SCALE for k in int8}
    assert all(dtypes[k] == "F32" for k in dtypes if k.startswith(exact) and k not in int8)
    assert all(dtypes[k] == "F16" for k in dtypes if not k.startswith(exact) and k not in int8 | scales)
    assert sum(dtypes[k] == "F16" for k in dtypes) > 50
    assert all(p.dtype == torch.float32 for p in model.parameters())  # loaded back as fp32


def test_model_card_names_the_shipped_weights():
    card = (michi.DEFAULT_MODEL / "MODEL_CARD.md").read_text()
    sha = json.loads((michi.DEFAULT_MODEL / "config.json").read_text())["weights"]["sha256"]
    assert sha[:16] in card  # the card describes these weights, not an older file
    assert "tiny-melpca" in card


def test_the_learned_codec_model_ships_beside_it():
    cfg, info = read_checkpoint_config(LEARNED)
    assert cfg.codec == "learned" and cfg.preset == "tiny" and info["trained"]
    assert list(info["stages"]) == ["text", "codec", "vocoder", "speak", "joint"]
    assert cfg.vocoder == michi.config.tiny().vocoder  # the iSTFT head, trained on the shipped encoder
    card = (LEARNED / "MODEL_CARD.md").read_text()
    assert info["sha256"][:16] in card and "No longer the default" in card


def test_cli_uses_the_default_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "michi-tiny" in out and "michi-tiny-learned" not in out and "UNTRAINED" not in out


def test_synth_speaks_a_forced_text_with_the_default_model(tmp_path, capsys):
    out = tmp_path / "hello.wav"
    assert main(["--threads", "2", "synth", "Hello there.", "--out", str(out), "--continue-ticks", "4"]) == 0
    printed = capsys.readouterr()
    assert "agent text: 'Hello there." in printed.out and "UNTRAINED" not in printed.err
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 24_000 and len(audio) % 1920 == 0 and len(audio) >= 1920 * 10
    rms = float(np.sqrt(np.mean(np.square(audio))))
    assert np.isfinite(audio).all() and 1e-3 < rms < 1.0
