"""The mesh over real sockets: every stage its own process, Redis sessions, real speech.
Random weights (tiny preset): these tests check the plumbing and the turn logic, not the words."""
import asyncio
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mesh_support import load_session, requests, run, status

import michi
from michi.generate import tts, tts_max_ticks
from michi.proto.gateway.v1 import gateway_pb2 as pb
from michi.proto.gateway.v1 import gateway_pb2_grpc
from michi.serving import client
from michi.serving.launcher import free_port
from services.gateway.stages import rendezvous_order

FRAME = 1920


def _session_on(mesh, replica: int, prefix: str) -> str:
    """A session id whose calls start on the given replica of both backbone and vocoder (the gateway
    ranks replicas by rendezvous hashing of the session id: services/gateway/stages.py)."""
    return next(f"{prefix}-{i}" for i in range(1000)
                if all(rendezvous_order(f"{prefix}-{i}", mesh.addresses[s])[0] == mesh.addresses[s][replica]
                       for s in ("backbone", "vocoder")))


def test_stages_are_healthy_and_reflect(mesh):
    for stage, addresses in list(mesh.addresses.items()) + [("gateway", [mesh.gateway])]:
        for address in addresses:
            with grpc.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING, (stage, address)
    with grpc.insecure_channel(mesh.gateway) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
    assert "michi.gateway.v1.Gateway" in names and "grpc.health.v1.Health" in names


def test_tts_through_the_mesh_equals_in_process(mesh):
    """Same weights, same seed, same inputs: the mesh (three stages over gRPC, batched backbone)
    gives what the in-process Session gives, tick for tick."""
    result = run(client.converse(mesh.fast_gateway, client.config(mode=pb.TTS, text="hello", rate_in=24_000,
                                                                  rate_out=24_000), token="secret", timeout_s=120))
    assert result.trained_weights is False
    ticks = tts_max_ticks(len("hello"))
    assert len(result.pcm) == ticks * FRAME
    local = tts(michi.load("tiny"), "hello", continue_ticks=ticks, seed=0)
    want = np.concatenate([t.agent_audio for t in local.ticks[:ticks]])
    assert result.agent_text.startswith("hello")
    assert result.agent_text == "".join(t.agent_text for t in local.ticks[:ticks])
    np.testing.assert_allclose(result.pcm, want, atol=2e-4)  # LINEAR16 on the wire: 3e-5 steps


