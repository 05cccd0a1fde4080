"""No caller can harm another (issue 12): seeded random Converse streams against the real gateways,
raw bytes on the wire so corrupt protobuf goes too. Each stream mixes valid and invalid configs
(unknown enum values, negative or zero rates), audio of any byte length, text up to ~20 KB,
controls, playback marks, a second config, garbage bytes, an early half-close or a client cancel.

Every call must end on its own, well within its deadline, with a status the contract allows: never
UNKNOWN or INTERNAL (a crash in the gateway), never CANCELLED unless the client cancelled. A call
that started ends with CallEnded as its last message. After the run both gateways are healthy,
serve a normal call, and hold no call open.

Then a few deterministic streams on the same blocking client: what ends a started call on bad
input mid-call (CallEnded BAD_INPUT, then INVALID_ARGUMENT), and partial samples across messages."""
from __future__ import annotations

import asyncio
import random
import string
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from michi.proto.gateway.v1 import gateway_pb2 as pb
from michi.serving import client
from michi.serving.server import CHANNEL_OPTIONS

METHOD = "/michi.gateway.v1.Gateway/Converse"
SEEDS = list(range(64))
CONCURRENCY = 3  # streams at once (the gateway's default admission takes 4)
DEADLINE_S = 12.0  # the gRPC deadline of one stream: a stream still open then has hung
TOKEN = "secret"  # mesh.fast_gateway's bearer token (tests/services/conftest.py)
S = grpc.StatusCode
ALLOWED = {S.OK, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED, S.DEADLINE_EXCEEDED, S.UNAUTHENTICATED,
           S.FAILED_PRECONDITION, S.NOT_FOUND}
GOOD_FORMATS = [(pb.LINEAR16, 8000), (pb.LINEAR16, 16_000), (pb.LINEAR16, 24_000), (pb.LINEAR16, 48_000),
                (pb.MULAW, 8000), (pb.ALAW, 8000), (pb.FLOAT32LE, 16_000), (pb.FLOAT32LE, 48_000)]
BAD_FORMATS = [(pb.LINEAR16, 0), (pb.LINEAR16, -16_000), (pb.LINEAR16, 11_025), (pb.MULAW, 16_000),
               (pb.AUDIO_ENCODING_UNSPECIFIED, 16_000), (99, 16_000), (pb.ALAW, 0), (-3, 8000)]
WORDS = ["hello", "the", "shop", "opens", "at", "nine", "café", "日本語", "🙂", "naïve", "\n", "\t", "  ", "ok."]


def raw(message: pb.ConverseRequest) -> bytes:
    return message.SerializeToString()


def words(rng: random.Random, max_bytes: int) -> str:
    """Text of about `max_bytes` UTF-8 bytes (words, punctuation, non-Latin scripts, emoji)."""
    out, size = [], 0
    while size < max_bytes:
        w = rng.choice(WORDS) if rng.random() < 0.8 else "".join(rng.choices(string.printable, k=rng.randint(1, 12)))
        out.append(w)
        size += len(w.encode()) + 1
    return " ".join(out)


def text_size(rng: random.Random) -> int:
    return rng.choice([rng.randint(0, 40), rng.randint(0, 40), rng.randint(40, 2000), rng.randint(2000, 20_000)])


