"""Audio folder -> corpus: a real 8 kHz asterisk prompt is segmented and transcribed; a garbage
file and an empty file are reported in bad_files.jsonl and skipped."""
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from michi.data.audio_corpus import decode_audio, run_audio, segment_speech
from michi.data.corpus import load_bad_files, load_segments
from michi.data.wordtimes import word_errors

SOUNDS = Path("/usr/share/asterisk/sounds/en")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
PROMPT = "agent-alreadyon"


def _transcript(name: str) -> str:
    for line in gzip.open(TRANSCRIPTS, "rt", encoding="utf-8", errors="replace"):
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


@pytest.mark.skipif(not (SOUNDS / f"{PROMPT}.wav").is_file() or not TRANSCRIPTS.is_file(),
                    reason="needs asterisk-core-sounds-en-wav and asterisk-core-sounds-en")
def test_audio_folder_corpus(tmp_path, snapshot, capsys):
    inp = tmp_path / "in" / "asterisk"
    inp.mkdir(parents=True)
    shutil.copy(SOUNDS / f"{PROMPT}.wav", inp / f"{PROMPT}.wav")
    (inp / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (inp / "empty.flac").write_bytes(b"")
    out = tmp_path / "corpus"
    assert run_audio(tmp_path / "in", out, workers=2, heldout_fraction=0.0)

    bad = {Path(b["input"]).name: b["reason"] for b in load_bad_files(out)}
    assert set(bad) == {"garbage.wav", "empty.flac"}
    assert "empty" in bad["empty.flac"] and "decode" in bad["garbage.wav"]
    assert "bad inputs: 2" in capsys.readouterr().out

    segs = load_segments(out)
    assert segs and all(s["speaker"] == "asterisk" and s["split"] == "train" for s in segs)
    assert all(s["source"] == f"audio:asterisk/{PROMPT}.wav" for s in segs)
    hyp = " ".join(s["text"] for s in sorted(segs, key=lambda s: s["start_s"]))
    errors, words = word_errors(_transcript(PROMPT), hyp)
    assert errors / words <= 0.15, hyp
    for s in segs:
        info = sf.info(str(out / s["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
        assert 0.6 <= s["duration_s"] <= 15.5
        assert all(0 <= a <= b <= s["duration_s"] + 0.05 for _, a, b in s["words"])
    assert json.loads((out / "audio.json").read_text())["bad_files"] == 2

    before = snapshot(out)
    assert run_audio(tmp_path / "in", out, workers=2, heldout_fraction=0.0)
    assert snapshot(out) == before


def test_decode_rejects_and_resamples(tmp_path):
    sr = 11025  # not a model rate: resampled anyway
    sf.write(str(tmp_path / "a.ogg"), 0.3 * np.sin(np.arange(sr) / 5.0), sr, format="OGG")
    pcm = decode_audio(tmp_path / "a.ogg")
    assert abs(len(pcm) - 24000) < 50
    (tmp_path / "trunc.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    with pytest.raises(ValueError, match="decode"):
        decode_audio(tmp_path / "trunc.wav")


def test_segment_speech_splits_long_regions_at_pauses():
    w = 0.032
    probs = np.full(int(40 / w), 0.95, np.float32)  # 40 s of speech ...
    dip = int(12 / w)
    probs[dip:dip + 3] = 0.4  # ... with a faint pause at 12 s (too short to end speech)
    probs[:int(0.5 / w)] = 0.0
    segs, short = segment_speech(probs)
    assert all(1.0 <= b - a <= 15.0 + 1e-6 for a, b in segs)
    assert abs(segs[0][1] - 12.0) < 0.1  # cut at the pause
    assert abs(sum(b - a for a, b in segs) - 39.5) < 0.2
