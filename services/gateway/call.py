"""One live call on the gateway, once its stage streams are open.

`Call.run_ticks` (CONVERSATION, TTS, AUDIO_CONTINUATION) runs one tick per 80 ms, each tick
hear -> think -> speak -> gate -> record:
- hear: the caller's audio for the tick, out of the jitter buffer, to the listen stage and the VAD;
- think: the backbone's step (its record joins the call's history);
- speak: the vocoder's audio, resampled to the caller's output rate;
- gate: the turn manager decides who holds the floor; its events (a barge-in cuts the agent
  timeline), and the agent's audio sent or muted;
- record: agent text and user transcript out, one store write, metrics, and the real-time pace.
`Call.run_text_only` (TEXT_ONLY) has no ticks: it prefills the caller's text and answers it."""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

import grpc
import numpy as np
import structlog

from michi.audio.pcm import Encoding, encode
from michi.audio.resample import StreamingResampler
from michi.audio.vad import StreamingVAD
from michi.config import FRAME_SAMPLES, SAMPLE_RATE_HZ, TICK_MS, TICK_S
from michi.generate import tts_max_ticks
from michi.proto.backbone.v1 import backbone_pb2
from michi.proto.gateway.v1 import gateway_pb2 as pb
from michi.proto.listen.v1 import listen_pb2
from michi.proto.vocoder.v1 import vocoder_pb2
from michi.serving.metrics import FIRST_AUDIO_SECONDS, MISSED_TICKS, TICK_SECONDS
from michi.session.store import SessionStoreError, TranscriptEntry
from michi.text_roles import text_insertion

from .contract import BadRequest, CallConfig
from .events import BargeIn, Error, Event, ReplyDone, TurnEnd, TurnStart, response
from .inbox import CallInbox
from .jitter import JitterBuffer
from .stages import StageLink, StageUnavailable
from .timeline import AgentTimeline
from .turns import TurnManager, TurnSettings, TurnUpdate

log = structlog.get_logger()
VOCODER_WARMUP_TICKS = 8  # latents replayed into a new vocoder replica (covers its receptive field)
CLOSED = "the client closed its side and everything it sent was heard"
STORE_DEGRADED = ("session store unavailable: the call goes on, but it cannot be resumed or moved to another "
                  "replica until the store is back")


@dataclass
class CallState:
    """What a call is, across its ticks and resumes: what the store keeps and the gateway's copy."""

    session_id: str
    owner: str
    cc: CallConfig
    tick: int = 0
    history: list[bytes] = field(default_factory=list)  # serialized backbone HistoryRecords
    latents: list[list[float]] = field(default_factory=list)  # recent agent latents (vocoder warm-up)
    positions: int = 0  # context used: ticks and text tokens in the backbone's KV cache
    text_queue: deque = field(default_factory=deque)  # text tokens accepted, not yet prefilled
    pending_transcript: list = field(default_factory=list)  # accepted text, for the store's transcript
    timeline: AgentTimeline = field(default_factory=AgentTimeline)
    user_turn_text: str = ""
    user_interim: str = ""  # the listen source's last interim guess, as sent
    agent_reply_text: str = ""
    first_audio_s: float | None = None
    resume_token: str = ""
    store_degraded: bool = False
    end_reason: int = pb.END_REASON_UNSPECIFIED
    end_detail: str = ""

    @property
    def config(self) -> pb.ConverseConfig:
        return self.cc.config

    def end(self, reason: int, detail: str) -> None:
        self.end_reason, self.end_detail = reason, detail


@dataclass
class TickWork:
    """One tick as it passes from stage to stage, and when each stage started (for the log of a
    missed deadline)."""

    start: float
    user: listen_pb2.EncodeResponse | None = None  # None: no listen frame in time, the tick hears silence
    step: backbone_pb2.StepResponse | None = None
    audio: np.ndarray | None = None  # agent audio at the output rate
    audible: bool = False
    update: TurnUpdate | None = None
    t_backbone: float = 0.0
    t_vocoder: float = 0.0
    t_rest: float = 0.0


