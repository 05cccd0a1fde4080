"""The hearing stage: batches pack clips with their text, the feature augmentations do what they
say, and a few steps on real (espeak-ng) speech lower the CTC loss of the listen text head."""
import json

import numpy as np
import pytest
import torch

import michi
from michi.audio.augment import SPEEDS, speed
from michi.checkpoint import load_checkpoint
from michi.config import FRAME_SAMPLES, preset
from michi.model.michi import MichiModel
from michi.model.phonemes import ctc_phonemes
from michi.model.tokenizer import load_tokenizer
from michi.train.batches import AudioBank, load_segments
from michi.train.hearing import (
    HearingConfig,
    HearingStage,
    clips_from_bank,
    heldout_sets,
    phone_labels,
    warp_mel,
)
from michi.train.stages import OptimConfig
from michi.transcript import TAIL_TICKS, phone_decoder, with_tail


@pytest.fixture(scope="module")
def setup(mini_corpus):
    torch.manual_seed(0)
    model = MichiModel(preset("tiny-melpca"), load_pretrained=False)
    clips = clips_from_bank(AudioBank(mini_corpus, load_segments(mini_corpus, ("train", "heldout_sentence"))))
    return model, clips, load_tokenizer("bytes", 256)


def test_warp_mel():
    frames = torch.zeros(3, 80)
    frames[:, 20] = 1.0
    assert torch.equal(warp_mel(frames, 1.0), frames)
    up = warp_mel(frames, 1.25)
    assert int(up[0].argmax()) == 25  # bin i reads bin i / 1.25
    rows = warp_mel(torch.stack([frames, frames]), torch.tensor([1.0, 1.25])[:, None, None])
    assert torch.equal(rows[0], frames) and torch.equal(rows[1], up)


def test_phone_labels_follow_speed_and_offset():
    phones = [(0, 0.0), (5, 0.1), (7, 0.3)]
    out = np.full(20, -100)
    phone_labels(phones, offset_s=0.2, ratio=2.0, seconds=0.6, rate_hz=25.0, delay_frames=0, out=out)
    # frames 5..19 (0.2 s to 0.8 s); the clip's times double: phone 5 from 0.4 s, phone 7 from 0.8 s
    assert out[:5].tolist() == [-100] * 5
    assert out[5:10].tolist() == [0] * 5 and out[10:20].tolist() == [5] * 10
    delayed = np.full(20, -100)
    phone_labels(phones, 0.2, 2.0, 0.6, 25.0, 1, delayed)
    assert delayed[10] == 0 and delayed[11] == 5  # a frame later


def test_batch_packs_clips_and_their_text(setup):
    model, clips, tok = setup
    hc = HearingConfig(batch_size=4, max_seconds=6.0)
    stage = HearingStage(model, clips, hc, OptimConfig(), tok)
    audio, ticks, targets, lengths, phones, phone_lengths, labels, teacher, segments = stage.batch()
    assert teacher is None  # no distillation asked for
    assert audio.shape[0] == 4 and audio.shape[1] == int(ticks.max()) * FRAME_SAMPLES
    assert labels.shape == (4, int(ticks.max()) * 2)  # a phoneme label per head frame (2 a tick)
    assert bool((labels[:, :2] >= 0).all())  # every clip of this corpus has word times
    assert int(lengths.sum()) == len(targets)
    assert int(phone_lengths.sum()) == len(phones)
    texts = {c.text for c in clips}
    start = phone_start = 0
    for row, (n, m) in enumerate(zip(lengths.tolist(), phone_lengths.tolist())):
        text = bytes(targets[start:start + n].tolist()).decode()
        start += n
        # whole clips, their texts joined by spaces; the phoneme targets are the same words'
        assert _joined(text, texts), text
        assert phones[phone_start:phone_start + m].tolist() == ctc_phonemes(text)
        phone_start += m
        tail = audio[row, (int(ticks[row]) - TAIL_TICKS) * FRAME_SAMPLES:]
        assert float(tail.abs().max()) == 0.0  # the tail of silence, then padding
        assert float(audio[row, : (int(ticks[row]) - TAIL_TICKS) * FRAME_SAMPLES].abs().max()) > 0


def _joined(text: str, texts: set[str]) -> bool:
    """Whether `text` is some clips' texts joined by single spaces."""
    return any(text == t or (text.startswith(t + " ") and _joined(text[len(t) + 1:], texts)) for t in texts)


