"""A small real corpus for the training tests: espeak-ng reads a few sentences in two voices.

The word times are spread evenly over each clip (not Whisper's: the pipeline's own tests cover
transcription); what these tests check is the training code, on real speech audio."""
import json
import shutil
import subprocess

import pytest

from michi.audio.io import read_wav, write_wav

SENTENCES = ["the cat sat on the mat", "a quick brown fox jumps", "hello there my friend",
             "we go home at night", "birds sing in the morning", "open the door please"]


@pytest.fixture(scope="session")
def mini_corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for i, text in enumerate(SENTENCES):
        for voice in ("en-us", "en+f3"):
            sid = f"{voice.replace('+', '_')}-{i}"
            raw = root / f"{sid}.raw.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", "120", "-w", str(raw), text], check=True)
            pcm, _ = read_wav(raw, rate_out_hz=24_000)
            raw.unlink()
            write_wav(root / "audio" / f"{sid}.flac", pcm, 24_000)
            words = text.split()
            step = len(pcm) / 24_000 / len(words)
            rows.append({"id": sid, "audio": f"audio/{sid}.flac", "speaker": voice, "text": text,
                         "words": [[w, k * step, (k + 1) * step] for k, w in enumerate(words)],
                         "duration_s": len(pcm) / 24_000, "split": "train" if i < 5 else "heldout_sentence",
                         "source": "espeak-ng"})
    (root / "segments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.jsonl"
    passages = [f"{s}. " * 3 for s in SENTENCES] * 4
    path.write_text("".join(json.dumps(p) + "\n" for p in passages))
    return path
