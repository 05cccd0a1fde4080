"""The gateway's contract over real sockets (issue 12): strict config, corrupt bytes, timeouts,
admission, text limits and bounded prefill, resume by token, END_CALL, the agent timeline,
barge-in with playback marks, end reasons, capabilities. A gateway of its own with small limits
runs beside the shared mesh's stages (tiny preset, random weights: these check the contract, not
the words)."""
import asyncio
import time

import grpc
import pytest
from mesh_support import load_session, requests, run, status

from michi.proto.backbone.v1 import backbone_pb2
from michi.proto.gateway.v1 import gateway_pb2 as pb
from michi.proto.gateway.v1 import gateway_pb2_grpc
from michi.serving import client
from michi.serving.launcher import free_port, wait_healthy

LIMITS = {"max-calls": 2, "config-timeout-s": 1, "idle-timeout-s": 1.5, "max-text-bytes": 2048,
          "max-call-text-bytes": 3000, "context-positions": 900, "lease-s": 0.6}


@pytest.fixture(scope="module")
def strict(mesh):
    """A real-time gateway with small limits, on the mesh's stages."""
    port = free_port()
    args = ["--listen", ",".join(mesh.addresses["listen"]), "--backbone", mesh.addresses["backbone"][0],
            "--vocoder", mesh.addresses["vocoder"][0]]
    for flag, value in LIMITS.items():
        args += [f"--{flag}", str(value)]
    process = mesh._spawn("gateway-strict", "gateway", port, args)
    wait_healthy(f"127.0.0.1:{port}", 120, process)
    return f"127.0.0.1:{port}"


def _config(**fields) -> pb.ConverseRequest:
    return client.config(rate_in=16_000, rate_out=24_000, **fields)


def _silence(n: int, ms: int = 80) -> list[pb.ConverseRequest]:
    return [pb.ConverseRequest(audio=b"\x00\x00" * (16 * ms))] * n


# ---- strict config ----------------------------------------------------------------------------------
def _bad(**change):
    request = _config()
    c = request.config
    for path, value in change.items():
        target = c
        *parents, leaf = path.split("__")
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return request


