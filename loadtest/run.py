"""Load test of the mesh: N concurrent `Converse` calls, paced in real time with real speech, in a
mix of scenarios (`loadtest.scenarios`), ramped until a level breaks the objective (p95 time to
first audio < 200 ms and < 1 % missed tick deadlines).

    python -m loadtest.run                                   # the shipped model, a mesh of its own
    python -m loadtest.run --model tiny --call-s 12 --levels 1,2,3,4,6
    python -m loadtest.run --gateway host:50060 --gateway-metrics host:9100   # a running gateway

Per call (client clock; the gateway's events say when turns end and barge-ins happen):
- first audio: stream opened -> first AgentAudio (text_only: first AgentText instead)
- response: the user's speech end (when the last speech chunk was sent) -> first AgentAudio
  after the gateway's TurnEnd(user) (includes the 700 ms end-of-turn silence); eot: -> TurnEnd(user)
- barge-in stop: the user's speech onset -> the moment the last agent sample that was sent is
  done playing (client playout: each chunk plays from max(arrival, end of the previous chunk);
  last sample = the agent turn's first sample + BargeIn.agent_samples_played); barge-in event:
  onset -> BargeIn event (both include the 600 ms of speech that confirms a barge-in)
- interrupt stop: INTERRUPT_AGENT sent -> last agent sample played (text_inject)
- text reply: USER text sent -> AgentText (text_only); insert stall: the longest gap between
  consecutive ticks' audio within 1.5 s after a CONTEXT document is sent (80 ms = no stall);
  insert baseline: the same over the 1.5 s before it
- realtime ratio: agent ticks received x 80 ms / wall time they took (1.0 = real time)
Per level: missed tick deadlines and ticks (the gateway's Prometheus metrics, before/after),
compute RTF = gateway tick time / 80 ms and backbone forward / 80 ms, CPU of each stage process
(/proc, % of one core), GPU use (nvidia-smi, when there is one); p50/p95/p99 of everything.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from loadtest.common import (
    MAX_FIRST_AUDIO_MS,
    MAX_MISSED,
    backbone_deltas,
    cpu_snapshot,
    cpu_use,
    gateway_deltas,
    objective,
    percentiles,
    save_figure,
    say,
    scrape,
    write_report,
)
from loadtest.scenarios import AUDIO_SCENARIOS, SCENARIOS, Plan, load_speech, plan_call, schedule
from michi.config import SAMPLE_RATE_HZ, TICK_S

OUT_RATE = SAMPLE_RATE_HZ  # the agent's audio as the calls take it: the model rate (client.config's default)
CHUNK_MS = 20
LATENCIES = ("first_audio_ms", "first_text_ms", "response_ms", "eot_ms", "barge_in_stop_ms", "barge_in_event_ms",
             "interrupt_stop_ms", "text_reply_ms", "insert_stall_ms", "insert_baseline_ms", "realtime_ratio")
SCENARIO_KEY = {"answer": "response_ms", "barge_in": "barge_in_stop_ms", "text_inject": "response_ms",
                "text_only": "text_reply_ms"}


@dataclass
class Msg:
    """One response as the client got it."""
    t: float  # perf_counter at arrival
    kind: str  # started | audio | agent_text | transcript | turn_start | turn_end | barge_in | error
    tick: int = -1
    start_sample: int = 0
    samples: int = 0
    speaker: str = ""
    played: int = 0
    cut: int = 0


@dataclass
class Marks:
    """When the client sent what (perf_counter)."""
    opened: float = 0.0
    segments: list[tuple[float, float]] = field(default_factory=list)  # (speech onset, speech end)
    actions: list[tuple[float, str]] = field(default_factory=list)  # (sent, "text:ROLE"|"interrupt")


@dataclass
class CallRecord:
    scenario: str
    source: str
    level: int
    first_audio_ms: float | None = None
    first_text_ms: float | None = None
    response_ms: list = field(default_factory=list)
    eot_ms: list = field(default_factory=list)
    barge_in_stop_ms: list = field(default_factory=list)
    barge_in_event_ms: list = field(default_factory=list)
    barge_in_played: list = field(default_factory=list)
    barge_in_cut: list = field(default_factory=list)
    interrupt_stop_ms: list = field(default_factory=list)
    text_reply_ms: list = field(default_factory=list)
    insert_stall_ms: list = field(default_factory=list)
    insert_baseline_ms: list = field(default_factory=list)  # the longest tick gap in the 1.5 s before it
    realtime_ratio: float | None = None
    turns: int = 0  # user speech segments sent
    turns_without_end: int = 0  # no TurnEnd(user) seen (the VAD did not hold 600 ms of speech)
    barge_ins_missed: int = 0  # speech over the agent without a BargeIn event
    agent_audio_s: float = 0.0
    wall_s: float = 0.0  # stream opened -> its final status (a refusal: how fast it came)
    error: str | None = None
    status: str = "OK"  # the final gRPC status code's name
    retry_after_ms: int | None = None  # a refusal's `retry-after-ms` trailing metadata
    opened: float = 0.0  # perf_counter when the stream opened (to line calls up on one clock)


# ---- analysis of one call (pure) -----------------------------------------------------------------
def playout(audio: list[Msg], rate: int = OUT_RATE) -> list[float]:
    """When each audio chunk starts playing: at arrival, or when the previous chunk ends."""
    starts, end = [], -math.inf
    for a in audio:
        s = max(a.t, end)
        starts.append(s)
        end = s + a.samples / rate
    return starts


def sample_played_at(audio: list[Msg], starts: list[float], index: int, rate: int = OUT_RATE) -> float | None:
    """When agent sample `index` (output rate, from call start) finishes playing."""
    for a, s in zip(audio, starts):
        if a.start_sample <= index < a.start_sample + a.samples:
            return s + (index - a.start_sample + 1) / rate
    return None


def _stop_time(msgs: list[Msg], k: int, audio: list[Msg], starts: list[float], rate: int) -> float | None:
    """Barge-in event msgs[k]: when the last agent sample the gateway says was played ends."""
    event = msgs[k]
    turn_first = None
    for j in range(k - 1, -1, -1):  # the agent turn this barge-in cut: its first audio sample
        if msgs[j].kind == "turn_start" and msgs[j].speaker == "agent":
            nxt = next((m for m in msgs[j + 1:k] if m.kind == "audio"), None)
            turn_first = nxt.start_sample if nxt else None
            break
    if turn_first is None:
        sent = [m for m in msgs[:k] if m.kind == "audio"]
        turn_first = (sent[-1].start_sample + sent[-1].samples - event.played) if sent else 0
    if event.played <= 0:
        return None
    return sample_played_at(audio, starts, turn_first + event.played - 1, rate)


def analyse(record: CallRecord, marks: Marks, msgs: list[Msg], rate: int = OUT_RATE) -> CallRecord:
    audio = [m for m in msgs if m.kind == "audio"]
    starts = playout(audio, rate)
    texts = [m for m in msgs if m.kind == "agent_text"]
    if audio:
        record.first_audio_ms = 1e3 * (audio[0].t - marks.opened)
        record.agent_audio_s = sum(a.samples for a in audio) / rate
        ticks = audio[-1].tick - audio[0].tick + 1
        record.realtime_ratio = ticks * TICK_S / max(audio[-1].t - audio[0].t + TICK_S, 1e-9)
    if texts:
        record.first_text_ms = 1e3 * (texts[0].t - marks.opened)
    record.turns = len(marks.segments)
    for i, (on, end) in enumerate(marks.segments):
        nxt = marks.segments[i + 1][0] if i + 1 < len(marks.segments) else math.inf
        if record.scenario == "barge_in":
            k = next((k for k, m in enumerate(msgs) if m.kind == "barge_in" and on < m.t < nxt), None)
            if k is None:
                record.barge_ins_missed += 1
                continue
            record.barge_in_event_ms.append(1e3 * (msgs[k].t - on))
            record.barge_in_played.append(msgs[k].played)
            record.barge_in_cut.append(msgs[k].cut)
            stop = _stop_time(msgs, k, audio, starts, rate)
            if stop is not None:
                record.barge_in_stop_ms.append(1e3 * (stop - on))
        else:
            k = next((k for k, m in enumerate(msgs) if m.kind == "turn_end" and m.speaker == "user"
                      and end < m.t < nxt), None)
            if k is None:
                record.turns_without_end += 1
                continue
            record.eot_ms.append(1e3 * (msgs[k].t - end))
            reply = next((m for m in msgs[k:] if m.kind == "audio" and m.t < nxt), None)
            if reply is not None:
                record.response_ms.append(1e3 * (reply.t - end))
    for sent, kind in marks.actions:
        if kind == "interrupt":
            k = next((k for k, m in enumerate(msgs) if m.kind == "barge_in" and sent < m.t < sent + 1.0), None)
            stop = _stop_time(msgs, k, audio, starts, rate) if k is not None else None
            if stop is not None:
                record.interrupt_stop_ms.append(1e3 * (stop - sent))
        elif kind == "text:USER" and record.scenario == "text_only":
            reply = next((m for m in texts if m.t > sent), None)
            if reply is not None:
                record.text_reply_ms.append(1e3 * (reply.t - sent))
        elif kind == "text:CONTEXT":
            for lo, hi, out in ((sent, sent + 1.5, record.insert_stall_ms),  # after the document
                                (sent - 1.5, sent, record.insert_baseline_ms)):  # the same, before it
                window = [a for a in audio if lo <= a.t < hi]
                gaps = [b.t - a.t for a, b in zip(window, window[1:]) if b.tick == a.tick + 1]
                if gaps:
                    out.append(1e3 * max(gaps))
    return record


# ---- one call over the wire ----------------------------------------------------------------------
def _config(plan: Plan, seed: int):
    from michi.proto.gateway.v1 import gateway_pb2 as pb
    from michi.serving import client

    if plan.scenario == "text_only":
        return client.config(mode=pb.TEXT_ONLY, seed=seed)
    policy = pb.HALF_DUPLEX if plan.scenario == "answer" else pb.FULL_DUPLEX
    encoding = pb.MULAW if plan.speech.encoding == "MULAW" else pb.LINEAR16
    return client.config(mode=pb.CONVERSATION, rate_in=plan.speech.rate, encoding=encoding, seed=seed,
                         turn=pb.TurnConfig(policy=policy))


def _action(kind: str, text: str):
    from michi.proto.gateway.v1 import gateway_pb2 as pb

    if kind == "interrupt":
        return pb.ConverseRequest(control=pb.Control(action=pb.Control.INTERRUPT_AGENT))
    role = {"USER": pb.USER, "CONTEXT": pb.CONTEXT, "SYSTEM": pb.SYSTEM}[kind.split(":")[1]]
    return pb.ConverseRequest(text=pb.TextInput(role=role, text=text))


async def _text_timeline(plan: Plan, pending: list, marks: Marks, t0: float):
    """Text only: the actions on their schedule, then wait out the call."""
    for t_s, kind, text in pending:
        await asyncio.sleep(max(0.0, t0 + t_s - time.perf_counter()))
        marks.actions.append((time.perf_counter(), kind))
        yield _action(kind, text)
    await asyncio.sleep(max(0.0, t0 + plan.call_s - time.perf_counter()))


async def _audio_timeline(plan: Plan, pending: list, marks: Marks, t0: float,
                          user_turn_ended: asyncio.Event):
    """The plan's audio in real-time chunks with its actions interleaved; records when each
    speech segment's onset and end went out in `marks.segments`."""
    from michi.audio.pcm import Encoding, encode
    from michi.proto.gateway.v1 import gateway_pb2 as pb

    rate, enc = plan.speech.rate, Encoding(plan.speech.encoding)
    step = rate * CHUNK_MS // 1000
    bounds = [(int(a * rate), int(b * rate)) for a, b in plan.segments]
    sent_at = {}
    for i in range(0, len(plan.pcm), step):
        # A document goes in once the user's first turn has ended (the agent holds the
        # floor again), not at a fixed time: a loaded mesh ends that turn late.
        while pending and pending[0][0] <= i / rate and (
                pending[0][1] != "text:CONTEXT" or user_turn_ended.is_set()):
            _, kind, text = pending.pop(0)
            marks.actions.append((time.perf_counter(), kind))
            yield _action(kind, text)
        now = time.perf_counter()
        for a, b in bounds:  # the chunk holding a speech onset / end: when it went out
            if i <= a < i + step:
                sent_at[a] = now
            if i <= b - 1 < i + step:
                sent_at[b] = now + (b - i) / rate  # the end is spoken `b - i` samples into it
        yield pb.ConverseRequest(audio=encode(plan.pcm[i:i + step], enc))
        await asyncio.sleep(max(0.0, t0 + (i + step) / rate - time.perf_counter()))
    for t_s, kind, text in pending:  # actions after the audio (a short call)
        await asyncio.sleep(max(0.0, t0 + t_s - time.perf_counter()))
        marks.actions.append((time.perf_counter(), kind))
        yield _action(kind, text)
    marks.segments = [(sent_at[a], sent_at[b]) for a, b in bounds if a in sent_at and b in sent_at]