def test_bearer_token_is_required(mesh):
    error = status(client.converse(mesh.fast_gateway, client.config(mode=pb.TTS, text="hi"), timeout_s=30))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_conversation_barge_in_turns_and_record(mesh, speech, redis_server):
    pcm, rate = speech  # a human prompt, 8 kHz
    speech_s = 2.5  # 4.5 s in all: within the gateway's 5 s jitter buffer, which drops what is older
    audio = np.concatenate([np.zeros(rate // 2, np.float32), pcm[: int(speech_s * rate)],
                            np.zeros(rate * 3 // 2, np.float32)])
    session = "barge-in-call"
    # sent as fast as possible: the jitter buffer plays it out in real time, with no gap a busy
    # client could leave (a gap would be heard as silence and end the user's turn early)
    result = run(client.converse(mesh.gateway, client.config(rate_in=rate, rate_out=16_000, session_id=session),
                                 client.audio_requests(audio, rate, realtime=False), timeout_s=120))
    kinds = [(e.WhichOneof("event"), getattr(e, e.WhichOneof("event")).speaker
              if e.WhichOneof("event") in ("turn_start", "turn_end") else "") for e in result.events]
    assert ("turn_start", "agent") in kinds and ("turn_start", "user") in kinds and ("turn_end", "user") in kinds
    barge = [e.barge_in for e in result.events if e.WhichOneof("event") == "barge_in"]
    assert len(barge) == 1 and barge[0].agent_samples_played > 0 and not barge[0].playback_confirmed
    user_ends = [e for e in result.events if e.WhichOneof("event") == "turn_end" and e.turn_end.speaker == "user"]
    assert len(result.final_transcripts) == len(user_ends)  # one final transcript per user turn, whole
    assert "".join(result.final_transcripts) == result.user_text[:len("".join(result.final_transcripts))]
    user_start = next(e.tick for e in result.events if e.WhichOneof("event") == "turn_start"
                      and e.turn_start.speaker == "user")
    ticks = int(np.ceil(len(audio) / rate / 0.08))
    sent_ticks = len(result.audio)
    assert sent_ticks < ticks - 5  # the agent was muted while the user held the floor
    assert user_start * 80 >= 500 + 600 - 160  # the user's turn starts after the lead silence + 600 ms of speech
    record, history = run(load_session(redis_server.url, session))
    agent = [e for e in record.transcript if e.speaker == "agent"]
    assert any(e.cut_off for e in agent) and any(not e.cut_off for e in agent)
    assert record.heard_samples is not None and record.last_tick == len(history) - 1


def test_text_injection_and_text_only_calls(mesh, redis_server):
    session = "text-call"
    rest = requests(pb.ConverseRequest(text=pb.TextInput(role=pb.CONTEXT, text="The shop opens at nine.")),
                     pb.ConverseRequest(audio=b"\x00\x00" * 1600), delay_s=0.2)
    run(client.converse(mesh.gateway, client.config(session_id=session, max_ticks=8), rest, timeout_s=60))
    record, history = run(load_session(redis_server.url, session))
    assert any(e.speaker == "context" and "nine" in e.text for e in record.transcript)
    assert len(history) == 8 + 1  # 8 ticks and the text insertion
    text_only = run(client.converse(mesh.gateway, client.config(mode=pb.TEXT_ONLY),
                                    requests(pb.ConverseRequest(text=pb.TextInput(role=pb.USER, text="Hi!"))),
                                    timeout_s=60))
    assert text_only.agent_text and not text_only.audio


@pytest.mark.parametrize("first, code, message", [
    (pb.ConverseRequest(audio=b"\x00\x00"), grpc.StatusCode.INVALID_ARGUMENT, "first message"),
    (client.config(rate_in=11_025), grpc.StatusCode.INVALID_ARGUMENT, "11025"),
    (client.config(rate_in=16_000, encoding=pb.MULAW), grpc.StatusCode.INVALID_ARGUMENT, "8000"),
])
def test_bad_config_is_refused(mesh, first, code, message):
    error = status(client.converse(mesh.gateway, first, timeout_s=30))
    assert error.code() == code and message in error.details()


def test_garbage_and_oversized_audio_are_refused(mesh, redis_server):
    session = "garbage-call"
    garbage = requests(pb.ConverseRequest(audio=b"\x00\x01" * 800), pb.ConverseRequest(audio=b"\x00" * 4),
                        pb.ConverseRequest(text=pb.TextInput(text="x")))
    sent = client.config(session_id=session, mode=pb.CONVERSATION)
    sent.config.input_audio.encoding = pb.FLOAT32LE  # 4-byte samples: 1600 bytes of odd garbage still decode
    result = run(client.converse(mesh.fast_gateway, sent, garbage, token="secret", timeout_s=30))
    assert result.ended.reason == pb.CLIENT_CLOSED  # any bytes are audio of some value: the call goes on
    record, _ = run(load_session(redis_server.url, session))
    assert record.owner is None  # the call's lease is released; it can be resumed
    huge = requests(pb.ConverseRequest(audio=b"\x00" * (5 * 1024 * 1024)))
    error = status(client.converse(mesh.gateway, client.config(), huge, timeout_s=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_vanishes_then_resumes(mesh, redis_server):
    session = "vanishing-call"

    async def vanish():
        channel = grpc.aio.insecure_channel(mesh.gateway)
        call = gateway_pb2_grpc.GatewayStub(channel).Converse(
            requests(client.config(session_id=session), *[pb.ConverseRequest(audio=b"\x00\x00" * 320)] * 100,
                      delay_s=0.02))
        token, n = None, 0
        async for response in call:
            if response.WhichOneof("response") == "started":
                token = response.started.resume_token
            n += 1
            if n >= 10:
                break
        call.cancel()  # the client vanishes mid-call
        await channel.close()
        return token

    token = run(vanish())
    deadline = time.monotonic() + 10
    while run(load_session(redis_server.url, session))[0].owner is not None:
        assert time.monotonic() < deadline, "the vanished call still holds its session"
        time.sleep(0.2)
    before = run(load_session(redis_server.url, session))[0].last_tick
    again = run(client.converse(mesh.gateway, client.config(session_id=session, resume_token=token, max_ticks=3),
                                timeout_s=60))
    assert again.session_id == session and len(again.audio) > 0
    after, history = run(load_session(redis_server.url, session))
    assert after.last_tick == before + 3 and len(history) == after.last_tick + 1


def test_two_clients_cannot_hold_one_session(mesh):
    async def both():
        first = client.config(session_id="contested", max_ticks=40)
        task = asyncio.create_task(client.converse(mesh.gateway, first, timeout_s=60))
        await asyncio.sleep(1.0)
        try:
            await client.converse(mesh.gateway, client.config(session_id="contested"), timeout_s=30)
        finally:
            await task

    error = status(both())
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "contested" in error.details()


def test_gateway_metrics(mesh):
    """Prometheus metrics of the calls above; every call has ended, so none is live."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics", timeout=5).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['michi_live_sessions{stage="gateway"}'] == 0.0
    assert values["michi_time_to_first_audio_seconds_count"] >= 4
    assert values['michi_tick_seconds_count{stage="gateway"}'] > 50
    assert "michi_missed_tick_deadlines_total" in values


def test_stage_killed_mid_call_the_call_goes_on(mesh, redis_server):
    session = _session_on(mesh, 1, "failover")  # starts on replica 1 of backbone and vocoder

    async def call_and_kill():
        task = asyncio.create_task(client.converse(
            mesh.gateway, client.config(session_id=session, max_ticks=40, rate_in=16_000),
            # 3 s of audio for a 3.2 s call: the client is done sending when the gateway ends the
            # call (a client still writing to a finished call gets INTERNAL from grpc's core)
            client.audio_requests(np.zeros(16_000 * 3, np.float32), 16_000), timeout_s=120))
        await asyncio.sleep(1.2)
        mesh.kill("backbone-1")
        mesh.kill("vocoder-1")
        return await task

    result = run(call_and_kill())
    assert len(result.audio) == 40 and len(result.pcm) == 40 * FRAME, (len(result.audio), result.events)
    record, history = run(load_session(redis_server.url, session))
    assert (record.last_tick, len(history)) == (39, 40)  # nothing lost across the failover
    logs = (mesh.logs / "gateway.log").read_text()
    assert "stage_failover" in logs or "stage_stream_broken" in logs


def test_redis_down_mid_call_degrades_without_hanging(mesh, redis_server):
    async def call_and_stop_redis():
        task = asyncio.create_task(client.converse(mesh.gateway, client.config(max_ticks=20), timeout_s=60))
        await asyncio.sleep(0.6)
        redis_server.stop()
        return await task

    started = time.monotonic()
    result = run(call_and_stop_redis())
    assert len(result.audio) == 20 and time.monotonic() - started < 30
    errors = [e.error for e in result.events if e.WhichOneof("event") == "error"]
    assert len(errors) == 1 and errors[0].code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "session store unavailable" in errors[0].message
    redis_server.start()  # an empty store again, for what follows


def test_redis_down_at_start_is_a_clear_error(mesh):
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "services.gateway", "--port", str(free_port()),
                           "--redis-url", f"redis://127.0.0.1:{port}/0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unreachable" in proc.stderr and str(port) in proc.stderr


def test_audio_continuation_mode(mesh):
    """The caller's audio is the agent's voice prompt; the agent goes on after it."""
    prompt = (0.2 * np.sin(np.arange(12_000) / 7)).astype(np.float32)  # 0.5 s at 24 kHz
    result = run(client.converse(mesh.fast_gateway, client.config(mode=pb.AUDIO_CONTINUATION, rate_in=24_000,
                                                                  max_ticks=12),
                                 client.audio_requests(prompt, 24_000, realtime=False), token="secret",
                                 timeout_s=60))
    assert len(result.audio) == 12 and len(result.pcm) == 12 * FRAME


def test_tls_gateway(mesh, tmp_path):
    """TLS on the gateway with a self-signed certificate made for the test."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "services.gateway", "--port", str(port), "--model", mesh.model,
                                "--listen", mesh.addresses["listen"][0], "--backbone", mesh.addresses["backbone"][0],
                                "--vocoder", mesh.addresses["vocoder"][0], "--tls-cert", str(cert), "--tls-key", str(key)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def call():
            creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
                await asyncio.wait_for(channel.channel_ready(), 120)
                stub = gateway_pb2_grpc.GatewayStub(channel)
                return [r async for r in stub.Converse(requests(client.config(mode=pb.TTS, text="hi", max_ticks=3)))]

        responses = run(call())
        assert responses[0].WhichOneof("response") == "started"
        assert sum(r.WhichOneof("response") == "audio" for r in responses) == 3
    finally:
        gateway.terminate()
        gateway.wait(30)
