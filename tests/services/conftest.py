"""A real mesh for the service tests: every stage its own process on free loopback ports, a real
redis-server of the test's own (so it can be killed), real audio."""
import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from michi.audio.io import read_wav
from michi.serving.launcher import Mesh, free_port, wait_healthy

SPEECH = Path("/usr/share/asterisk/sounds/en/demo-congrats.wav")  # Debian asterisk-core-sounds-en-wav


class RedisServer:
    def __init__(self, port: int, workdir: Path):
        self.port, self.workdir, self.process = port, workdir, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if not shutil.which("redis-server"):
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mesh(redis_server, tmp_path_factory):
    """Two replicas of backbone and vocoder (to kill one mid-call), Redis sessions, and a second
    gateway that ticks as fast as the stages answer and wants a bearer token."""
    logs = tmp_path_factory.mktemp("mesh-logs")
    ports = {s: free_port() for s in ("gateway", "listen", "backbone", "vocoder")}
    metrics_port = free_port()
    m = Mesh(model="tiny", ports=ports, replicas={"backbone": 2, "vocoder": 2}, threads=1, log_dir=str(logs),
             env={"REDIS_URL": redis_server.url}, gateway_args=["--metrics-port", str(metrics_port)])
    m.start(timeout_s=240)
    fast_port = free_port()
    fast = m._spawn("gateway-fast", "gateway", fast_port, [
        "--listen", ",".join(m.addresses["listen"]), "--backbone", m.addresses["backbone"][0],
        "--vocoder", m.addresses["vocoder"][0], "--no-realtime", "--auth-token", "secret"])
    wait_healthy(f"127.0.0.1:{fast_port}", 120, fast)
    m.fast_gateway = f"127.0.0.1:{fast_port}"
    m.logs = logs
    m.metrics_port = metrics_port
    yield m
    codes = m.stop()
    assert all(code == 0 for name, code in codes.items() if m.processes[name].returncode is not None
               and name not in m.killed), codes


@pytest.fixture
def speech():
    if not SPEECH.exists():
        pytest.skip(f"{SPEECH} missing: apt-get install asterisk-core-sounds-en-wav")
    pcm, rate = read_wav(SPEECH)
    return pcm, rate


def run(coro):
    return asyncio.run(coro)


def silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)
