"""`michi eval listen` and the transcript sources (`michi.transcript`): the split of the Asterisk
prompts, the lag arithmetic, the learned head streaming as it decodes offline, Whisper streaming's
stable prefix, and the report on the random `tiny` preset (structure and finite figures; the
trained default model's figures are in its card)."""
import json

import numpy as np
import pytest
import torch

import michi
from michi.eval import speech
from michi.eval.listen import eval_listen, lags, listen_sets, stream, word_arrivals
from michi.eval.wer import normalize_text, word_errors
from michi.transcript import WhisperTranscriber, with_tail

pytestmark = pytest.mark.skipif(not speech.ASTERISK_TRANSCRIPTS.is_file(),
                                reason="needs Debian asterisk-core-sounds-en(-wav)")


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    return michi.load("tiny", seed=0)


@pytest.fixture(scope="module")
def judge():
    return speech.WhisperJudge(threads=2)


def test_asterisk_split_is_by_prompt_text():
    train, held = speech.asterisk_split("train"), speech.asterisk_split("heldout")
    assert len(train) + len(held) == len(speech.asterisk_prompts())
    assert 0.25 < len(held) / (len(train) + len(held)) < 0.42  # about a third
    assert not {normalize_text(it.text) for it in train} & {normalize_text(it.text) for it in held}
    assert [it.id for it in speech.asterisk_split("heldout", 5)] == [it.id for it in speech.asterisk_split("heldout", 5)]
    with pytest.raises(ValueError, match="part"):
        speech.asterisk_split("test")


def test_word_arrivals_and_lags():
    pieces = [("hel", 0.16), ("lo wo", 0.32), ("rld", 0.48), (" again", 0.8)]
    arrivals = word_arrivals(pieces)
    assert arrivals == [("hello", 0.32), ("world", 0.48), ("again", 0.8)]
    reference = [("Hello,", 0.3), ("big", 0.35), ("world!", 0.4), ("again", 0.7)]
    assert lags(reference, arrivals) == pytest.approx([0.02, 0.08, 0.1])


def test_head_streams_as_it_decodes_offline(tiny):
    """Tick by tick through the encoder and the head's greedy CTC: the same text as collapsing the
    arg-max of the whole utterance's logits (silent ticks, here the tail, muted in both)."""
    from michi.transcript import mute, silent_ticks

    pcm = speech.asterisk_split("heldout", 1)[0].audio()
    m = tiny.model
    frame = tiny.cfg.frame_samples
    padded = np.pad(pcm, (0, -len(pcm) % frame + 3 * frame))
    with torch.inference_mode():
        logits = m.listen_text(m.listen(torch.from_numpy(padded)[None]).features)
    logits = mute(logits[0].float().log_softmax(-1), silent_ticks(padded))
    ids, prev = [], m.listen_text.blank
    for t in logits.argmax(-1).flatten().tolist():
        if t != m.listen_text.blank and t != prev:
            ids.append(t)
        prev = t
    heard = stream(tiny, "head", pcm)
    assert heard["text"] == tiny.tokenizer.decode(ids).strip()
    assert heard["audio_s"] == pytest.approx(len(padded) / 24_000) and heard["compute_s"] > 0


def test_head_phonemes_stream_as_they_decode_offline(tiny):
    """With a lexicon and LM beside the model, "head" reads the head's phoneme slots into words:
    tick by tick, the same words as the decoder over the whole utterance's slots at once."""
    from michi.eval.decoder_sweep import head_log_probs
    from michi.model.lexicon import Lexicon, PhoneBeamDecoder
    from michi.model.textlm import CharLM

    item = speech.asterisk_split("heldout", 1)[0]
    lm = CharLM.train([it.text for it in speech.asterisk_split("train")])
    tiny.text_lm, tiny.lexicon = lm, Lexicon.build(lm.words, {"beam": 8, "prune": -6.0})
    try:
        head = tiny.model.listen_text
        offline = PhoneBeamDecoder(lm, tiny.lexicon, head.phone_blank, **tiny.lexicon.decoder)
        log_probs = head_log_probs(tiny, item.audio(), phones=True)
        expected = (offline.step(log_probs.flatten(0, 1)) + offline.finish()).strip()
        heard = stream(tiny, "head", item.audio())
        assert expected and heard["text"] == expected  # (a random head's phonemes still make words)
        assert all(w in lm.words for w in heard["text"].split())  # words of the lexicon only
    finally:
        tiny.text_lm = tiny.lexicon = None