def cut_turn(timeline: AgentTimeline, event: Event, cut_samples: int) -> Event:
    """A turn event's effect on the agent timeline. A barge-in cuts the agent's turn and reports
    what of it was played (the client's PlaybackMark, else what was sent) and the agent text that
    went with those samples; the agent's turn starting starts the timeline's turn."""
    if isinstance(event, BargeIn):
        cut = timeline.cut()
        return BargeIn(agent_samples_played=cut.played_samples, agent_samples_cut=cut_samples,
                       heard_text=cut.heard_text, playback_confirmed=cut.confirmed, cut_sample=cut.cut_sample)
    if event == TurnStart("agent"):
        timeline.start_turn()
    return event


class Call:
    """A call with its stage links open: its inbox, turn manager, VAD, jitter buffer and output
    resampler, and the loops that run it (see the module's docstring)."""

    def __init__(self, gateway, state: CallState, links: tuple[StageLink, StageLink, StageLink], requests, log_):
        self.gw, self.state, self.log, self.links = gateway, state, log_, links
        self.listen, self.backbone, self.vocoder = links
        cc, limits = state.cc, gateway.limits
        self.cc, self.cfg, self.limits = cc, state.config, limits
        self.inbox = CallInbox(cc.in_encoding, limits)
        self.reader = asyncio.create_task(self.inbox.read(requests))
        self.frames: asyncio.Queue = asyncio.Queue()
        self.listen_reader = asyncio.create_task(read_listen(self.listen, self.frames))
        self.turns = TurnManager(TurnSettings(full_duplex=self.cfg.turn.policy != pb.HALF_DUPLEX,
                                              barge_in_min_speech_ms=cc.barge_in_min_speech_ms,
                                              end_of_turn_silence_ms=cc.end_of_turn_silence_ms))
        self.vad = StreamingVAD(cc.in_rate)
        self.jitter = JitterBuffer(cc.in_rate, limits.max_audio_backlog_s)
        self.out_resampler = StreamingResampler(SAMPLE_RATE_HZ, cc.out_rate)
        self.in_frame, self.out_frame = cc.in_rate * FRAME_SAMPLES // SAMPLE_RATE_HZ, out_frame(cc.out_rate)
        self.start_ticks, self.text_only = state.tick, self.cfg.mode == pb.TEXT_ONLY
        self.silence_latent = [0.0] * gateway.latent_dim
        self.forced: list[int] = []
        self.max_ticks = 0
        self.started_at = self.deadline = 0.0

    def started(self) -> pb.ConverseResponse:
        s = self.state
        return pb.ConverseResponse(started=pb.SessionStarted(
            session_id=s.session_id, resume_token=s.resume_token, resumed=self.cc.resuming, tick=s.tick,
            trained_weights=self.gw.trained, start_sample=s.timeline.position))

    def setup(self) -> None:
        """The mode's start: the system text queued, TTS's forced text and its tick budget."""
        cfg, cc = self.cfg, self.cc
        if cfg.system_text and not cc.resuming:
            refused = self.accept_text("system", cfg.system_text)
            if refused:
                raise BadRequest(f"system_text: {refused.message}")
        self.forced = self.gw.tokenizer.encode(cfg.text) if cfg.mode == pb.TTS and not cc.resuming else []
        # TTS without a limit: room for every forced token at the slowest pace, then a pause
        self.max_ticks = cfg.max_ticks or (tts_max_ticks(len(self.forced)) if cfg.mode == pb.TTS else 0)
        self.started_at = time.perf_counter()
        self.deadline = time.monotonic()

    def close(self) -> None:
        self.reader.cancel()
        self.listen_reader.cancel()
        for link in self.links:
            link.cancel()

    # ---- the loops ---------------------------------------------------------------------------------
    async def run_ticks(self):
        """The audio modes: one tick every 80 ms until the call ends."""
        inbox = self.inbox
        while not self.ending(self.max_ticks):
            _raise_client_error(self.reader)
            for r in self.intake():
                yield r
            await self.prefill(self.limits.text_tokens_per_tick)
            async for r in self.tick():
                yield r
            if inbox.closed and not inbox.has_input() and not self.jitter.pending and not self.max_ticks:
                self.end_on_close()
                break
        if self.cfg.mode == pb.TTS and self.state.end_reason in (pb.MAX_TICKS, pb.TTS_DONE):
            yield response(ReplyDone(self.state.agent_reply_text), self.state.tick)

    async def run_text_only(self):
        """TEXT_ONLY: no ticks and no audio. The caller's text is prefilled as it comes, and each
        user text that wants a reply gets the backbone's text reply, then ReplyDone."""
        inbox, state = self.inbox, self.state
        while not self.ending(self.max_ticks):
            _raise_client_error(self.reader)
            for r in self.intake():
                yield r
            await self.prefill(None)
            if inbox.wants_reply and not state.text_queue:
                inbox.wants_reply = False
                reply = await self.generate_text()
                yield pb.ConverseResponse(agent_text=pb.AgentText(text=reply, tick=state.tick))
                yield response(ReplyDone(reply), state.tick)
                continue
            await inbox.wait(0.05)
            if inbox.closed and not inbox.has_input() and not state.text_queue and not inbox.wants_reply:
                self.end_on_close()
                break

    def end_on_close(self) -> None:
        """The client closed its side: the stream ended on bad input (raised), or cleanly."""
        _raise_client_error(self.reader)
        self.ending(0) or self.state.end(pb.CLIENT_CLOSED, CLOSED)

    def ending(self, max_ticks: int) -> bool:
        """Whether the call ends before this tick, and why (set on the call)."""
        call, cfg, limits, budget = self.state, self.cfg, self.limits, self.gw.context_positions
        if self.inbox.ended:
            call.end(pb.CLIENT_END_CALL, "the client sent END_CALL")
        elif max_ticks and call.tick - self.start_ticks >= max_ticks:
            if cfg.mode == pb.TTS and not cfg.max_ticks:
                call.end(pb.TTS_DONE, "all the text was spoken")
            else:
                call.end(pb.MAX_TICKS, f"max_ticks ({max_ticks}) reached")
        elif call.positions >= budget:
            call.end(pb.CONTEXT_FULL, f"the call's context budget of {budget} positions (ticks "
                                      "and text tokens) is used up (--context-positions); start a new call")
        elif cfg.mode != pb.TTS and self.inbox.idle_s() > limits.idle_timeout_s:
            call.end(pb.IDLE_TIMEOUT, f"no audio, text or control from the client for "
                                      f"{limits.idle_timeout_s:g} s (--idle-timeout-s)")
        return call.end_reason != pb.END_REASON_UNSPECIFIED

    def intake(self) -> list[pb.ConverseResponse]:
        """What the client sent since the last tick: its refusals as Error events, its audio into
        the jitter buffer, its text queued for prefill (or refused)."""
        tick = self.state.tick
        out = [response(Error(code, message), tick) for code, message in self.inbox.take_errors()]
        dropped = self.jitter.extend(self.inbox.take_audio())
        if dropped:
            out.append(response(Error(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"dropped {dropped} samples ({dropped / self.cc.in_rate:.2f} s) of the oldest audio: it "
                f"arrived more than {self.limits.max_audio_backlog_s:g} s ahead of real time "
                "(--max-audio-backlog-s)"), tick))
        for role, text in self.inbox.take_text():
            refused = self.accept_text(role, text)
            if refused:
                out.append(response(refused, tick))
        return out

    # ---- one tick: hear -> think -> speak -> gate -> record ----------------------------------------
    async def tick(self):
        """One 80 ms tick, stage by stage; its responses as they are ready."""
        work = TickWork(start=time.perf_counter())
        await self.hear(work)
        await self.think(work)
        await self.speak(work)
        async for r in self.gate(work):
            yield r
        async for r in self.record(work):
            yield r

    async def hear(self, work: TickWork) -> None:
        """The caller's audio for this tick: jitter buffer -> listen stage and VAD; the listen
        stage's frame, if it comes within `listen_wait_s`."""
        s = self.gw.settings
        pcm = self.jitter.take(self.in_frame)
        try:
            await self.listen.write(listen_pb2.EncodeRequest(pcm=encode(pcm, Encoding.LINEAR16)))
        except Exception as e:  # noqa: BLE001 - a broken listen stream; its reader reopens it
            self.log.warning("listen_write_failed", tick=self.state.tick, error=str(e)[:200])
        self.vad.push(pcm)
        try:
            user = await asyncio.wait_for(self.frames.get(), s.listen_wait_s if s.realtime else s.stage_timeout_s)
        except asyncio.TimeoutError:
            user = None
        if isinstance(user, Exception):
            raise StageUnavailable(f"listen stage failed: {user}")
        work.user = user

    async def think(self, work: TickWork) -> None:
        """The backbone's step for this tick (TTS's forced text goes with the first; in
        AUDIO_CONTINUATION the caller's audio is the agent's voice prompt)."""
        state, user, silence = self.state, work.user, self.silence_latent
        tick_req = backbone_pb2.Tick(tick=state.tick, user_latent=list(user.latent) if user is not None else silence,
                                     user_tokens=list(user.tokens) if user is not None else [])
        if self.forced:
            tick_req.forced_text.extend(self.forced)
            self.forced = []
        if self.cfg.mode == pb.AUDIO_CONTINUATION and user is not None and self.jitter.had_audio:
            tick_req.forced_latent.extend(user.latent)
            tick_req.user_latent[:] = silence
        work.t_backbone = time.perf_counter()
        work.step = await self.backbone.request(backbone_pb2.StepRequest(tick=tick_req))
        work.t_vocoder = time.perf_counter()
        record = work.step.tick
        state.positions += 1
        state.history.append(backbone_pb2.HistoryRecord(tick=record).SerializeToString())
        state.latents = (state.latents + [list(record.agent_latent)])[-VOCODER_WARMUP_TICKS:]

    async def speak(self, work: TickWork) -> None:
        """The vocoder's audio for this tick, resampled to the caller's output rate, and whether the
        agent said anything (audible audio or text)."""
        step = work.step
        decoded = await self.vocoder.request(vocoder_pb2.DecodeRequest(
            latent=vocoder_pb2.Latent(tick=self.state.tick, values=step.tick.agent_latent)))
        work.t_rest = time.perf_counter()
        audio24 = np.frombuffer(decoded.pcm, dtype="<f4")
        work.audible = bool(step.agent_text.strip()) or float(np.sqrt(np.mean(audio24 ** 2))) > 1e-3
        audio = self.out_resampler.push(audio24)
        if self.state.tick == self.start_ticks and len(audio) < self.out_frame:  # the resampler's delay, as
            # silence: every tick is then exactly out_frame samples on the timeline
            audio = np.concatenate([np.zeros(self.out_frame - len(audio), np.float32), audio])
        work.audio = audio

    async def gate(self, work: TickWork):
        """The turn manager: who holds the floor, its events (a barge-in cuts the agent timeline
        and is marked in the store), and the agent's audio sent or muted."""
        state, inbox = self.state, self.inbox
        if inbox.played is not None:  # here, just before a cut may need it: a mark sent before an
            # INTERRUPT_AGENT is always applied before that interrupt
            state.timeline.mark_played(inbox.played)
            inbox.played = None
        work.update = self.turns.update(self.vad.in_speech, self.vad.speech_ms, work.audible,
                                        interrupt=inbox.take_interrupt())
        for event in work.update.events:
            event = cut_turn(state.timeline, event, len(work.audio))
            if event == TurnStart("agent"):
                state.agent_reply_text = ""
            if isinstance(event, BargeIn):
                await self.mark_cut_off(_tick_end_ms(state.tick), event.agent_samples_played)
            yield response(event, state.tick)
        sent = work.update.send_agent_audio and len(work.audio) > 0
        start_sample = state.timeline.produce(len(work.audio), work.step.agent_text, sent)
        state.agent_reply_text += work.step.agent_text
        if sent:
            yield pb.ConverseResponse(audio=pb.AgentAudio(
                audio=encode(work.audio, self.cc.out_encoding), tick=state.tick, start_sample=start_sample))
            if state.first_audio_s is None:
                state.first_audio_s = time.perf_counter() - self.started_at
                FIRST_AUDIO_SECONDS.observe(state.first_audio_s)
                self.log.info("first_audio", tick=state.tick, ms=round(state.first_audio_s * 1e3, 1))

    async def record(self, work: TickWork):
        """The tick's text out (agent text; the user's transcript, final at the end of their
        turn), its one store write, metrics, and the real-time pace."""
        state, step = self.state, work.step
        now_ms = _tick_end_ms(state.tick)
        user_text = work.user.text if work.user is not None else ""
        state.user_turn_text += user_text
        entries = []
        if step.agent_text:
            yield pb.ConverseResponse(agent_text=pb.AgentText(text=step.agent_text, tick=state.tick))
            entries.append(TranscriptEntry("agent", step.agent_text, now_ms - TICK_MS, now_ms,
                                           cut_off=not work.update.send_agent_audio))
        interim = work.user.interim if work.user is not None else state.user_interim
        if user_text or interim != state.user_interim:
            yield pb.ConverseResponse(transcript=pb.UserTranscript(text=user_text, tick=state.tick, interim=interim))
            state.user_interim = interim
        if user_text:
            entries.append(TranscriptEntry("user", user_text, now_ms - TICK_MS, now_ms))
        if TurnEnd("user") in work.update.events:
            yield pb.ConverseResponse(transcript=pb.UserTranscript(
                text=state.user_turn_text, tick=state.tick, is_final=True))
            state.user_turn_text = ""
        if not await self.record_tick(entries) and not state.store_degraded:
            state.store_degraded = True  # say it once: the call goes on, its record does not
            yield response(Error(grpc.StatusCode.UNAVAILABLE, STORE_DEGRADED), state.tick)
        TICK_SECONDS.labels("gateway").observe(time.perf_counter() - work.start)
        state.tick += 1
        if self.gw.settings.realtime:
            await self.pace(work)

    async def pace(self, work: TickWork) -> None:
        """Sleep to the next tick's deadline. A missed deadline is logged with each stage's time,
        and not caught up."""
        self.deadline = self.next_deadline(self.deadline, self.state.tick == self.start_ticks + 1)
        delay = self.deadline - time.monotonic()
        if delay < 0:
            MISSED_TICKS.inc()
            self.log.warning("tick_deadline_missed", tick=self.state.tick, late_ms=round(-delay * 1e3, 1),
                             listen_ms=round((work.t_backbone - work.start) * 1e3, 1),
                             backbone_ms=round((work.t_vocoder - work.t_backbone) * 1e3, 1),
                             vocoder_ms=round((work.t_rest - work.t_vocoder) * 1e3, 1),
                             rest_ms=round((time.perf_counter() - work.t_rest) * 1e3, 1))
            self.deadline = self.next_deadline(time.monotonic(), True)  # no catching up
        await asyncio.sleep(max(0.0, self.deadline - time.monotonic()))

    def next_deadline(self, previous: float, snap: bool) -> float:
        """The next tick. With `align_ticks`, every call ticks on one shared 80 ms grid (after its
        first tick, which goes at once for the lowest first-audio latency), so the ticks of all
        calls reach the backbone together and run as one batched forward."""
        if snap and self.gw.settings.align_ticks:
            return math.ceil(max(previous, time.monotonic()) / TICK_S) * TICK_S
        return previous + TICK_S

    # ---- text and the store ------------------------------------------------------------------------
    def accept_text(self, role: str, text: str) -> Error | None:
        """Queue text for prefill (in slices between ticks) if it fits the call's context budget;
        otherwise the refusal to send (the policy when the context is full: refuse new text)."""
        call, budget = self.state, self.gw.context_positions
        tokens = text_insertion(self.gw.tokenizer, self.gw.vocab, text, role)
        used = call.positions + len(call.text_queue)
        if used + len(tokens) > budget:
            return Error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{role} text of {len(tokens)} tokens does not fit the call's context budget: {used} of "
                         f"{budget} positions used (--context-positions); the text was not used")
        call.text_queue.extend(tokens)
        now_ms = _tick_ms(call.tick)
        call.pending_transcript.append(TranscriptEntry(role, text, now_ms, now_ms))
        return None

    async def prefill(self, limit: int | None) -> None:
        """Prefill queued text, at most `limit` tokens before this tick (None: all of it). Each
        slice is its own history record, so a replica rebuilt from the history replays the same
        positions in the same order."""
        call, per_tick = self.state, self.limits.text_tokens_per_tick
        budget = len(call.text_queue) if limit is None else min(limit, len(call.text_queue))
        records = []
        while budget > 0:
            size = min(budget, per_tick)
            insert = backbone_pb2.TextInsert(tokens=[call.text_queue.popleft() for _ in range(size)])
            budget -= size
            call.positions += size
            record = backbone_pb2.HistoryRecord(text=insert).SerializeToString()
            call.history.append(record)  # first: a replica rebuilt after a failed write replays it
            records.append(record)
            try:
                await self.backbone.write(backbone_pb2.StepRequest(text=insert))
            except Exception as e:  # noqa: BLE001 - the next request fails over and replays the insert
                log.warning("text_insert_deferred", session_id=call.session_id, error=str(e)[:200])
        entries, call.pending_transcript = call.pending_transcript, []
        if not records and not entries:
            return

        async def write() -> None:
            await self.gw.store.append_history(call.session_id, records, owner=call.owner)
            await self.gw.store.append_transcript(call.session_id, entries, owner=call.owner)

        await self.store_write(write())

    async def generate_text(self) -> str:
        response_ = await self.backbone.request(
            backbone_pb2.StepRequest(generate=backbone_pb2.GenerateText(max_tokens=64)))
        self.state.positions += len(response_.generated.tokens) + 1  # the reply's start, then its tokens
        return response_.agent_text

    async def mark_cut_off(self, now_ms: int, heard_samples: int) -> None:
        call = self.state
        await self.store_write(self.gw.store.mark_cut_off(call.session_id, now_ms, heard_samples, owner=call.owner))

    async def record_tick(self, entries: list) -> bool:
        """One atomic store update per tick; False when the store failed."""
        call = self.state
        return await self.store_write(
            self.gw.store.append_tick(call.session_id, [call.history[-1]], entries, call.tick, owner=call.owner))

    async def store_write(self, write: Awaitable[None]) -> bool:
        """Await a store write; False, logged, when the store failed: the call goes on, and the
        gateway keeps its own copy of the history."""
        try:
            await write
            return True
        except SessionStoreError as e:
            self.log.warning("store_write_failed", tick=self.state.tick, error=str(e))
            return False


async def read_listen(link: StageLink, frames: asyncio.Queue) -> None:
    """Listen results arrive as frames complete; a broken listen stream is reopened (fresh)."""
    while True:
        try:
            response_ = await link.call.read()
            if response_ is grpc.aio.EOF:
                raise StageUnavailable("listen stage ended the stream")
            await frames.put(response_)
        except Exception as e:  # noqa: BLE001 - any failure of the stream: reopen it
            try:
                await link.open(rebuild=True)
            except StageUnavailable as e2:
                await frames.put(e2)
                return
            log.warning("listen_reopened", error=str(e)[:200])


def _raise_client_error(reader: asyncio.Task) -> None:
    """What went wrong reading the client's stream (bad audio...), if it has."""
    if reader.done() and not reader.cancelled() and reader.exception():
        raise reader.exception()


def _tick_ms(tick: int) -> int:
    """Where a tick starts on the call's clock, in ms."""
    return tick * TICK_MS


def _tick_end_ms(tick: int) -> int:
    return _tick_ms(tick + 1)


def out_frame(rate_hz: int) -> int:
    """Agent samples per tick at the output rate."""
    return rate_hz * FRAME_SAMPLES // SAMPLE_RATE_HZ