def good_config(rng: random.Random, realtime: bool) -> pb.ConverseConfig:
    mode = rng.choice([pb.CONVERSATION, pb.CONVERSATION, pb.TTS, pb.TTS, pb.TEXT_ONLY, pb.AUDIO_CONTINUATION,
                       pb.MODE_UNSPECIFIED])
    cfg = pb.ConverseConfig(mode=mode, max_ticks=rng.randint(1, 5), seed=rng.randint(-2**40, 2**40),
                            session_id=f"fuzz-{uuid.uuid4().hex[:12]}" if rng.random() < 0.5 else "")
    if rng.random() < 0.7:
        enc, rate = rng.choice(GOOD_FORMATS)
        cfg.input_audio.CopyFrom(pb.AudioFormat(encoding=enc, sample_rate_hz=rate))
    if rng.random() < 0.6:
        enc, rate = rng.choice(GOOD_FORMATS)
        cfg.output_audio.CopyFrom(pb.AudioFormat(encoding=enc, sample_rate_hz=rate))
    if rng.random() < 0.3:
        cfg.turn.CopyFrom(pb.TurnConfig(policy=rng.choice([0, pb.FULL_DUPLEX, pb.HALF_DUPLEX]),
                                        barge_in_min_speech_ms=rng.choice([0, 200, 600, 5000]),
                                        end_of_turn_silence_ms=rng.choice([0, 100, 700, 3000])))
    if mode == pb.TTS or rng.random() < 0.2:
        cfg.text = words(rng, rng.choice([1, 8, 30]))
    if rng.random() < 0.3:
        cfg.system_text = words(rng, text_size(rng))
    if not realtime and mode == pb.TTS and rng.random() < 0.2:
        cfg.max_ticks = 0  # TTS's own limit: every text token, then a pause (fast gateway only)
        cfg.text = rng.choice(["hi", "ok.", "café"])  # a short text: a few dozen ticks
    return cfg


def bad_config(rng: random.Random, realtime: bool) -> tuple[pb.ConverseConfig, str]:
    cfg = good_config(rng, realtime)
    what = rng.choice(["mode", "input", "output", "policy", "barge_in", "end_of_turn", "max_ticks", "tts_no_text",
                       "resume_token", "long_session_id", "huge_text"])
    if what == "mode":
        cfg.mode = rng.choice([99, -1, 5])
    elif what in ("input", "output"):
        enc, rate = rng.choice(BAD_FORMATS)
        getattr(cfg, f"{what}_audio").CopyFrom(pb.AudioFormat(encoding=enc, sample_rate_hz=rate))
    elif what == "policy":
        cfg.turn.policy = rng.choice([3, 99, -2])
    elif what == "barge_in":
        cfg.turn.barge_in_min_speech_ms = -rng.randint(1, 1000)
    elif what == "end_of_turn":
        cfg.turn.end_of_turn_silence_ms = -rng.randint(1, 1000)
    elif what == "max_ticks":
        cfg.max_ticks = -rng.randint(1, 10)
    elif what == "tts_no_text":
        cfg.mode, cfg.text = pb.TTS, ""
    elif what == "resume_token":
        cfg.resume_token = rng.choice(["nope", "".join(rng.choices(string.ascii_letters, k=43)), "ü" * 20])
    elif what == "long_session_id":
        cfg.session_id = "s" * rng.choice([129, 5000])
    else:
        setattr(cfg, rng.choice(["text", "system_text"]), words(rng, 300_000))
    return cfg, what