def _record_response(r, now: float, msgs: list, started: asyncio.Event,
                     user_turn_ended: asyncio.Event) -> None:
    """One ConverseResponse as a Msg; sets `started` / `user_turn_ended` when it says so."""
    kind = r.WhichOneof("response")
    if kind == "started":
        started.set()
    if kind == "audio":
        msgs.append(Msg(now, "audio", r.audio.tick, r.audio.start_sample, len(r.audio.audio) // 2))
    elif kind == "agent_text":
        msgs.append(Msg(now, "agent_text", r.agent_text.tick))
    elif kind == "event":
        e = r.event
        which = e.WhichOneof("event")
        if which == "barge_in":
            msgs.append(Msg(now, "barge_in", e.tick, played=e.barge_in.agent_samples_played,
                            cut=e.barge_in.agent_samples_cut))
        elif which in ("turn_start", "turn_end"):
            msgs.append(Msg(now, which, e.tick, speaker=getattr(e, which).speaker))
            if which == "turn_end" and e.turn_end.speaker == "user":
                user_turn_ended.set()
        elif which == "error":
            msgs.append(Msg(now, "error", e.tick))
    else:
        msgs.append(Msg(now, kind or "", -1))


def _record_rpc_error(record: CallRecord, e: grpc.aio.AioRpcError) -> None:
    """The call's failure status on `record`, with an admission refusal's retry hint."""
    from michi.serving.admission import RETRY_AFTER_KEY

    record.error, record.status = f"{e.code().name}: {e.details()}", e.code().name
    retry = dict(e.trailing_metadata() or ()).get(RETRY_AFTER_KEY)  # an admission refusal's hint
    if retry is not None:
        try:
            record.retry_after_ms = int(float(retry))
        except ValueError:
            record.error += f" (unreadable {RETRY_AFTER_KEY}: {retry!r})"


async def run_call(address: str, plan: Plan, level: int, seed: int = 0, delay_s: float = 0.0,
                   tail_s: float = 1.5, token: str | None = None, wait_started: bool = False) -> CallRecord:
    """One call on its own channel. `wait_started`: send only the config until the gateway's
    SessionStarted (the call admitted), then the plan's timeline. A grpc.aio client that writes
    while the server ends the stream (a refusal) can see INTERNAL "Internal error from Core"
    instead of the server's status (grpc/grpc#36066); a refused call then writes nothing after
    its config."""
    from michi.proto.gateway.v1 import gateway_pb2_grpc
    from michi.serving.server import CHANNEL_OPTIONS

    await asyncio.sleep(delay_s)
    source = plan.speech.source if plan.speech else "text"
    record, marks, msgs = CallRecord(plan.scenario, source, level), Marks(), []
    actions = sorted(plan.actions)
    user_turn_ended, started, over = asyncio.Event(), asyncio.Event(), False

    async def requests():
        yield _config(plan, seed)
        if wait_started:
            await started.wait()
            if over:  # refused (or failed) before SessionStarted: nothing more to send
                return
        t0 = time.perf_counter()
        pending = list(actions)
        if plan.pcm is None:
            timeline = _text_timeline(plan, pending, marks, t0)
        else:
            timeline = _audio_timeline(plan, pending, marks, t0, user_turn_ended)
        async for request in timeline:
            yield request
        await asyncio.sleep(tail_s)  # the last replies

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            marks.opened = time.perf_counter()
            async for r in stub.Converse(requests(), metadata=metadata, timeout=plan.call_s + 120):
                _record_response(r, time.perf_counter(), msgs, started, user_turn_ended)
    except grpc.aio.AioRpcError as e:
        _record_rpc_error(record, e)
    finally:
        over = True
        started.set()  # a request stream still waiting for SessionStarted ends
    record.wall_s = time.perf_counter() - marks.opened
    record.opened = marks.opened
    return analyse(record, marks, msgs)


# ---- GPU -----------------------------------------------------------------------------------------
class GpuSampler:
    """nvidia-smi utilisation and memory every 0.5 s while a level runs (None without a GPU)."""

    def __init__(self):
        self.available = shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                util, mem = out.stdout.splitlines()[0].split(",")
                self.samples.append((float(util), float(mem)))
            except Exception:  # noqa: BLE001
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        util, mem = np.array(self.samples).T
        return {"util_mean_pct": float(util.mean()), "util_max_pct": float(util.max()),
                "memory_max_mib": float(mem.max()), "samples": len(self.samples)}


# ---- a level, the ramp ---------------------------------------------------------------------------
def aggregate(records: list[CallRecord]) -> dict:
    """p50/p95/p99 of every latency, over all calls and per scenario."""
    def pool(rs, key):
        values = []
        for r in rs:
            v = getattr(r, key)
            values += v if isinstance(v, list) else [v]
        return percentiles(values)

    out = {"all": {k: pool(records, k) for k in LATENCIES}, "scenarios": {}}
    for s in SCENARIOS:
        rs = [r for r in records if r.scenario == s]
        if rs:
            out["scenarios"][s] = {"calls": len(rs), **{k: pool(rs, k) for k in LATENCIES}}
    out["audio_first_audio_ms"] = pool([r for r in records if r.scenario in AUDIO_SCENARIOS], "first_audio_ms")
    return out


def level_row(n: int, records: list[CallRecord], gw: dict, bb: dict | None, cpu: dict | None, gpu: dict | None,
              wall_s: float) -> dict:
    agg = aggregate(records)
    failed = sum(1 for r in records if r.error or (r.scenario in AUDIO_SCENARIOS and r.first_audio_ms is None)
                 or (r.scenario == "text_only" and r.first_text_ms is None))
    fa = agg["audio_first_audio_ms"]
    row = {"calls": n, "scenarios": [r.scenario for r in records], **gw, **(bb or {}), "failed_calls": failed,
           "first_audio_p95_ms": fa["p95"] if fa else None, "latency": agg, "cpu_pct_of_one_core": cpu,
           "gpu": gpu, "wall_s": wall_s,
           "turns": sum(r.turns for r in records), "turns_without_end": sum(r.turns_without_end for r in records),
           "barge_ins_missed": sum(r.barge_ins_missed for r in records),
           "errors": [r.error for r in records if r.error]}
    row["passed"] = objective(row["first_audio_p95_ms"], row["missed_pct"], failed)
    return row


async def level(address: str, plans: list[Plan], n: int, spread_s: float, seed: int) -> list[CallRecord]:
    return list(await asyncio.gather(*(run_call(address, p, n, seed + i, spread_s * i / max(n, 1))
                                       for i, p in enumerate(plans))))


def run_ramp(args, address: str, metrics: dict, pids: dict[str, int]) -> dict:
    speech = load_speech()
    say(f"speech: {len(speech)} utterances: " + "; ".join(s.source.split(':')[0] for s in speech))
    levels = [int(x) for x in args.levels.split(",")]
    plan_of = lambda scenario, i, call_s: plan_call(scenario, speech[i % len(speech)], call_s)  # noqa: E731
    warm = asyncio.run(level(address, [plan_of(s, i, 3.0) for i, s in enumerate(SCENARIOS)], 0, 0.2, 10_000))
    say("warm-up: " + ", ".join(f"{r.scenario} {'ok' if not r.error else r.error}" for r in warm))
    rows, records, k = [], [], 0
    mix = tuple(args.scenarios.split(","))
    for n, scenarios in zip(levels, schedule(levels, mix)):
        plans = [plan_of(s, k + i, args.call_s) for i, s in enumerate(scenarios)]
        g0 = scrape(metrics["gateway"]) if metrics.get("gateway") else {}
        b0 = scrape(metrics["backbone"]) if metrics.get("backbone") else {}
        c0 = cpu_snapshot(pids) if pids else None
        load = os.getloadavg()[0]  # the machine may be shared: how busy it was going in
        t = time.perf_counter()
        with GpuSampler() as gpu:
            rs = asyncio.run(level(address, plans, n, args.spread_s, k))
        wall = time.perf_counter() - t
        g1 = scrape(metrics["gateway"]) if metrics.get("gateway") else {}
        b1 = scrape(metrics["backbone"]) if metrics.get("backbone") else {}
        cpu = cpu_use(c0, cpu_snapshot(pids)) if pids else None
        row = level_row(n, rs, gateway_deltas(g0, g1), backbone_deltas(b0, b1) if b0 else None, cpu,
                        gpu.summary(), wall)
        row["loadavg_1min_before"] = load
        rows.append(row)
        records += rs
        k += n
        lat = row["latency"]["all"]
        fmt = lambda s: f"{s['p95']:.0f}" if s else "-"  # noqa: E731
        say(f"{n:>3} calls: {row['missed_ticks']}/{row['ticks']} missed ({row['missed_pct']:.2f} %), p95 first audio "
            f"{fmt(row['latency']['audio_first_audio_ms'])} ms, response {fmt(lat['response_ms'])}, barge-in stop "
            f"{fmt(lat['barge_in_stop_ms'])}, text reply {fmt(lat['text_reply_ms'])}, RTF {row['rtf']:.2f}, "
            f"CPU {cpu['total'] if cpu else float('nan'):.0f} % -> {'pass' if row['passed'] else 'FAIL'}")
        if not row["passed"] and not args.keep_going:
            break
    capacity = 0
    for row in rows:
        if not row["passed"]:
            break
        capacity = row["calls"]
    return {"levels": rows, "capacity_calls": capacity,
            "ramp_stopped": "at a failing level" if rows and not rows[-1]["passed"] else "at the last level",
            "overall": aggregate(records), "calls": [asdict(r) for r in records],
            "speech": [s.source for s in speech]}


def start_mesh(args, gateway_args: list[str] | None = None):
    """A mesh of its own on free ports (`args.model`, `args.threads`), with the gateway's and the
    backbone's metrics on free ports; `gateway_args`: more gateway flags (`--max-calls 4`)."""
    from michi.serving.launcher import Mesh, free_port

    ports = {s: free_port() for s in ("gateway", "listen", "backbone", "vocoder")}
    metrics = {"gateway": free_port(), "backbone": free_port()}
    logs = tempfile.mkdtemp(prefix="michi-loadtest-")
    mesh = Mesh(model=args.model, ports=ports, threads=args.threads, log_dir=logs,
                gateway_args=list(gateway_args or []),
                stage_args={s: ["--metrics-port", str(p)] for s, p in metrics.items()})
    say(f"mesh: starting listen, backbone, vocoder, gateway ({args.model}, {args.threads} torch thread(s) each; "
        f"logs in {logs})")
    mesh.start(timeout_s=240)
    return mesh, metrics


# ---- report --------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = report["calls"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, s in enumerate(SCENARIOS):
        rs = [c for c in calls if c["scenario"] == s]
        key = SCENARIO_KEY[s]
        x = np.sort([v for c in rs for v in c[key]])
        if x.size:
            left.step(x, np.arange(1, x.size + 1) / x.size, where="post", color=f"C{i}",
                      label=f"{s}: {key[:-3].replace('_', ' ')} (p95 {np.percentile(x, 95):.0f} ms)")
        first = "first_text_ms" if s == "text_only" else "first_audio_ms"
        y = np.sort([c[first] for c in rs if c[first] is not None])
        if y.size:
            left.step(y, np.arange(1, y.size + 1) / y.size, where="post", color=f"C{i}", ls="--",
                      label=f"{s}: {first[:-3].replace('_', ' ')} (p95 {np.percentile(y, 95):.0f} ms)")
    left.axvline(MAX_FIRST_AUDIO_MS, color="k", ls=":", lw=1)
    left.set(xlabel="latency (ms)", ylabel="fraction", title="Latency CDF per scenario (all levels)")
    left.set_xscale("log")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=2)

    rows = report["levels"]
    n = [r["calls"] for r in rows]
    p95 = lambda key: [r["latency"]["all"][key]["p95"] if r["latency"]["all"][key] else np.nan for r in rows]  # noqa
    right.plot(n, [r["first_audio_p95_ms"] or np.nan for r in rows], "o-", label="p95 first audio")
    right.plot(n, p95("response_ms"), "s-", label="p95 response after end of speech")
    right.plot(n, p95("barge_in_stop_ms"), "^-", label="p95 barge-in stop")
    right.plot(n, p95("text_reply_ms"), "v-", label="p95 text reply")
    right.axhline(MAX_FIRST_AUDIO_MS, color="C0", ls=":", lw=1)
    right.set(xlabel="concurrent calls", ylabel="latency (ms)", xticks=n,
              title=f"Capacity: {report['capacity_calls']} calls (p95 first audio < {MAX_FIRST_AUDIO_MS:.0f} ms, "
                    f"< {100 * MAX_MISSED:.0f} % missed ticks)")
    right.grid(alpha=0.3)
    twin = right.twinx()
    twin.plot(n, [r["missed_pct"] for r in rows], "x--", color="C3", label="missed ticks (%)")
    twin.axhline(100 * MAX_MISSED, color="C3", ls=":", lw=1)
    twin.set_ylabel("missed tick deadlines (%)")
    twin.set_ylim(0, max(2.0, 1.1 * max(r["missed_pct"] for r in rows)))
    lines = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    right.legend(lines, [h.get_label() for h in lines], fontsize=7, loc="upper left")
    save_figure(fig, report, "load test", path)


def summary(report: dict) -> str:
    f = lambda s, k="p95": f"{s[k]:.0f}" if s else "-"  # noqa: E731
    lines = [f"{'calls':>5}{'missed %':>9}{'FA p50':>7}{'FA p95':>7}{'FA p99':>7}{'resp p95':>9}{'barge p95':>10}"
             f"{'text p95':>9}{'RTF':>6}{'batch':>6}{'CPU %':>7}  result"]
    for r in report["levels"]:
        a, fa = r["latency"]["all"], r["latency"]["audio_first_audio_ms"]
        cpu = r["cpu_pct_of_one_core"]["total"] if r["cpu_pct_of_one_core"] else float("nan")
        lines.append(f"{r['calls']:>5}{r['missed_pct']:>9.2f}{f(fa, 'p50'):>7}{f(fa):>7}{f(fa, 'p99'):>7}"
                     f"{f(a['response_ms']):>9}{f(a['barge_in_stop_ms']):>10}{f(a['text_reply_ms']):>9}"
                     f"{r['rtf']:>6.2f}{r.get('backbone_mean_batch', float('nan')):>6.2f}{cpu:>7.0f}  "
                     f"{'pass' if r['passed'] else 'FAIL'}")
    lines.append(f"capacity: {report['capacity_calls']} concurrent calls (ramp stopped {report['ramp_stopped']})")
    lines.append("all levels, per scenario (p50 / p95 / p99 ms):")
    for s, agg in report["overall"]["scenarios"].items():
        parts = []
        for k in ("first_audio_ms", "first_text_ms", "response_ms", "eot_ms", "barge_in_stop_ms",
                  "barge_in_event_ms", "interrupt_stop_ms", "text_reply_ms", "insert_stall_ms", "insert_baseline_ms"):
            if agg[k] and not (k == "first_text_ms" and s != "text_only"):
                parts.append(f"{k[:-3]} {agg[k]['p50']:.0f}/{agg[k]['p95']:.0f}/{agg[k]['p99']:.0f}")
        lines.append(f"  {s} ({agg['calls']} calls): " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import michi
    from michi.bench import machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(michi.DEFAULT_MODEL), help="the shipped model by default; tiny: random weights")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage process (own mesh)")
    p.add_argument("--levels", default="1,2,3,4,6,8,12,16,24,32", help="concurrent calls per level")
    p.add_argument("--call-s", type=float, default=15.0, help="length of each call")
    p.add_argument("--spread-s", type=float, default=1.0, help="a level's calls start evenly over this long")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="the mix, round-robin (default: all four)")
    p.add_argument("--keep-going", action="store_true", help="run every level, even after one fails")
    p.add_argument("--gateway", help="host:port of a running gateway, started with --max-calls of at least the "
                   "largest level (default: start a mesh here)")
    p.add_argument("--gateway-metrics", help="host:port of that gateway's Prometheus metrics")
    p.add_argument("--backbone-metrics", help="host:port of the backbone's Prometheus metrics")
    p.add_argument("--json", type=Path, default=Path("loadtest/results/loadtest-cpu.json"))
    args = p.parse_args(argv)
    if not set(args.scenarios.split(",")) <= set(SCENARIOS):
        p.error(f"--scenarios: from {','.join(SCENARIOS)}")
    os.environ.pop("REDIS_URL", None)  # own mesh: the in-process session store
    device = "cuda" if shutil.which("nvidia-smi") else "cpu"
    report = {"command": "python -m loadtest.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "machine": machine_info(device), "model": str(args.model), "settings": vars(args) | {"json": str(args.json)},
              "criteria": {"max_missed_ticks": MAX_MISSED, "max_p95_first_audio_ms": MAX_FIRST_AUDIO_MS}}
    t = time.perf_counter()
    if args.gateway:
        report |= run_ramp(args, args.gateway, {"gateway": args.gateway_metrics, "backbone": args.backbone_metrics}, {})
    else:
        # the ramp measures capacity itself: the gateway must admit its largest level (default 4)
        most = max(int(x) for x in args.levels.split(","))
        mesh, metrics = start_mesh(args, ["--max-calls", str(max(most, len(SCENARIOS)))])
        try:
            pids = {name: proc.pid for name, proc in mesh.processes.items()}
            report |= run_ramp(args, mesh.gateway, metrics, pids)
        finally:
            say(f"mesh: stopped (exit codes {mesh.stop()})")
    report["wall_s"] = time.perf_counter() - t
    write_report(report, args.json, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