def test_whisper_streaming_keeps_a_stable_prefix(tiny, judge):
    item = next(it for it in speech.asterisk_split("heldout") if len(normalize_text(it.text).split()) >= 6)
    pcm = np.pad(item.audio(), (0, 24_000))
    source = WhisperTranscriber(tiny.tokenizer, judge.model, interval_ticks=5)
    frame = tiny.cfg.frame_samples
    stable, interims = "", []
    for i in range(len(pcm) // frame):
        (heard,) = source.push(pcm[i * frame:(i + 1) * frame], torch.zeros(1, 1))
        assert heard.tokens == tiny.tokenizer.encode(heard.text)
        stable += heard.text
        interims.append(heard.interim)
    text = stable + source.finish().text
    assert any(interims)  # a guess ran ahead of the stable text
    assert stable  # and words became stable before the end
    assert word_errors(item.text, text).wer <= 0.2  # Whisper reads this speaker well


def test_eval_listen_report(tiny, judge):
    voice = speech.synthetic_items(["The sun rose over the quiet town."])
    sets = listen_sets(voice, speech.asterisk_split("heldout", 1))
    assert set(sets) == {"heldout_voice", "asterisk", "heldout_voice_telephone", "asterisk_telephone"}
    r = eval_listen(tiny, sets, sources=("head", "whisper"), judge=judge, whisper_model=judge.model)
    assert r["default_source"] == "head" and set(r["sources"]) == {"head", "whisper"}
    assert len(r["rows"]) == 8 and r["items"] == 4
    whisper = r["sources"]["whisper"]
    assert whisper["sets"]["asterisk"]["wer"] <= 0.2 and whisper["lag_words"] > 0
    assert 0 < whisper["lag_s"]["p50"] < 3 and whisper["rtf"] > 0
    assert r["sources"]["head"]["rtf"] > 0 and all(0 <= s["cer"] for s in r["sets"].values())
    json.dumps(r)


def test_listen_stage_stream_with_whisper_source(tiny, judge):
    """services/listen with `--transcript whisper`: per frame the latent, the stable text as tokens
    and the interim guess; the stable text adds up to the prompt's words."""
    from michi.serving.execution import TorchEncoderStream
    from services.listen.server import ListenStream

    item = next(it for it in speech.asterisk_split("heldout") if len(normalize_text(it.text).split()) >= 4)
    pcm8k = np.pad(item.audio(8_000), (0, 8_000))
    stream_ = ListenStream(tiny, 8_000, TorchEncoderStream(tiny), "whisper", judge.model)
    frames = []
    for i in range(0, len(pcm8k), 800):  # 100 ms chunks at 8 kHz
        frames += stream_.push(pcm8k[i:i + 800])
    assert len(frames) == len(pcm8k) * 3 // 1920
    assert all(latent.shape == (tiny.cfg.latent_dim,) for latent, _ in frames)
    stable = "".join(heard.text for _, heard in frames) + stream_.text.finish().text
    assert any(heard.interim for _, heard in frames)
    assert word_errors(item.text, stable).wer <= 0.34


def test_decoder_settings_reach_the_beam_search():
    """`michi eval listen --decoder margin=3,...`: settings over the shipped lexicon's own reach
    the head's phoneme beam search and the report; an unknown key is refused with the known ones."""
    from michi.eval.cli import _settings
    from michi.transcript import transcriber

    default = michi.load()
    settings = _settings("margin=3,settle=6,alpha=0.5")
    assert settings == {"margin": 3, "settle": 6, "alpha": 0.5}
    decoder = transcriber("head", default, decoder=settings).decoder
    assert (decoder.margin, decoder.settle, decoder.alpha) == (3, 6, 0.5)
    assert decoder.beam == default.lexicon.decoder["beam"]  # the rest as shipped
    assert decoder.lm is default.word_lm  # words scored by the shipped word LM
    sets = {"asterisk": [(it, it.audio(24_000)) for it in speech.asterisk_split("heldout", 1)]}
    assert eval_listen(default, sets, decoder=settings)["decoder"] == {**default.lexicon.decoder, **settings}
    with pytest.raises(SystemExit, match="settle"):
        _settings("setle=6")


@pytest.mark.parametrize("source", ["head", "head-bytes"])
def test_decoder_sweep_decodes_as_a_call_does(source):
    """The sweep decodes cached log-probs of the whole clip; a call streams a tick at a time
    through the encoder and `HeadTranscriber`: the same pieces at the same ticks, for the shipped
    phoneme search (`head`) and the byte search (`head-bytes`)."""
    from michi.eval.decoder_sweep import decode, grid, head_log_probs
    from michi.model.textlm import BeamDecoder
    from michi.transcript import phone_decoder

    default = michi.load()
    (item,) = speech.asterisk_split("heldout", 1)
    pcm = item.audio(24_000)
    lm = default.text_lm
    phones = source == "head"
    decoder = phone_decoder(default) if phones else BeamDecoder(lm, default.model.listen_text.blank, **lm.decoder)
    swept = decode(decoder, head_log_probs(default, pcm, phones=phones))
    called = stream(default, source, pcm)["pieces"]
    assert [p for p, _ in swept] == [p for p, _ in called] and swept
    assert all(0 <= t_call - t_swept < 0.5 for (_, t_swept), (_, t_call) in zip(swept, called))  # + compute
    assert grid("margin=4,6;settle=5") == [{"margin": 4, "settle": 5}, {"margin": 6, "settle": 5}]
    with pytest.raises(ValueError, match="not a beam search setting"):
        grid("margn=4")


def test_eval_listen_after_a_lead_of_silence(tiny, judge):
    """`lead_s`: each item streams behind that much silence, and its words' lags still count from
    the item's own start (4 s of lead would otherwise put every lag past 4 s)."""
    sets = {"asterisk": [(it, it.audio(24_000)) for it in speech.asterisk_split("heldout", 1)]}
    r = eval_listen(tiny, sets, sources=("whisper",), judge=judge, whisper_model=judge.model, lead_s=4.0)
    whisper = r["sources"]["whisper"]
    assert r["lead_s"] == 4.0 and whisper["wer"] <= 0.2 and whisper["lag_words"] > 0
    assert 0 < whisper["lag_s"]["p50"] < 3
    assert whisper["audio_s"] == pytest.approx(4.0 + len(with_tail(sets["asterisk"][0][1])) / 24_000)