def test_augment_features_masks_some_values_only(setup):
    model, clips, tok = setup
    hc = HearingConfig(vtlp=0.0, freq_masks=1, freq_mask_bins=8, time_masks=0)
    stage = HearingStage(model, clips, hc, OptimConfig(), tok)
    features = torch.randn(2, 5, 640)
    out = stage.augment_features(features, np.random.default_rng(0))
    assert out.shape == features.shape
    changed = (out != features).reshape(2, 40, 80)
    for row in range(2):
        bins = changed[row].any(0).nonzero().flatten()
        assert len(bins) <= 8 and bool(changed[row][:, bins].all())  # one band, every frame


def test_a_few_steps_lower_the_ctc_loss(setup):
    model, clips, tok = setup
    hc = HearingConfig(batch_size=4, max_seconds=4.0, vtlp=0.0, freq_masks=0, time_masks=0, eval_every=10)
    hc.channel.speed = hc.channel.noise = hc.channel.reverb = hc.channel.telephone = 0.0
    stage = HearingStage(model, clips, hc, OptimConfig(lr=2e-3, warmup_steps=5), tok,
                         heldout=heldout_sets(clips[:1], clips[1:2]))
    first = [stage.step(i)["loss"] for i in range(3)]
    for i in range(3, 39):
        stage.step(i)
    figures = stage.step(39)
    assert figures["loss"] < 0.5 * np.mean(first)
    assert {"ctc", "phone_ctc", "phone_ce", "phone_accuracy", "heldout_voice_wer", "asterisk_wer",
            "asterisk_telephone_wer", "heldout_voice_per"} <= set(figures)