@pytest.mark.parametrize("request_, words", [
    (_bad(input_audio__sample_rate_hz=0), "sample_rate_hz must be set"),
    (_bad(input_audio__encoding=0), "input_audio.encoding = 0"),
    (_bad(output_audio__sample_rate_hz=11025), "not supported"),
    (_bad(mode=99), "mode = 99"),
    (_bad(turn__policy=7), "turn.policy = 7"),
    (_bad(turn__end_of_turn_silence_ms=-5), "turn.end_of_turn_silence_ms must be >= 0"),
    (_bad(max_ticks=-3), "max_ticks must be >= 0"),
    (_bad(mode=pb.TTS), "TTS mode needs config.text"),
    (_bad(system_text="x" * 3000), "limit is 2048 bytes"),
    (_bad(resume_token="bm9wZQ.secret", session_id="other"), "belongs to another session"),
])
def test_bad_config_is_invalid_argument(strict, request_, words):
    error = status(client.converse(strict, request_, timeout_s=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert words in error.details()


def test_errors_name_only_what_the_proto_can_ask_for(strict):
    error = status(client.converse(strict, _bad(input_audio__encoding=pb.MULAW, input_audio__sample_rate_hz=16000),
                                    timeout_s=10))
    named = {w.strip(";:,()") for w in error.details().split() if w.isupper() and w.isalnum() and len(w) > 3}
    assert {"LINEAR16", "MULAW"} <= named <= set(pb.AudioEncoding.keys()), named


def test_unset_formats_have_documented_defaults(strict):
    first = pb.ConverseRequest(config=pb.ConverseConfig(max_ticks=3))
    result = run(client.converse(strict, first, timeout_s=20))
    assert result.ended.reason == pb.MAX_TICKS
    # input unset: LINEAR16 16 kHz; output unset: the same, so 1280 samples a tick
    assert [len(a) for a in result.audio] == [1280] * len(result.audio) and result.audio
    assert [c.start_sample for c in result.audio_chunks] == [c.tick * 1280 for c in result.audio_chunks]


async def _raw_call(address: str, frames: list[bytes], timeout_s: float = 10.0) -> list[bytes]:
    async with grpc.aio.insecure_channel(address) as channel:
        method = channel.stream_stream("/michi.gateway.v1.Gateway/Converse",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)

        async def gen():
            for f in frames:
                yield f
        return [r async for r in method(gen(), timeout=timeout_s)]


@pytest.mark.parametrize("frames", [
    [b"\xff\xff\xff\xff"],  # not protobuf
    [_config(max_ticks=5).SerializeToString(), b"\x12\xff\xff\xff"],  # a truncated audio field mid-call
    [b""],  # an empty request
])
def test_corrupt_protobuf_is_invalid_argument(strict, frames):
    error = status(_raw_call(strict, frames))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "ConverseRequest" in error.details()


# ---- timeouts ---------------------------------------------------------------------------------------
def test_no_config_in_time_is_deadline_exceeded(strict):
    async def silent():
        await asyncio.sleep(5)
        yield _config()

    async def call():
        async with grpc.aio.insecure_channel(strict) as channel:
            return [r async for r in gateway_pb2_grpc.GatewayStub(channel).Converse(silent(), timeout=10)]
    start = time.monotonic()
    error = status(call())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no `config` within 1 s" in error.details()
    assert time.monotonic() - start < 4


def test_a_silent_client_ends_with_idle_timeout(strict):
    start = time.monotonic()
    result = run(client.converse(strict, _config(), requests(*_silence(3), hold_s=8), timeout_s=10))
    assert result.ended.reason == pb.IDLE_TIMEOUT and "1.5 s" in result.ended.detail
    assert time.monotonic() - start < 6


# ---- admission --------------------------------------------------------------------------------------
def test_calls_beyond_capacity_are_refused_at_once(strict):
    async def scenario():
        held = [asyncio.create_task(client.converse(strict, _config(), requests(*_silence(20), delay_s=0.08)))
                for _ in range(2)]
        await asyncio.sleep(1.0)  # both admitted and ticking
        t0 = time.monotonic()
        async with grpc.aio.insecure_channel(strict) as channel:
            call = gateway_pb2_grpc.GatewayStub(channel).Converse(requests(_config(max_ticks=2)), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            trailing = dict(await call.trailing_metadata() or ())
        refused_ms = (time.monotonic() - t0) * 1e3
        results = await asyncio.gather(*held)
        again = await client.converse(strict, _config(max_ticks=2), timeout_s=10)  # capacity is back
        return info.value, trailing, refused_ms, results, again

    error, trailing, refused_ms, results, again = run(scenario())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2/2 calls" in error.details()
    assert int(trailing["retry-after-ms"]) > 0
    assert refused_ms < 1000, refused_ms
    assert all(r.ended.reason == pb.CLIENT_CLOSED for r in results)
    assert again.ended.reason == pb.MAX_TICKS


def test_the_lease_is_renewed_on_the_wall_clock(strict):
    """A 0.6 s lease over a 4 s call: renewed on time, so the record is never lost (it used to be
    renewed every 25 ticks, and lapsed whenever 25 ticks took longer than the lease)."""
    result = run(client.converse(strict, _config(max_ticks=50), requests(*_silence(50), delay_s=0.07),
                                 timeout_s=30))
    assert result.ended.reason == pb.MAX_TICKS
    assert not [e.error for e in result.events if e.HasField("error")]


def test_capabilities_list_formats_limits_and_load(strict):
    async def ask():
        async with grpc.aio.insecure_channel(strict) as channel:
            return await gateway_pb2_grpc.GatewayStub(channel).GetCapabilities(pb.GetCapabilitiesRequest(), timeout=5)

    caps = run(ask())
    rates = {pb.AudioEncoding.Name(e.encoding): list(e.sample_rates_hz) for e in caps.encodings}
    assert rates["MULAW"] == [8000] and rates["ALAW"] == [8000] and 16000 in rates["LINEAR16"]
    assert set(rates) == set(pb.AudioEncoding.keys()) - {"AUDIO_ENCODING_UNSPECIFIED"}
    assert caps.max_calls == 2 and caps.live_calls == 0 and caps.tick_ms == 80
    assert caps.limits.max_text_bytes == 2048 and caps.limits.context_positions == 900
    assert caps.limits.idle_timeout_s == pytest.approx(1.5) and caps.limits.max_message_bytes == 4 * 1024 * 1024


# ---- text: limits, context budget, bounded prefill ---------------------------------------------------
def test_text_limits_are_events_and_the_call_goes_on(strict):
    texts = [pb.ConverseRequest(text=pb.TextInput(role=pb.CONTEXT, text=t))
             for t in ("a" * 2049, "b" * 1900, "c" * 1500, "d" * 10)]
    texts.append(pb.ConverseRequest(text=pb.TextInput(role=42, text="?")))
    result = run(client.converse(strict, _config(max_ticks=10), requests(*texts, *_silence(6)), timeout_s=20))
    errors = [(e.error.code, e.error.message) for e in result.events if e.HasField("error")]
    codes = [c for c, _ in errors]
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT.value[0]) == 2  # over 2048 bytes; unknown role
    assert any("limit is 2048 bytes" in m for _, m in errors)
    # 1900 fits; 1500 more passes the 3000 bytes a call
    assert any(c == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "3000 bytes a call" in m for c, m in errors)
    assert result.ended.reason == pb.MAX_TICKS


def test_text_past_the_context_budget_is_refused(strict):
    # 900 positions: the first 800-byte text fits, the second does not
    texts = [pb.ConverseRequest(text=pb.TextInput(role=pb.CONTEXT, text=c * 800)) for c in "xy"]
    result = run(client.converse(strict, _config(max_ticks=4), requests(*texts), timeout_s=20))
    refusals = [e.error.message for e in result.events if e.HasField("error")]
    assert len(refusals) == 1 and "context budget" in refusals[0] and "of 900 positions" in refusals[0]


def test_context_full_ends_the_call(strict):
    texts = [pb.ConverseRequest(text=pb.TextInput(role=pb.CONTEXT, text="z" * 880))]
    result = run(client.converse(strict, _config(max_ticks=200), requests(*texts, *_silence(40), delay_s=0.02),
                                 timeout_s=30))
    assert result.ended.reason == pb.CONTEXT_FULL and "900 positions" in result.ended.detail


def test_large_text_is_prefilled_in_slices_beside_a_live_call(mesh, redis_server):
    """A 1 MB text is refused at once; a 3.5 KB text is prefilled 64 tokens between ticks (55 ticks). Neither
    holds up the sender's ticks nor another call's (the old backbone wedged on 16 KB)."""
    session = "text-slices"

    async def scenario():
        other = asyncio.create_task(client.converse(mesh.gateway, _config(max_ticks=40)))
        texts = [pb.ConverseRequest(text=pb.TextInput(role=pb.CONTEXT, text="m" * (1 << 20))),
                 pb.ConverseRequest(text=pb.TextInput(role=pb.CONTEXT, text="k" * 3500))]
        sender = await client.converse(mesh.gateway, _config(session_id=session, max_ticks=60),
                                       requests(*texts), timeout_s=30)
        return sender, await other

    t0 = time.monotonic()
    sender, other = run(scenario())
    wall_s = time.monotonic() - t0
    assert other.ended.reason == sender.ended.reason == pb.MAX_TICKS
    assert len(other.audio_chunks) == 40 and len(sender.audio_chunks) == 60  # every tick, both calls
    assert wall_s < 60 * 0.08 * 2.5, wall_s  # real time, give or take shared cores
    refused = [e.error for e in sender.events if e.HasField("error")]
    assert len(refused) == 1 and "limit is 16384 bytes" in refused[0].message

    _, history = run(load_session(redis_server.url, session))
    records = [backbone_pb2.HistoryRecord.FromString(r) for r in history]
    slices = [len(r.text.tokens) for r in records if r.WhichOneof("record") == "text"]
    assert max(slices) <= 64 and sum(slices) == len("context: ") + 3500 + 2  # bos, text, eos
    kinds = [r.WhichOneof("record") for r in records]
    text_at = [i for i, k in enumerate(kinds) if k == "text"]
    assert len(text_at) == 55 and all(kinds[i + 1] == "tick" for i in text_at)  # one slice, then a tick


# ---- resume, END_CALL, timeline ----------------------------------------------------------------------
def test_resume_by_token_alone_and_not_after_end_call(mesh):
    async def first_part():
        async with grpc.aio.insecure_channel(mesh.gateway) as channel:
            call = gateway_pb2_grpc.GatewayStub(channel).Converse(requests(_config(), *_silence(30), delay_s=0.04))
            token, chunks = None, []
            async for response in call:
                kind = response.WhichOneof("response")
                if kind == "started":
                    token, session = response.started.resume_token, response.started.session_id
                elif kind == "audio":
                    chunks.append(response.audio)
                if len(chunks) >= 6:
                    break
            call.cancel()
            return token, session, chunks

    token, session, chunks = run(first_part())
    time.sleep(0.5)
    resumed = run(client.converse(mesh.gateway, _config(resume_token=token, max_ticks=5), timeout_s=20))
    assert resumed.session_id == session and resumed.ended.reason == pb.MAX_TICKS
    ticks = [c.tick for c in resumed.audio_chunks]
    # the timeline goes on from the last recorded tick: a tick sent but not yet recorded when the
    # client vanished is made again, at the same place on the timeline
    assert chunks[-1].tick <= ticks[0] <= chunks[-1].tick + 1
    assert [c.start_sample for c in resumed.audio_chunks] == [t * 1920 for t in ticks]
    ended = run(client.converse(mesh.gateway, _config(resume_token=token),
                                requests(pb.ConverseRequest(control=pb.Control(action=pb.Control.END_CALL))),
                                timeout_s=20))
    assert ended.ended.reason == pb.CLIENT_END_CALL
    error = status(client.converse(mesh.gateway, _config(resume_token=token), timeout_s=20))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "cannot be resumed" in error.details()


def test_barge_in_reports_what_the_playback_mark_says_was_heard(mesh):
    """INTERRUPT_AGENT cuts the agent; with a PlaybackMark the barge-in reports the played samples
    of the turn, the agent text up to them, and the muted ticks still pass on the timeline."""
    async def scenario():
        async with grpc.aio.insecure_channel(mesh.fast_gateway) as channel:
            outbox: asyncio.Queue = asyncio.Queue()
            await outbox.put(_config(max_ticks=40))

            async def requests():
                while (item := await outbox.get()) is not None:
                    yield item

            responses, marked = [], None
            call = gateway_pb2_grpc.GatewayStub(channel).Converse(
                requests(), metadata=(("authorization", "Bearer secret"),), timeout=30)
            async for response in call:
                responses.append(response)
                audio = [r.audio for r in responses if r.WhichOneof("response") == "audio"]
                if marked is None and len(audio) == 10:
                    marked = audio[5].start_sample + 100  # the client played 5 chunks and 100 samples
                    await outbox.put(pb.ConverseRequest(playback=pb.PlaybackMark(played_samples=marked)))
                    await outbox.put(pb.ConverseRequest(control=pb.Control(action=pb.Control.INTERRUPT_AGENT)))
                    await outbox.put(None)
            return responses, marked

    responses, marked = run(scenario())
    events = [r.event for r in responses if r.WhichOneof("response") == "event"]
    barge = [e.barge_in for e in events if e.HasField("barge_in")]
    starts = [e for e in events if e.HasField("turn_start") and e.turn_start.speaker == "agent"]
    assert barge and starts, events
    cut = barge[0]
    assert cut.playback_confirmed and cut.cut_sample == marked
    audio = [r.audio for r in responses if r.WhichOneof("response") == "audio"]
    turn_start = 1920 * starts[0].tick
    assert cut.agent_samples_played == marked - turn_start
    texts = {r.agent_text.tick: r.agent_text.text for r in responses if r.WhichOneof("response") == "agent_text"}
    heard = "".join(t for tick, t in sorted(texts.items()) if starts[0].tick <= tick and tick * 1920 < marked)
    assert cut.heard_text == heard
    assert [a.start_sample for a in audio] == [a.tick * 1920 for a in audio]  # muted ticks still pass
    ticks = [a.tick for a in audio]
    assert any(b - a > 1 for a, b in zip(ticks, ticks[1:]))  # ... and the cut left a gap
    assert responses[-1].WhichOneof("response") == "ended"


def test_tts_and_text_only_end_with_reply_done(mesh):
    tts = run(client.converse(mesh.fast_gateway, _config(mode=pb.TTS, text="Hello there."), token="secret",
                              timeout_s=30))
    done = [e.reply_done for e in tts.events if e.HasField("reply_done")]
    assert tts.ended.reason == pb.TTS_DONE and len(done) == 1 and done[0].text == tts.agent_text
    text_only = run(client.converse(
        mesh.fast_gateway, _config(mode=pb.TEXT_ONLY),
        requests(pb.ConverseRequest(text=pb.TextInput(role=pb.USER, text="Say something."))), token="secret",
        timeout_s=30))
    done = [e.reply_done for e in text_only.events if e.HasField("reply_done")]
    assert len(done) == 1 and done[0].text == text_only.agent_text
    assert text_only.ended.reason == pb.CLIENT_CLOSED
