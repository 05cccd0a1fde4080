"""Speech evaluations with the real Whisper judge on the random `tiny` preset: structure, finite
figures, and the properties that need no trained model (the judge reads real and clean synthetic
speech well). What the listen side hears: tests/eval/test_listen.py."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import michi
from michi.eval import speech
from michi.eval.speech import SpeechItem, finite

pytestmark = pytest.mark.skipif(not speech.ASTERISK_TRANSCRIPTS.is_file(),
                                reason="needs Debian asterisk-core-sounds-en(-wav)")


@pytest.fixture(scope="module")
def judge():
    return speech.WhisperJudge(threads=2)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    return michi.load("tiny", seed=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A two-segment corpus: a held-out sentence by the training voice, the same sentence by the
    held-out voice, and a training segment that evaluations must ignore."""
    from michi.data.voices import DEFAULT_HELDOUT_VOICE, DEFAULT_TTS_VOICE, synthesize

    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    text = "The sun rose over the quiet town."
    segs = [("a1", DEFAULT_TTS_VOICE, "heldout_sentence", text),
            ("b1", DEFAULT_HELDOUT_VOICE, "heldout_voice", text),
            ("c1", DEFAULT_TTS_VOICE, "train", "A training sentence.")]
    lines = []
    for seg_id, voice, split, seg_text in segs:
        pcm = synthesize(voice, seg_text)
        sf.write(root / "audio" / f"{seg_id}.flac", pcm, 24_000)
        lines.append(json.dumps({"id": seg_id, "audio": f"audio/{seg_id}.flac", "speaker": voice, "text": seg_text,
                                 "words": [], "duration_s": len(pcm) / 24_000, "split": split, "source": "test"}))
    (root / "segments.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _prompt(name: str) -> SpeechItem:
    item = next(it for it in speech.asterisk_prompts() if it.id == name)
    assert item.path.is_file()
    return item


def test_asterisk_prompts():
    items = speech.asterisk_prompts()
    assert len(items) == 551  # 568 prompts less tones, beeps, silences (and one missing file)
    assert all(it.path.is_file() and speech.normalize_text(it.text) for it in items)
    few = speech.asterisk_prompts(5)
    assert len(few) == 5 and len({it.id for it in few}) == 5
    assert few == speech.asterisk_prompts(5)  # deterministic
    pcm = few[0].audio()
    assert pcm.dtype == np.float32 and pcm.ndim == 1 and len(pcm) > 2400  # resampled to 24 kHz


def test_load_segments(corpus):
    sets = speech.load_segments(corpus)
    assert [it.id for it in sets["heldout_sentence"]] == ["a1"]
    assert [it.id for it in sets["heldout_voice"]] == ["b1"]
    assert sets["heldout_voice"][0].audio().shape[0] > 24_000
    with pytest.raises(FileNotFoundError):
        speech.load_segments(corpus / "nope")


def test_judge_reads_a_real_prompt(judge):
    item = _prompt("check-number-dial-again")  # "Please check the number and dial again."
    hyp = judge(item.audio(8_000), 8_000)
    assert speech.word_errors(item.text, hyp).wer <= 0.15, hyp


def test_eval_tts(tiny, judge, tmp_path):
    sentences = ["Please call me back tomorrow.", "The garden is full of flowers."]
    r = speech.eval_tts(tiny, sentences, judge, continue_ticks=2, wav_dir=tmp_path, save_wavs=1)
    assert r["task"] == "tts" and r["items"] == 2 and len(r["rows"]) == 2
    assert finite(r["wer"]) and 0 <= r["wer"] and finite(r["cer"])
    assert r["counts"]["ref_words"] == 11
    for row in r["rows"]:
        assert {"id", "ref", "hyp", "wer", "errors", "agent_text", "audio_s", "reference_wer"} <= set(row)
        assert row["audio_s"] > 0
    # The reference voice is what the model learns to imitate: the judge must read it (near) perfectly.
    ref = r["reference_voice"]  # spoken with the eval's seed: the same audio on every run
    assert ref["voice"] and ref["items"] == 2 and ref["wer"] <= 0.1, [x["reference_hyp"] for x in r["rows"]]
    assert Path(r["rows"][0]["wav"]).is_file() and "wav" not in r["rows"][1]
    assert r["real_time_factor"] > 0
    json.dumps(r)


def test_eval_codec(tiny, judge, corpus, tmp_path):
    sets = {"heldout_voice": speech.load_segments(corpus)["heldout_voice"], "asterisk": [_prompt("activated")]}
    r = speech.eval_codec(tiny, sets, judge, wav_dir=tmp_path, save_wavs=1)
    assert r["task"] == "codec" and r["items"] == 2 and set(r["sets"]) == {"heldout_voice", "asterisk"}
    for key in ("wer_original", "wer_resynth", "mel_l1", "mel_l1_delay_compensated", "delay_ms",
                "xcorr_delay_ms_median"):
        assert finite(r[key]), key
    # The judge reads the originals; random weights resynthesise noise.
    assert r["wer_original"] <= 0.25, [row["hyp_original"] for row in r["rows"]]
    assert 0 <= r["wer_resynth"] and r["mel_l1"] > 0.1
    assert r["mel_l1_delay_compensated"] <= r["mel_l1"] and 0 <= r["delay_ms"] <= r["max_delay_ms"]
    assert set(r["mel_l1_by_delay_ms"]) and all(finite(v) for v in r["mel_l1_by_delay_ms"].values())
    row = r["rows"][0]
    assert Path(row["wav_original"]).is_file() and Path(row["wav_resynth"]).is_file()
    json.dumps(r)


def test_resynthesis_shapes(tiny):
    pcm = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 0.1
    original, resynth = speech.resynthesize(tiny, pcm)
    assert len(original) == len(resynth) == 3 * tiny.cfg.frame_samples
    assert np.array_equal(original[:5000], pcm) and np.isfinite(resynth).all()


def test_cli_eval_all(corpus, tmp_path, monkeypatch):
    from michi.cli import main
    from michi.eval import cli as eval_cli

    monkeypatch.setattr(eval_cli, "_run_text_task", lambda sub, task, source, args: {"stub": task})
    out = tmp_path / "report.json"
    code = main(["--threads", "2", "eval", "all", "--model", "tiny", "--corpus", str(corpus), "--limit", "1",
                 "--asterisk-limit", "1", "--continue-ticks", "2", "--save-wavs", "1", "--whisper-threads", "2",
                 "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"]["trained"] is False and report["model"]["preset"] == "tiny"
    assert {"tts", "codec", "listen", "text", "reasoning"} <= set(report["results"])
    assert report["results"]["tts"]["items"] == 1 and report["results"]["codec"]["items"] == 3
    assert set(report["results"]["listen"]["sets"]) == {"heldout_voice", "asterisk", "heldout_voice_telephone",
                                                        "asterisk_telephone"}
    assert report["wall_s"] > 0 and report["machine"]["cpu_count"]
    assert len(report["figures"]) == 2 and all(Path(p).is_file() for p in report["figures"])
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in report["timings_s"].values())


def test_cli_text_placeholder_when_text_cli_is_missing(monkeypatch, capsys):
    import sys

    from michi.cli import build_parser

    monkeypatch.setitem(sys.modules, "michi.eval.text_cli", None)  # import fails
    args = build_parser().parse_args(["eval", "text", "--model", "tiny"])
    assert args.func(args) == 2
    assert "michi.eval.text_cli" in capsys.readouterr().err
