"""`michi up` starts every stage as its own process; `michi say` and `michi talk` go through it;
SIGTERM drains and stops them all cleanly."""
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from michi.serving.launcher import free_port

MICHI = [shutil.which("michi")] if shutil.which("michi") else [sys.executable, "-m", "michi.cli"]
GOODBYE = Path("/usr/share/asterisk/sounds/en/vm-goodbye.wav")


def test_up_say_talk_and_clean_stop(tmp_path):
    if not GOODBYE.exists():
        pytest.skip(f"{GOODBYE} missing: apt-get install asterisk-core-sounds-en-wav")
    port = free_port()
    up = subprocess.Popen([*MICHI, "up", "--port", str(port), "--log-dir", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        lines = []
        while not any("michi is up" in line for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(up.stdout.readline())
        gateway = ["--gateway", f"127.0.0.1:{port}"]
        say = subprocess.run([*MICHI, "say", "Hello there.", *gateway, "--out", str(tmp_path / "hello.wav")],
                             capture_output=True, text=True, timeout=120)
        assert say.returncode == 0, say.stderr
        assert "time to first audio" in say.stdout and "UNTRAINED" not in say.stderr  # the default model
        audio, rate = sf.read(tmp_path / "hello.wav")
        assert rate == 24_000 and len(audio) >= 12 * 1920
        talk = subprocess.run([*MICHI, "talk", "--audio", str(GOODBYE), *gateway, "--out", str(tmp_path / "reply.wav")],
                              capture_output=True, text=True, timeout=120)
        assert talk.returncode == 0, talk.stderr
        assert "time to first audio" in talk.stdout and (tmp_path / "reply.wav").exists()
    finally:
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped: {'gateway': 0, 'listen': 0, 'backbone': 0, 'vocoder': 0}" in out