@pytest.mark.parametrize("front", ["whisper", "mel+whisper"])
def test_whisper_front_features_are_precomputed_and_learned(mini_corpus, front):
    """With `listen.text_front` "whisper" (the real encoder, from its package), alone or after the
    log-mel, the stage computes each clip's features once per channel draw (two here), equal to
    the model's own listen features of that audio; a sped draw keeps its speed; rows are packed
    from them, and a few steps lower the loss."""
    import dataclasses

    torch.manual_seed(0)
    cfg = preset("tiny-melpca")
    cfg.listen = dataclasses.replace(cfg.listen, text_front=front)
    width = cfg.listen_feature_dim
    assert width == {"whisper": 4 * 384, "mel+whisper": 640 + 4 * 384}[front]
    model = MichiModel(cfg, load_pretrained=False)
    clips = clips_from_bank(AudioBank(mini_corpus, load_segments(mini_corpus, ("train",))))[:6]
    hc = HearingConfig(batch_size=3, max_seconds=4.0, eval_every=10, feature_draws=2)
    hc.channel.speed = hc.channel.noise = hc.channel.reverb = hc.channel.telephone = 0.0
    hc.channel.level_db = (0.0, 0.0)  # a clean channel: the features are the clip's own
    stage = HearingStage(model, clips, hc, OptimConfig(lr=2e-3, warmup_steps=5), load_tokenizer("bytes", 256))
    clip = clips[0]
    with torch.no_grad():
        own = model.listen(torch.from_numpy(with_tail(clip.audio))[None]).features[0]
    assert len(clip.draws) == 2 and own.shape == (-(-len(clip.audio) // FRAME_SAMPLES) + TAIL_TICKS, width)
    for draw in clip.draws:
        assert draw.features.shape == own.shape and draw.ratio == 1.0 and draw.text == clip.text
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(draw.features).float(), own, dim=-1)
        assert cos.min() > 0.995, cos.min()  # computed in bf16, kept in fp16
    sped = HearingStage(model, [dataclasses.replace(clip, draws=None)], dataclasses.replace(
        hc, channel=dataclasses.replace(hc.channel, speed=1.0), feature_draws=4), OptimConfig(), load_tokenizer("bytes", 256))
    ticks = {up / down: -(-len(speed(clip.audio, up, down)) // FRAME_SAMPLES) + TAIL_TICKS for up, down in SPEEDS}
    assert all(len(draw.features) == ticks[draw.ratio] for draw in sped.train[0].draws)
    features, ticks = stage.batch()[:2]
    assert features.shape[0] == 3 and features.shape[2] == width and int(ticks.max()) == features.shape[1]
    # After a lead of silence: the features the clip has 2 s into a stream of silence.
    late = HearingStage(model, [dataclasses.replace(clip, draws=None)], dataclasses.replace(hc, feature_leads_s=(2.0,), feature_draws=1),
                        OptimConfig(), load_tokenizer("bytes", 256))
    with torch.no_grad():
        after = model.listen(torch.from_numpy(np.concatenate([np.zeros(2 * 24_000, np.float32), with_tail(clip.audio)]))[None]).features[0, 25:]
    (drawn,) = late.train[0].draws
    assert drawn.features.shape == after.shape
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(drawn.features).float(), after, dim=-1)
    assert cos.min() > 0.995 and (after - own).abs().max() > 0.1, cos.min()  # and they differ from the stream's start
    first = [stage.step(i)["loss"] for i in range(3)]
    for i in range(3, 29):
        stage.step(i)
    assert stage.step(29)["loss"] < 0.7 * np.mean(first)


def test_tuned_whisper_front_trains_over_precomputed_frames(mini_corpus, tmp_path):
    """`listen.whisper_tuned`: the stage precomputes the Whisper frames before the tuned layers
    and runs those layers itself, a draw's features then equal to the model's own after the
    draw's lead; steps train the layers (their learning rate scaled); a checkpoint stores them and
    nothing else of the package's encoder."""
    import dataclasses

    from safetensors import safe_open

    from michi.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = preset("tiny-mel-whisper-tuned")
    assert cfg.listen.whisper_tuned == 2
    model = MichiModel(cfg, load_pretrained=False)
    front = model.listen.text_front
    clips = clips_from_bank(AudioBank(mini_corpus, load_segments(mini_corpus, ("train",))))[:4]
    hc = HearingConfig(batch_size=2, max_seconds=30.0, eval_every=100, feature_leads_s=(2.0,), front_lr_scale=0.5)
    hc.channel.speed = hc.channel.noise = hc.channel.reverb = hc.channel.telephone = 0.0
    hc.channel.level_db = (0.0, 0.0)
    one = HearingStage(model, clips[:1], dataclasses.replace(hc, batch_size=1), OptimConfig(), load_tokenizer("bytes", 256))
    assert front.stop is None
    features, ticks, *_, segments = one.batch()
    (row,) = segments  # the clip's one draw, back to back
    assert [t for t, _, _ in row] == [k * row[0][1] for k in range(len(row))] and {lead for *_, lead in row} == {0}
    assert sum(k for _, k, _ in row) == int(ticks[0])
    with torch.no_grad():
        got = one.tuned_features(features, segments)[0, row[-1][0]:]  # the last: after a draw, its own lead
        pcm = np.concatenate([np.zeros(2 * 24_000, np.float32), with_tail(clips[0].audio)])
        own = model.listen(torch.from_numpy(pcm)[None]).features[0, 25:]
    assert got.shape == own.shape
    cos = torch.nn.functional.cosine_similarity(got, own, dim=-1)
    assert cos.min() > 0.995, cos.min()
    stage = HearingStage(model, clips, hc, OptimConfig(lr=2e-3, warmup_steps=5), load_tokenizer("bytes", 256))
    groups = stage.optimizers["listen_text"].param_groups
    assert groups[-1]["lr_scale"] == 0.5 and groups[-1]["params"] == front.tuned_parameters()
    start = [p.detach().clone() for p in front.tuned_parameters()]
    first = [stage.step(i)["loss"] for i in range(3)]
    for i in range(3, 19):
        stage.step(i)
    assert stage.step(19)["loss"] < 0.8 * np.mean(first)
    assert all(not torch.equal(a, p) for a, p in zip(start, front.tuned_parameters()))
    with safe_open(str(save_checkpoint(model, tmp_path / "m") / "model.safetensors"), "pt") as f:
        stored = {k for k in f.keys() if k.startswith("listen.text_front.")}
    assert stored == {f"listen.text_front.{k}" for k, _ in front.named_parameters()
                      if k.startswith(("encoder.layers.2.", "encoder.layers.3.", "encoder.norm."))}
    reloaded, _ = load_checkpoint(tmp_path / "m")
    assert torch.equal(reloaded.listen.text_front.encoder.layers[3].qkv.weight, front.encoder.layers[3].qkv.weight)


def test_augment_features_masks_both_parts_over_the_same_time(mini_corpus):
    """Log-mel and Whisper frames side by side: a time mask covers the same stretch of both parts
    (8 mel frames, 4 Whisper frames a tick); a band mask, the mel part alone."""
    import dataclasses

    cfg = preset("tiny-melpca")
    cfg.listen = dataclasses.replace(cfg.listen, text_front="mel+whisper")
    clips = clips_from_bank(AudioBank(mini_corpus, load_segments(mini_corpus, ("train",))))[:1]
    stage = HearingStage(MichiModel(cfg, load_pretrained=False), clips, HearingConfig(), OptimConfig(),
                         load_tokenizer("bytes", 256))
    features = torch.randn(4, 10, cfg.listen_feature_dim)
    rng = np.random.default_rng(0)
    for masks in ("time", "band"):
        stage.hc = HearingConfig(vtlp=0.0, time_masks=int(masks == "time"), time_mask_frames=16,
                                 freq_masks=int(masks == "band"))
        changed = stage.augment_features(features, rng) != features
        mel, whisper = changed[..., :640].reshape(4, 80, 80), changed[..., 640:].reshape(4, 40, 384)
        assert bool(changed.any())
        if masks == "time":  # whole frames; a Whisper frame (20 ms) as the mel frame of its second 10 ms
            assert torch.equal(mel.any(-1), mel.all(-1)) and torch.equal(whisper.any(-1), whisper.all(-1))
            assert torch.equal(whisper.all(-1), mel.all(-1)[:, 1::2])
        else:
            assert not bool(whisper.any())


def test_distillation_targets_follow_the_clips_and_are_learned(setup):
    """Whisper tiny.en's encoder (the real one, from its package) gives each clip a frame per head
    frame; a batch places them where the clips went; a few steps raise the head's cosine to them."""
    model, clips, tok = setup
    hc = HearingConfig(batch_size=4, max_seconds=4.0, vtlp=0.0, freq_masks=0, time_masks=0, distill=1.0)
    hc.channel.noise = hc.channel.reverb = hc.channel.telephone = 0.0
    stage = HearingStage(model, clips, hc, OptimConfig(lr=2e-3, warmup_steps=5), tok)
    for clip in clips:
        assert clip.teacher.shape == (-(-len(clip.audio) // (FRAME_SAMPLES // 2)), 384)
    audio, ticks, *_, (teacher, known), _ = stage.batch()
    assert teacher.shape == (4, int(ticks.max()) * 2, 384) and known.shape == teacher.shape[:2]
    for row in range(4):
        speech = (int(ticks[row]) - TAIL_TICKS) * 2
        assert bool(known[row, :speech - 1].all()) and not bool(known[row, speech + 1:].any())
    first = clips[0]  # alone in a row, unsped: its own frames, in order
    placed = stage.teacher_frames([[(first, 1.0, 0)]], (1, len(first.teacher) + 4))
    assert torch.equal(placed[0][0, :len(first.teacher)], torch.from_numpy(first.teacher))
    slow = stage.teacher_frames([[(first, 2.0, 0)]], (1, 2 * len(first.teacher)))[0][0]
    assert torch.equal(slow[0::2][:len(first.teacher)], torch.from_numpy(first.teacher))  # each twice
    cos = [stage.step(i)["distill_cos"] for i in range(25)]
    assert np.mean(cos[-5:]) > np.mean(cos[:3]) + 0.1, cos


def test_recipe_hearing_stage_marks_the_head_trained(mini_corpus, tmp_path):
    from michi.train.cli import main

    out = tmp_path / "run"
    assert main(["recipe", "--preset", "tiny-melpca", "--corpus", str(mini_corpus), "--out", str(out),
                 "--stages", "hearing", "--steps", "hearing=3", "--hearing", "batch_size=2,eval_every=3",
                 "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "hearing" / "losses.jsonl").read_text().splitlines()]
    assert rows and any(key.endswith("_wer") for key in rows[-1])  # the held-out curve
    assert (out / "hearing" / "curve.png").stat().st_size > 0
    _, info = load_checkpoint(out / "model")
    assert info["listen_text_trained"] is True
    heard = michi.load(out / "model")  # with what its phonemes decode by: lexicon, word LM, character LM
    assert heard.lexicon and heard.word_lm and heard.text_lm
    assert phone_decoder(heard).lm is heard.word_lm and heard.word_lm.spell is heard.text_lm


def test_whisper_probe_learns_from_the_encoder_frames(mini_corpus):
    """`python -m michi.eval.whisper_probe` on real (espeak-ng) speech and the real Whisper
    encoder: its CTC loss falls, and it reports greedy WER on the held-out sentences."""
    from michi.eval.whisper_probe import probe

    report = probe(mini_corpus, clips=10, minutes=5, batch_size=8, lr=3e-3, eval_every=20, steps=80)
    curve = report["curve"]
    assert len(curve) >= 3 and curve[-1]["ctc"] < 0.7 * curve[0]["ctc"], curve
    assert set(report["greedy_wer"]) == {"heldout_sentence"} and report["greedy_wer"]["heldout_sentence"] >= 0
    phones = probe(mini_corpus, clips=10, minutes=5, batch_size=8, lr=3e-3, eval_every=20, steps=40, phones=True)
    assert phones["targets"] == "phonemes" and phones["curve"][-1]["ctc"] < phones["curve"][0]["ctc"]
    assert 0 <= phones["greedy_per"]["heldout_sentence"]
    streamed = probe(mini_corpus, clips=10, minutes=5, batch_size=8, lr=3e-3, eval_every=20, steps=40,
                     phones=True, window_s=1.0, hop_s=0.32)
    assert streamed["frames"].startswith("streaming") and streamed["curve"][-1]["ctc"] < streamed["curve"][0]["ctc"]
    causal = probe(mini_corpus, clips=10, minutes=5, batch_size=8, lr=3e-3, eval_every=20, steps=40,
                   phones=True, window_s=1.0, chunk=4)
    assert causal["frames"].startswith("block-causal") and causal["curve"][-1]["ctc"] < causal["curve"][0]["ctc"]


def test_streaming_encoder_frames_see_no_further_than_a_hop(mini_corpus):
    """A streaming front's Whisper frames: one per 20 ms, each unchanged by audio more than a hop
    after it (only its own window is encoded), and, with a window and hop over the whole clip,
    the whole clip's frames."""
    from michi.data.whisper import encoder_frames, load_whisper, streaming_encoder_frames

    whisper = load_whisper(threads=2)
    pcm = clips_from_bank(AudioBank(mini_corpus, load_segments(mini_corpus, ("train",))[:1]))[0].audio
    rate, frames = 24_000, -(-len(pcm) // 480)
    streamed = streaming_encoder_frames(whisper, pcm, rate, window_s=1.0, hop_s=0.32)
    assert streamed.shape[0] == frames and streamed.shape[1] == 384
    cut = 48  # frames: 0.96 s, three hops
    changed = pcm.copy()
    changed[cut * 480:] = np.random.default_rng(0).normal(0, 0.1, len(pcm) - cut * 480)
    after = streaming_encoder_frames(whisper, changed, rate, window_s=1.0, hop_s=0.32)
    np.testing.assert_array_equal(after[:cut], streamed[:cut])  # what came later changed nothing before
    assert np.abs(after[cut:] - streamed[cut:]).max() > 0.1
    whole_s = frames * 0.02
    whole = np.pad(pcm, (0, frames * 480 - len(pcm)))  # whole frames, as the window holds it (a shorter
    # clip's encoder pads its log-mel instead, which moves every frame by some hundredths)
    np.testing.assert_allclose(streaming_encoder_frames(whisper, pcm, rate, window_s=whole_s, hop_s=whole_s),
                               encoder_frames(whisper, whole, rate, frames)[0], atol=1e-4)


def test_recipe_settings_take_lists():
    """`--hearing feature_leads_s=0/5/10,batch_size=12`: a/b/c sets a tuple setting, one value a
    tuple of one; a list for a one-value setting is an error."""
    from michi.train.cli import _pairs, _set

    hc = HearingConfig()
    for key, value in _pairs("feature_leads_s=0/5/10,batch_size=12,vtlp_range=0.9/1.1", float).items():
        _set(hc, key, value)
    assert (hc.feature_leads_s, hc.batch_size, hc.vtlp_range) == ((0.0, 5.0, 10.0), 12, (0.9, 1.1))
    _set(hc, "feature_leads_s", 3.0)
    assert hc.feature_leads_s == (3.0,)
    with pytest.raises(ValueError, match="one value"):
        _set(hc, "batch_size", (1.0, 2.0))