def garbage(rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["random", "truncated", "bad_tag", "overrun", "wrong_wire_type", "empty"])
    if kind == "random":
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))), kind
    if kind == "truncated":  # a real message, cut short
        whole = raw(pb.ConverseRequest(text=pb.TextInput(role=pb.USER, text=words(rng, 50))))
        return whole[:rng.randint(1, len(whole) - 1)], kind
    if kind == "bad_tag":  # field number 0 / an invalid varint
        return rng.choice([b"\x00\x01", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x07"]), kind
    if kind == "overrun":  # the audio field claims more bytes than there are
        return b"\x12\x64abc", kind
    if kind == "wrong_wire_type":  # config (field 1) as a varint
        return b"\x08\x01", kind
    return b"", kind  # an empty ConverseRequest: no oneof set


@dataclass
class Plan:
    seed: int
    realtime: bool
    auth: str  # right, none, wrong
    steps: list[tuple[str, object]] = field(default_factory=list)  # (what, bytes | seconds)
    end: str = "close"  # close: half-close after the steps; cancel: the client cancels
    cancel_after_s: float = 0.0
    deadline_s: float = DEADLINE_S

    def describe(self) -> str:
        return (f"seed {self.seed} ({'real-time' if self.realtime else 'fast'} gateway, auth {self.auth}, "
                f"{self.end}{f' at {self.cancel_after_s:.2f} s' if self.end == 'cancel' else ''}): "
                + ", ".join(what for what, _ in self.steps))


def make_plan(seed: int) -> Plan:
    rng = random.Random(seed)
    realtime = rng.random() < 0.25
    plan = Plan(seed, realtime, rng.choices(["right", "none", "wrong"], [0.88, 0.06, 0.06])[0])
    r = rng.random()
    if r < 0.6:
        plan.steps.append(("config", raw(pb.ConverseRequest(config=good_config(rng, realtime)))))
    elif r < 0.82:
        cfg, what = bad_config(rng, realtime)
        plan.steps.append((f"bad_config:{what}", raw(pb.ConverseRequest(config=cfg))))
    elif r < 0.92:
        plan.steps.append(("audio_first", raw(pb.ConverseRequest(audio=b"\x00" * rng.randint(0, 999)))))
    else:
        data, kind = garbage(rng)
        plan.steps.append((f"garbage_first:{kind}", data))
    for _ in range(rng.randint(0, 12)):
        what = rng.choices(["audio", "text", "control", "playback", "second_config", "garbage", "sleep"],
                           [0.34, 0.14, 0.08, 0.1, 0.04, 0.06, 0.24])[0]
        if what == "audio":
            n = rng.choice([0, 1, 3, rng.randint(1, 640), rng.randint(640, 6000)])
            pcm = bytes(rng.getrandbits(8) for _ in range(n)) if rng.random() < 0.5 else b"\x00" * n
            plan.steps.append((f"audio:{n}", raw(pb.ConverseRequest(audio=pcm))))
        elif what == "text":
            role = rng.choice([pb.TEXT_ROLE_UNSPECIFIED, pb.USER, pb.SYSTEM, pb.CONTEXT, pb.TOOL, 99])
            size = text_size(rng)
            plan.steps.append((f"text:{role}:{size}",
                               raw(pb.ConverseRequest(text=pb.TextInput(role=role, text=words(rng, size))))))
        elif what == "control":
            action = rng.choice([pb.Control.END_CALL, pb.Control.INTERRUPT_AGENT, pb.Control.INTERRUPT_AGENT,
                                 pb.Control.ACTION_UNSPECIFIED, 42])
            plan.steps.append((f"control:{action}", raw(pb.ConverseRequest(control=pb.Control(action=action)))))
        elif what == "playback":
            played = rng.choice([0, -5, rng.randint(0, 50_000), 2**62])
            plan.steps.append((f"playback:{played}",
                               raw(pb.ConverseRequest(playback=pb.PlaybackMark(played_samples=played)))))
        elif what == "second_config":
            plan.steps.append(("second_config", raw(pb.ConverseRequest(config=good_config(rng, realtime)))))
        elif what == "garbage":
            data, kind = garbage(rng)
            plan.steps.append((f"garbage:{kind}", data))
        else:
            plan.steps.append(("sleep", rng.choice([0.0, 0.02, 0.1, 0.3])))
    if rng.random() < 0.25:
        plan.end, plan.cancel_after_s = "cancel", rng.uniform(0.0, 1.5)
    return plan


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    elapsed_s: float
    responses: list[pb.ConverseResponse]
    cancelled: bool  # the client cancelled the call (before it ended)
    unparsable: int = 0


def run_plan(plan: Plan, address: str) -> Outcome:
    """One stream, on grpc's blocking API: its asyncio client reports INTERNAL ("Internal error
    from Core") instead of the server's status when a write races the server ending the call
    (grpc/grpc#36066), which would hide what the gateway really said."""
    metadata = {"right": (("authorization", f"Bearer {TOKEN}"),), "none": None,
                "wrong": (("authorization", "Bearer wrong"),)}[plan.auth]
    responses, unparsable = [], 0
    finished = threading.Event()
    cancelled = []

    def requests():
        for what, item in plan.steps:
            if what == "sleep":
                if finished.wait(item):
                    return
            else:
                yield item
        if plan.end == "cancel":
            finished.wait(plan.deadline_s)  # the stream stays open until the client cancels it

    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        converse = channel.stream_stream(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        started = time.monotonic()
        call = converse(requests(), metadata=metadata, timeout=plan.deadline_s)
        timer = threading.Timer(plan.cancel_after_s, lambda: cancelled.append(call.cancel()))
        if plan.end == "cancel":
            timer.start()
        try:
            for data in call:
                try:
                    responses.append(pb.ConverseResponse.FromString(data))
                except Exception:  # noqa: BLE001 - counted, asserted on
                    unparsable += 1
        except grpc.RpcError:
            pass
        finally:
            timer.cancel()
            finished.set()
        elapsed = time.monotonic() - started
        return Outcome(call.code(), call.details() or "", elapsed, responses, any(cancelled), unparsable)


def check(plan: Plan, out: Outcome) -> list[str]:
    """What in this outcome breaks the contract (empty: nothing)."""
    problems = []
    if out.cancelled:
        if out.code not in ALLOWED | {S.CANCELLED}:
            problems.append(f"status {out.code.name} after a client cancel: {out.details!r}")
    elif out.code not in ALLOWED:
        problems.append(f"status {out.code.name}: {out.details!r}")
    if out.code == S.DEADLINE_EXCEEDED and out.elapsed_s >= plan.deadline_s - 0.5:
        problems.append(f"hung: still open at the client's {plan.deadline_s:.0f} s deadline")
    if out.unparsable:
        problems.append(f"{out.unparsable} responses are not ConverseResponse")
    kinds = [r.WhichOneof("response") for r in out.responses]
    if "started" in kinds and (kinds.count("started") > 1 or kinds[0] != "started"):
        problems.append(f"SessionStarted not first and once: {kinds[:5]}")
    if "started" in kinds and not out.cancelled and kinds[-1] != "ended":
        problems.append(f"a started call did not end with CallEnded (last {kinds[-1]}, status {out.code.name})")
    if out.code == S.OK and "started" not in kinds:
        problems.append("OK without SessionStarted")
    for r in out.responses:
        if r.WhichOneof("response") == "event" and r.event.WhichOneof("event") == "error" \
                and r.event.error.code in (S.UNKNOWN.value[0], S.INTERNAL.value[0], S.OK.value[0]):
            problems.append(f"Event.Error with code {r.event.error.code}: {r.event.error.message!r}")
    return problems


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _live_calls(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith('michi_live_sessions{stage="gateway"}'))


def test_random_streams_end_with_allowed_statuses(mesh):
    plans = [make_plan(seed) for seed in SEEDS]
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(run_plan, p, mesh.gateway if p.realtime else mesh.fast_gateway) for p in plans]
        # a guard over the gRPC deadline: this test cannot hang even if the client library does
        outcomes = [f.result(timeout=len(plans) * DEADLINE_S) for f in futures]
    wall_s = time.monotonic() - started
    tally: dict[str, int] = {}
    failures = []
    for plan, out in zip(plans, outcomes):
        tally[out.code.name] = tally.get(out.code.name, 0) + 1
        for problem in check(plan, out):
            failures.append(f"{problem}\n    {plan.describe()}")
    reasons: dict[str, int] = {}
    for out in outcomes:
        if out.responses and out.responses[-1].WhichOneof("response") == "ended":
            name = pb.EndReason.Name(out.responses[-1].ended.reason)
            reasons[name] = reasons.get(name, 0) + 1
    slowest = max(range(len(plans)), key=lambda i: outcomes[i].elapsed_s)
    print(f"\n{len(plans)} streams in {wall_s:.1f} s; statuses {sorted(tally.items())}; calls ended by "
          f"{sorted(reasons.items())}; slowest {outcomes[slowest].elapsed_s:.1f} s: {plans[slowest].describe()}")
    for f in failures:
        print("FAIL", f)
    # after all that, both gateways are healthy, hold no call, and serve a normal call
    assert _health(mesh.gateway) == health_pb2.HealthCheckResponse.SERVING
    assert _health(mesh.fast_gateway) == health_pb2.HealthCheckResponse.SERVING
    deadline = time.monotonic() + 10
    while (live := _live_calls(mesh.metrics_port)) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live == 0, f"{live} calls still open on the real-time gateway"
    for address, token in ((mesh.gateway, None), (mesh.fast_gateway, TOKEN)):
        result = asyncio.run(client.converse(address, client.config(mode=pb.TTS, text="hi", max_ticks=3,
                                                                    rate_out=16_000), token=token, timeout_s=30))
        assert result.session_id and len(result.pcm) > 2 * 1280, address
    assert not failures, f"{len(failures)} of {len(plans)} streams broke the contract:\n" + "\n".join(failures)
    assert wall_s < 90, f"the fuzz run took {wall_s:.0f} s"


# ---- clauses the random streams cannot pin down (the rest: tests/services/test_contract.py) ---------------

def _tts(**fields) -> pb.ConverseRequest:
    return client.config(mode=pb.TTS, text=fields.pop("text", "hi"), max_ticks=fields.pop("max_ticks", 3),
                         rate_out=16_000, **fields)


def _stream(address, *items) -> Outcome:
    """Send `items` (messages, raw bytes, floats: pauses in seconds), then half-close the stream."""
    plan = Plan(0, False, "right")
    plan.steps = [("sleep", i) if isinstance(i, float) else ("msg", i if isinstance(i, bytes) else raw(i))
                  for i in items]
    return run_plan(plan, address)


def _ended(out: Outcome) -> pb.CallEnded | None:
    return out.responses[-1].ended if out.responses and out.responses[-1].WhichOneof("response") == "ended" else None


@pytest.mark.parametrize("corrupt", [b"\x12\x64abc", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x08\x01"],
                         ids=["overrun", "bad_varint", "wrong_wire_type"])
def test_corrupt_protobuf_is_invalid_argument(mesh, corrupt):
    first = _stream(mesh.fast_gateway, corrupt)  # as the first message
    assert first.code == S.INVALID_ARGUMENT, ("first", first.code, first.details)
    mid = _stream(mesh.gateway, _tts(max_ticks=40), 0.3, corrupt, 2.0)  # mid-call (a 3.2 s call, real time)
    assert mid.code == S.INVALID_ARGUMENT, ("mid-call", mid.code, mid.details)
    ended = _ended(mid)
    assert ended is not None and ended.reason == pb.BAD_INPUT, ("mid-call", [r.WhichOneof("response")
                                                                            for r in mid.responses][-3:])


def test_second_config_is_invalid_argument(mesh):
    out = _stream(mesh.gateway, _tts(max_ticks=40), 0.3, _tts(), 2.0)
    assert out.code == S.INVALID_ARGUMENT and "config" in out.details, (out.code, out.details)
    ended = _ended(out)
    assert ended is not None and ended.reason == pb.BAD_INPUT


def test_any_audio_byte_length_is_buffered(mesh):
    """LINEAR16 in odd pieces (3 bytes, then 1, then 1599): a partial sample waits for the rest."""
    out = _stream(mesh.fast_gateway, client.config(max_ticks=4), pb.ConverseRequest(audio=b"\x00\x01\x02"),
                  pb.ConverseRequest(audio=b"\x03"), pb.ConverseRequest(audio=b"\x00" * 1599))
    assert out.code == S.OK, (out.code, out.details)
    ended = _ended(out)
    assert ended is not None and ended.reason == pb.MAX_TICKS, [r.WhichOneof("response") for r in out.responses][-3:]
