"""`michi up` starts every stage as its own process; `michi say` and `michi talk` go through it;
SIGTERM drains and stops them all cleanly."""
import ast
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from michi.serving.launcher import free_port

MICHI = [shutil.which("michi")] if shutil.which("michi") else [sys.executable, "-m", "michi.cli"]
GOODBYE = Path("/usr/share/asterisk/sounds/en/vm-goodbye.wav")
HEARD_WER = 0.6  # through the listen stage, these 3 prompts: 29 % (the card: 53 % on 40 held-out prompts)


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
        _hears_held_out_prompts(gateway, tmp_path)
    finally:
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped: {'gateway': 0, 'listen': 0, 'backbone': 0, 'vocoder': 0}" in out


def _hears_held_out_prompts(gateway: list[str], tmp_path: Path) -> None:
    """Human speech the default model never trained on (held-out Asterisk prompts), streamed in
    real time through the mesh: the user transcript `michi talk` prints has their words."""
    from michi.audio.io import read_wav, write_wav
    from michi.eval.speech import asterisk_split
    from michi.eval.wer import normalize_text, word_errors

    items = [it for it in asterisk_split("heldout") if len(normalize_text(it.text).split()) >= 4][:3]
    gap = np.zeros(4_000, np.float32)  # 0.5 s at 8 kHz
    audio = np.concatenate([piece for it in items for piece in (read_wav(it.path)[0], gap)])
    write_wav(tmp_path / "prompts.wav", audio, 8_000)
    talk = subprocess.run([*MICHI, "talk", "--audio", str(tmp_path / "prompts.wav"), *gateway, "--tail-s", "1"],
                          capture_output=True, text=True, timeout=120)
    assert talk.returncode == 0, talk.stderr
    heard = ast.literal_eval(next(line for line in talk.stdout.splitlines()
                                  if line.startswith("user transcript: ")).removeprefix("user transcript: "))
    reference = " ".join(it.text for it in items)
    assert word_errors(reference, heard).wer <= HEARD_WER, (reference, heard)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and localhost (its own root)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def _children(pid: int) -> dict[str, int]:
    """The stage processes `michi up` started: {stage: pid} (its children, from /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        stage = next((a.decode().rsplit(".", 1)[1] for a in cmd if a.startswith(b"services.")), None)
        if ppid == pid and stage:
            out[stage] = int(stat.parent.name)
    return out


def test_up_with_tls_token_and_max_calls(tmp_path):
    """`michi up --auth-token --tls-cert --tls-key --max-calls`: the gateway (only it) gets them, serves
    TLS (health and calls), wants the token; `michi say --tls-ca --token` reaches it."""
    import asyncio
    import os

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from michi.proto.gateway.v1 import gateway_pb2 as pb
    from michi.proto.gateway.v1 import gateway_pb2_grpc
    from michi.serving import client

    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = _self_signed(tmp_path)
    root = cert.read_bytes()
    token = "up-test-token"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MICHI_AUTH_TOKEN", "MICHI_TLS_CERT", "MICHI_TLS_KEY",
                                                            "REDIS_URL", "MICHI_HOST", "MICHI_MAX_CALLS")}
    up = subprocess.Popen([*MICHI, "up", "--model", "tiny", "--port", str(port), "--stage-ports", "auto",
                           "--log-dir", str(tmp_path), "--auth-token", token, "--tls-cert", str(cert),
                           "--tls-key", str(key), "--max-calls", "4"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        lines = []
        while not any("michi is up" in line for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(up.stdout.readline())
        # the gateway alone gets the flags; the token is in its environment, on no command line
        stages = _children(up.pid)
        assert set(stages) == {"listen", "backbone", "vocoder", "gateway"}, stages
        for stage, pid in stages.items():
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert token not in " ".join(cmd)
            gateway = stage == "gateway"
            assert ("--tls-cert" in cmd, "--max-calls" in cmd) == (gateway, gateway), (stage, cmd)
            assert (f"MICHI_AUTH_TOKEN={token}".encode() in environ) == gateway, stage
            if gateway:
                assert cmd[cmd.index("--max-calls") + 1] == "4"
        # health over TLS; a plaintext channel gets nowhere
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(root)) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as plain:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        tts = client.config(mode=pb.TTS, text="hi", max_ticks=3, rate_out=16_000)
        # over TLS without the token: refused
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            asyncio.run(client.converse(address, tts, timeout_s=30, root_certs=root))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # over TLS with the token: the call runs to its end (3 ticks of 16 kHz audio, less the
        # resampler's delay)
        result = asyncio.run(client.converse(address, tts, token=token, timeout_s=60, root_certs=root))
        assert result.session_id and 2 * 1280 < len(result.pcm) <= 3 * 1280, (len(result.pcm), result.events)
        # the command line client: --tls-ca and --token
        say = subprocess.run([*MICHI, "say", "hi", "--gateway", address, "--token", token, "--tls-ca", str(cert),
                              "--out", str(tmp_path / "hi.wav")], capture_output=True, text=True, timeout=180,
                             env=env)
        assert say.returncode == 0, say.stderr
        assert "time to first audio" in say.stdout and (tmp_path / "hi.wav").exists()
        # the gateway says what it enforces (contract of gateway.proto's GetCapabilities)
        async def capabilities():
            async with client.aio_channel(address, root) as channel:
                return await gateway_pb2_grpc.GatewayStub(channel).GetCapabilities(
                    pb.GetCapabilitiesRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)

        try:
            caps = asyncio.run(capabilities())
        except grpc.aio.AioRpcError as e:  # checked after the clean stop
            caps = e
    finally:
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped: {'gateway': 0, 'listen': 0, 'backbone': 0, 'vocoder': 0}" in out
    assert isinstance(caps, pb.Capabilities), f"GetCapabilities: {caps.code().name}: {caps.details()}"
    assert caps.auth_required and caps.max_calls == 4, caps
