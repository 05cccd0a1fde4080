"""Gateway: the public `Converse` API. It owns each call: admission, the strict contract
(contract.py), real-time pacing (one tick per 80 ms), a jitter buffer for the caller's audio, turn
management, the agent timeline (timeline.py), the stage streams (with failover) and the session
record in the store (Redis or in-process)."""
from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import grpc
import numpy as np
import structlog

from michi.audio.io import AudioError
from michi.audio.pcm import Encoding, encode
from michi.audio.resample import StreamingResampler
from michi.audio.vad import StreamingVAD
from michi.proto.backbone.v1 import backbone_pb2, backbone_pb2_grpc
from michi.proto.gateway.v1 import gateway_pb2 as pb
from michi.proto.listen.v1 import listen_pb2, listen_pb2_grpc
from michi.proto.vocoder.v1 import vocoder_pb2, vocoder_pb2_grpc
from michi.serving.admission import Admission, refuse, retry_metadata
from michi.serving.metrics import FIRST_AUDIO_SECONDS, LIVE_SESSIONS, MISSED_TICKS, TICK_SECONDS
from michi.session.store import SessionStore, SessionStoreError, StoreUnavailable, TranscriptEntry

from .contract import BadRequest, CallConfig, Limits, capabilities, parse_config, public_token
from .inbox import CallInbox, parse_request, request_kind
from .jitter import JitterBuffer
from .stages import Channels, StageFull, StageLink, StageUnavailable
from .timeline import AgentTimeline
from .turns import TurnManager, TurnSettings

log = structlog.get_logger()
TICK_S = 0.080
MODEL_RATE_HZ = 24_000
FRAME = 1920
VOCODER_WARMUP_TICKS = 8  # latents replayed into a new vocoder replica (covers its receptive field)
CLOSED = "the client closed its side and everything it sent was heard"


@dataclass
class GatewaySettings:
    listen: list[str]
    backbone: list[str]
    vocoder: list[str]
    lease_s: float = 10.0
    stage_timeout_s: float = 5.0
    listen_wait_s: float = 0.03  # how long a tick waits for the caller's frame before using silence
    realtime: bool = True  # False: ticks as fast as the stages answer (offline jobs, tests)
    align_ticks: bool = True  # all calls on one 80 ms grid, so the backbone can batch them
    limits: Limits = field(default_factory=Limits)


@dataclass
class CallState:
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


def add_to_server(servicer: "GatewayServicer", server) -> None:
    """Register the Gateway service with a request parser that turns corrupt bytes into a value
    the servicer answers with INVALID_ARGUMENT (grpc's own would fail the call as UNKNOWN)."""
    def capabilities_request(raw: bytes) -> pb.GetCapabilitiesRequest:
        try:
            return pb.GetCapabilitiesRequest.FromString(raw)
        except Exception:  # noqa: BLE001 - it has no fields to get wrong
            return pb.GetCapabilitiesRequest()

    handlers = {
        "Converse": grpc.stream_stream_rpc_method_handler(
            servicer.Converse, request_deserializer=parse_request,
            response_serializer=pb.ConverseResponse.SerializeToString),
        "GetCapabilities": grpc.unary_unary_rpc_method_handler(
            servicer.GetCapabilities, request_deserializer=capabilities_request,
            response_serializer=pb.Capabilities.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("michi.gateway.v1.Gateway", handlers),))


class GatewayServicer:
    def __init__(self, settings: GatewaySettings, store: SessionStore, tokenizer, vocab, latent_dim: int,
                 auth_token: str | None = None, context_positions: int = 4096):
        self.settings, self.store, self.auth_token = settings, store, auth_token
        self.limits = settings.limits
        self.context_positions = settings.limits.context_positions or context_positions
        self.tokenizer, self.vocab, self.latent_dim = tokenizer, vocab, latent_dim
        self.channels = Channels()
        self.admission = Admission("gateway", settings.limits.max_calls)
        self.trained = False  # what the backbone stage reports of its weights

    async def GetCapabilities(self, request, context) -> pb.Capabilities:
        return capabilities(self.limits, self.context_positions, self.admission.live, self.trained,
                            bool(self.auth_token))

    async def Converse(self, request_iterator, context):
        requests = aiter(request_iterator)
        try:  # read before any refusal: aborting a stream whose first message is still in flight
            # can surface as INTERNAL instead of the real status
            first = await asyncio.wait_for(anext(requests, None), self.limits.config_timeout_s)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no `config` within {self.limits.config_timeout_s:g} s of opening the stream "
                                "(--config-timeout-s)")
        if self.auth_token and dict(context.invocation_metadata() or ()).get("authorization") != f"Bearer {self.auth_token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        try:
            if first is None or request_kind(first) != "config":
                raise BadRequest("the first message of a Converse stream must be `config`")
            cc = parse_config(first.config, self.limits)
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not self.admission.try_admit():
            log.warning("call_refused", reason="capacity", live=self.admission.live)
            await refuse(context, self.admission)
        try:
            async for response in self._converse(cc, requests, context):
                yield response
        finally:
            self.admission.release()

    async def _converse(self, cc: CallConfig, requests, context):
        call = await self._start_session(cc, context)
        bound = log.bind(session_id=call.session_id)
        LIVE_SESSIONS.labels("gateway").inc()
        error = None
        renewer = asyncio.create_task(self._renew_lease(call, bound))
        try:
            async for response in self._run_call(call, requests, context, bound):
                yield response
        except StageFull as e:
            bound.warning("call_refused", reason="stage_full", error=str(e))
            call.end(pb.STAGE_FAILED, str(e))
            error = (grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_metadata())
        except StageUnavailable as e:
            bound.error("call_failed", error=str(e))
            call.end(pb.STAGE_FAILED, str(e))
            error = (grpc.StatusCode.UNAVAILABLE, str(e), ())
        except (AudioError, BadRequest) as e:  # garbage from the client: say what, keep what was said so far
            bound.warning("bad_client_input", error=str(e))
            call.end(pb.BAD_INPUT, str(e))
            error = (grpc.StatusCode.INVALID_ARGUMENT, str(e), ())
        finally:  # before the status goes out: a client told the call is over may resume it at once
            renewer.cancel()
            LIVE_SESSIONS.labels("gateway").dec()
            try:
                if call.end_reason == pb.CLIENT_END_CALL:
                    await self.store.end(call.session_id, call.owner)
                await self.store.release(call.session_id, call.owner)
            except SessionStoreError:
                pass
            bound.info("call_ended", ticks=call.tick, reason=pb.EndReason.Name(call.end_reason),
                       agent_samples_sent=call.timeline.sent_until)
        yield pb.ConverseResponse(ended=pb.CallEnded(reason=call.end_reason, detail=call.end_detail, ticks=call.tick,
                                                     agent_samples=call.timeline.position))
        if error:
            await context.abort(error[0], error[1], trailing_metadata=error[2])

    async def _start_session(self, cc: CallConfig, context) -> CallState:
        session_id = cc.session_id or uuid.uuid4().hex
        owner = uuid.uuid4().hex
        config = cc.config
        stored = {"mode": int(config.mode), "system_text": config.system_text, "text": config.text}
        try:
            if cc.resuming:
                record = await self.store.claim(session_id, owner, self.settings.lease_s, cc.resume_secret)
                call = CallState(session_id, owner, cc, tick=record.last_tick + 1)
                call.history = await self.store.history(session_id)
                call.positions = sum(_positions(r) for r in call.history)
            else:
                secret = await self.store.create(session_id, stored)
                await self.store.claim(session_id, owner, self.settings.lease_s, secret)
                call = CallState(session_id, owner, cc)
            call.resume_token = config.resume_token or public_token(session_id, secret)
        except StoreUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {e}")
        except SessionStoreError as e:
            await context.abort(getattr(grpc.StatusCode, e.grpc_status), str(e))
        call.timeline = AgentTimeline.resumed_at(call.tick, _out_frame(cc.out_rate))
        return call

    async def _renew_lease(self, call: CallState, log_) -> None:
        """The lease is renewed on the wall clock, a third of its length apart, whatever the ticks
        do: a call slowed by load keeps its lease."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                await self.store.renew(call.session_id, call.owner, self.settings.lease_s)
            except SessionStoreError as e:
                log_.warning("lease_renew_failed", error=str(e))

    # ---- the call -----------------------------------------------------------------------------------
    async def _run_call(self, call: CallState, requests, context, log_):
        s, cc, cfg = self.settings, call.cc, call.config
        links = await self._open_stages(call, cc.in_rate)
        listen, backbone, vocoder = links
        inbox = CallInbox(cc.in_encoding, self.limits)
        reader = asyncio.create_task(inbox.read(requests))
        frames: asyncio.Queue = asyncio.Queue()
        listen_reader = asyncio.create_task(self._read_listen(listen, frames))
        try:
            yield pb.ConverseResponse(started=pb.SessionStarted(
                session_id=call.session_id, resume_token=call.resume_token, resumed=cc.resuming, tick=call.tick,
                trained_weights=self.trained, start_sample=call.timeline.position))
            turns = TurnManager(TurnSettings(full_duplex=cfg.turn.policy != pb.HALF_DUPLEX,
                                             barge_in_min_speech_ms=cc.barge_in_min_speech_ms,
                                             end_of_turn_silence_ms=cc.end_of_turn_silence_ms))
            vad = StreamingVAD(cc.in_rate)
            jitter = JitterBuffer(cc.in_rate, self.limits.max_audio_backlog_s)
            out_resampler = StreamingResampler(MODEL_RATE_HZ, cc.out_rate)
            in_frame, out_frame = cc.in_rate * FRAME // MODEL_RATE_HZ, _out_frame(cc.out_rate)
            start_ticks, text_only = call.tick, cfg.mode == pb.TEXT_ONLY
            if cfg.system_text and not cc.resuming:
                refused = self._accept_text(call, "system", cfg.system_text)
                if refused:
                    raise BadRequest(f"system_text: {refused[1]}")
            forced = self.tokenizer.encode(cfg.text) if cfg.mode == pb.TTS and not cc.resuming else []
            # TTS without a limit: room for every forced token at the slowest pace, then a pause
            max_ticks = cfg.max_ticks or (3 * len(forced) + 12 if cfg.mode == pb.TTS else 0)
            silence_latent = [0.0] * self.latent_dim
            started = time.perf_counter()
            next_deadline = time.monotonic()
            while True:
                if self._ending(call, inbox, max_ticks, start_ticks):
                    break
                _raise_client_error(reader)
                for code, message in inbox.take_errors():
                    yield _error(call.tick, code, message)
                dropped = jitter.extend(inbox.take_audio())
                if dropped:
                    yield _error(call.tick, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"dropped {dropped} samples ({dropped / cc.in_rate:.2f} s) of the oldest audio: it "
                                 f"arrived more than {self.limits.max_audio_backlog_s:g} s ahead of real time "
                                 "(--max-audio-backlog-s)")
                for role, text in inbox.take_text():
                    refused = self._accept_text(call, role, text)
                    if refused:
                        yield _error(call.tick, *refused)
                await self._prefill_text(call, backbone, None if text_only else self.limits.text_tokens_per_tick)
                if text_only:
                    if inbox.wants_reply and not call.text_queue:
                        inbox.wants_reply = False
                        reply = await self._generate_text(call, backbone)
                        yield pb.ConverseResponse(agent_text=pb.AgentText(text=reply, tick=call.tick))
                        yield pb.ConverseResponse(event=pb.Event(tick=call.tick, reply_done=pb.Event.ReplyDone(text=reply)))
                        continue
                    await inbox.wait(0.05)
                    if inbox.closed and not inbox.has_input() and not call.text_queue and not inbox.wants_reply:
                        _raise_client_error(reader)
                        self._ending(call, inbox, 0, start_ticks) or call.end(pb.CLIENT_CLOSED, CLOSED)
                        break
                    continue
                tick_start = time.perf_counter()
                # the caller's audio for this tick: jitter buffer -> listen stage and VAD
                pcm = jitter.take(in_frame)
                try:
                    await listen.write(listen_pb2.EncodeRequest(pcm=encode(pcm, Encoding.LINEAR16)))
                except Exception as e:  # noqa: BLE001 - a broken listen stream; its reader reopens it
                    log_.warning("listen_write_failed", tick=call.tick, error=str(e)[:200])
                vad.push(pcm)
                try:
                    user = await asyncio.wait_for(frames.get(), s.listen_wait_s if s.realtime else s.stage_timeout_s)
                except asyncio.TimeoutError:
                    user = None
                if isinstance(user, Exception):
                    raise StageUnavailable(f"listen stage failed: {user}")
                user_latent = list(user.latent) if user is not None else silence_latent
                user_tokens = list(user.tokens) if user is not None else []
                tick_req = backbone_pb2.Tick(tick=call.tick, user_latent=user_latent, user_tokens=user_tokens)
                if forced:
                    tick_req.forced_text.extend(forced)
                    forced = []
                if cfg.mode == pb.AUDIO_CONTINUATION and user is not None and jitter.had_audio:
                    tick_req.forced_latent.extend(user.latent)  # the caller's audio is the agent's voice prompt
                    tick_req.user_latent[:] = silence_latent
                t_backbone = time.perf_counter()
                step = await backbone.request(backbone_pb2.StepRequest(tick=tick_req))
                t_vocoder = time.perf_counter()
                record = step.tick
                call.positions += 1
                call.history.append(backbone_pb2.HistoryRecord(tick=record).SerializeToString())
                call.latents = (call.latents + [list(record.agent_latent)])[-VOCODER_WARMUP_TICKS:]
                decoded = await vocoder.request(vocoder_pb2.DecodeRequest(
                    latent=vocoder_pb2.Latent(tick=call.tick, values=record.agent_latent)))
                t_rest = time.perf_counter()
                audio24 = np.frombuffer(decoded.pcm, dtype="<f4")
                agent_audible = bool(step.agent_text.strip()) or float(np.sqrt(np.mean(audio24 ** 2))) > 1e-3
                if inbox.played is not None:  # here, just before a cut may need it: a mark sent before an
                    # INTERRUPT_AGENT is always applied before that interrupt
                    call.timeline.mark_played(inbox.played)
                    inbox.played = None
                update = turns.update(vad.in_speech, vad.speech_ms, agent_audible, interrupt=inbox.take_interrupt())
                audio_out = out_resampler.push(audio24)
                if call.tick == start_ticks and len(audio_out) < out_frame:  # the resampler's delay, as
                    # silence: every tick is then exactly out_frame samples on the timeline
                    audio_out = np.concatenate([np.zeros(out_frame - len(audio_out), np.float32), audio_out])
                now_ms = int((call.tick + 1) * TICK_S * 1000)
                user_text = user.text if user is not None else ""
                call.user_turn_text += user_text
                for response in self._turn_events(call, update.events, len(audio_out)):
                    if response.event.HasField("barge_in"):
                        await self._mark_cut_off(call, now_ms, response.event.barge_in.agent_samples_played, log_)
                    yield response
                sent = update.send_agent_audio and len(audio_out) > 0
                start_sample = call.timeline.produce(len(audio_out), step.agent_text, sent)
                call.agent_reply_text += step.agent_text
                entries = []
                if sent:
                    yield pb.ConverseResponse(audio=pb.AgentAudio(
                        audio=encode(audio_out, cc.out_encoding), tick=call.tick, start_sample=start_sample))
                    if call.first_audio_s is None:
                        call.first_audio_s = time.perf_counter() - started
                        FIRST_AUDIO_SECONDS.observe(call.first_audio_s)
                        log_.info("first_audio", tick=call.tick, ms=round(call.first_audio_s * 1e3, 1))
                if step.agent_text:
                    yield pb.ConverseResponse(agent_text=pb.AgentText(text=step.agent_text, tick=call.tick))
                    entries.append(TranscriptEntry("agent", step.agent_text, now_ms - 80, now_ms,
                                                   cut_off=not update.send_agent_audio))
                if user_text:
                    yield pb.ConverseResponse(transcript=pb.UserTranscript(text=user_text, tick=call.tick))
                    entries.append(TranscriptEntry("user", user_text, now_ms - 80, now_ms))
                if ("turn_end", "user") in update.events:
                    yield pb.ConverseResponse(transcript=pb.UserTranscript(
                        text=call.user_turn_text, tick=call.tick, is_final=True))
                    call.user_turn_text = ""
                if not await self._record_tick(call, entries, log_) and not call.store_degraded:
                    call.store_degraded = True  # say it once: the call goes on, its record does not
                    yield _error(call.tick, grpc.StatusCode.UNAVAILABLE,
                                 "session store unavailable: the call goes on, but it cannot be resumed "
                                 "or moved to another replica until the store is back")
                TICK_SECONDS.labels("gateway").observe(time.perf_counter() - tick_start)
                call.tick += 1
                if s.realtime:
                    next_deadline = self._next_deadline(next_deadline, call.tick == start_ticks + 1)
                    delay = next_deadline - time.monotonic()
                    if delay < 0:
                        MISSED_TICKS.inc()
                        log_.warning("tick_deadline_missed", tick=call.tick, late_ms=round(-delay * 1e3, 1),
                                     listen_ms=round((t_backbone - tick_start) * 1e3, 1),
                                     backbone_ms=round((t_vocoder - t_backbone) * 1e3, 1),
                                     vocoder_ms=round((t_rest - t_vocoder) * 1e3, 1),
                                     rest_ms=round((time.perf_counter() - t_rest) * 1e3, 1))
                        next_deadline = self._next_deadline(time.monotonic(), True)  # no catching up
                    await asyncio.sleep(max(0.0, next_deadline - time.monotonic()))
                if inbox.closed and not inbox.has_input() and not jitter.pending and not max_ticks:
                    _raise_client_error(reader)  # the stream ended on bad input, or cleanly:
                    self._ending(call, inbox, 0, start_ticks) or call.end(pb.CLIENT_CLOSED, CLOSED)
                    break
            if cfg.mode == pb.TTS and call.end_reason in (pb.MAX_TICKS, pb.TTS_DONE):
                yield pb.ConverseResponse(event=pb.Event(tick=call.tick, reply_done=pb.Event.ReplyDone(
                    text=call.agent_reply_text)))
        finally:
            reader.cancel()
            listen_reader.cancel()
            for link in links:
                link.cancel()

    def _ending(self, call: CallState, inbox: CallInbox, max_ticks: int, start_ticks: int) -> bool:
        """Whether the call ends before this tick, and why (set on the call)."""
        cfg = call.config
        if inbox.ended:
            call.end(pb.CLIENT_END_CALL, "the client sent END_CALL")
        elif max_ticks and call.tick - start_ticks >= max_ticks:
            if cfg.mode == pb.TTS and not cfg.max_ticks:
                call.end(pb.TTS_DONE, "all the text was spoken")
            else:
                call.end(pb.MAX_TICKS, f"max_ticks ({max_ticks}) reached")
        elif call.positions >= self.context_positions:
            call.end(pb.CONTEXT_FULL, f"the call's context budget of {self.context_positions} positions (ticks "
                                      "and text tokens) is used up (--context-positions); start a new call")
        elif cfg.mode != pb.TTS and inbox.idle_s() > self.limits.idle_timeout_s:
            call.end(pb.IDLE_TIMEOUT, f"no audio, text or control from the client for "
                                      f"{self.limits.idle_timeout_s:g} s (--idle-timeout-s)")
        return call.end_reason != pb.END_REASON_UNSPECIFIED

    def _turn_events(self, call: CallState, events: list[tuple], cut_samples: int) -> list[pb.ConverseResponse]:
        out = []
        for event in events:
            if event[0] == "barge_in":
                cut = call.timeline.cut()
                out.append(pb.ConverseResponse(event=pb.Event(tick=call.tick, barge_in=pb.Event.BargeIn(
                    agent_samples_played=cut.played_samples, agent_samples_cut=cut_samples,
                    heard_text=cut.heard_text, playback_confirmed=cut.confirmed, cut_sample=cut.cut_sample))))
                continue
            kind, speaker = event
            if kind == "turn_start" and speaker == "agent":
                call.timeline.start_turn()
                call.agent_reply_text = ""
            message = pb.Event.TurnStart(speaker=speaker) if kind == "turn_start" else pb.Event.TurnEnd(speaker=speaker)
            out.append(pb.ConverseResponse(event=pb.Event(tick=call.tick, **{kind: message})))
        return out

    def _next_deadline(self, previous: float, snap: bool) -> float:
        """The next tick. With `align_ticks`, every call ticks on one shared 80 ms grid (after its
        first tick, which goes at once for the lowest first-audio latency), so the ticks of all
        calls reach the backbone together and run as one batched forward."""
        if snap and self.settings.align_ticks:
            return math.ceil(max(previous, time.monotonic()) / TICK_S) * TICK_S
        return previous + TICK_S

    async def _open_stages(self, call: CallState, in_rate: int):
        s = self.settings

        async def open_listen(link, rebuild):
            await link.write(listen_pb2.EncodeRequest(start=listen_pb2.EncodeStart(
                session_id=call.session_id, sample_rate_hz=in_rate)))

        async def open_backbone(link, rebuild):
            history = call.history
            if rebuild:  # what the store has is the truth; fall back on the gateway's copy
                try:
                    history = await self.store.history(call.session_id) or call.history
                except SessionStoreError:
                    history = call.history
            records = [backbone_pb2.HistoryRecord.FromString(r) for r in history]
            await link.write(backbone_pb2.StepRequest(open=backbone_pb2.Open(
                session_id=call.session_id, seed=call.config.seed, history=records)))
            opened = await link.read()
            self.trained = opened.opened.trained_weights

        async def open_vocoder(link, rebuild):
            latents = call.latents
            if rebuild and not latents and call.history:
                recs = [backbone_pb2.HistoryRecord.FromString(r) for r in call.history[-VOCODER_WARMUP_TICKS:]]
                latents = [list(r.tick.agent_latent) for r in recs if r.WhichOneof("record") == "tick"]
            await link.write(vocoder_pb2.DecodeRequest(start=vocoder_pb2.DecodeStart(
                session_id=call.session_id,
                warmup=[vocoder_pb2.Latent(values=v) for v in latents])))

        links = (
            StageLink("listen", s.listen, self.channels, lambda ch: listen_pb2_grpc.ListenStub(ch).Encode,
                      open_listen, call.session_id, s.stage_timeout_s),
            StageLink("backbone", s.backbone, self.channels, lambda ch: backbone_pb2_grpc.BackboneStub(ch).Step,
                      open_backbone, call.session_id, s.stage_timeout_s),
            StageLink("vocoder", s.vocoder, self.channels, lambda ch: vocoder_pb2_grpc.VocoderStub(ch).Decode,
                      open_vocoder, call.session_id, s.stage_timeout_s),
        )
        try:
            for link in links:
                await link.open(rebuild=bool(call.history))
        except BaseException:
            for link in links:  # no half-open call left behind on the stages
                link.cancel()
            raise
        return links

    async def _read_listen(self, link: StageLink, frames: asyncio.Queue) -> None:
        """Listen results arrive as frames complete; a broken listen stream is reopened (fresh)."""
        while True:
            try:
                response = await link.call.read()
                if response is grpc.aio.EOF:
                    raise StageUnavailable("listen stage ended the stream")
                await frames.put(response)
            except Exception as e:  # noqa: BLE001 - any failure of the stream: reopen it
                try:
                    await link.open(rebuild=True)
                except StageUnavailable as e2:
                    await frames.put(e2)
                    return
                log.warning("listen_reopened", error=str(e)[:200])

    def _accept_text(self, call: CallState, role: str, text: str) -> tuple[grpc.StatusCode, str] | None:
        """Queue text for prefill (in slices between ticks) if it fits the call's context budget;
        otherwise the refusal to send (the policy when the context is full: refuse new text)."""
        v = self.vocab
        tokens = [v.bos, *self.tokenizer.encode(f"{role}: {text}"), v.eos]
        used = call.positions + len(call.text_queue)
        if used + len(tokens) > self.context_positions:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{role} text of {len(tokens)} tokens does not fit the call's context budget: {used} of "
                    f"{self.context_positions} positions used (--context-positions); the text was not used")
        call.text_queue.extend(tokens)
        now_ms = int(call.tick * TICK_S * 1000)
        call.pending_transcript.append(TranscriptEntry(role, text, now_ms, now_ms))
        return None

    async def _prefill_text(self, call: CallState, backbone: StageLink, limit: int | None) -> None:
        """Prefill queued text, at most `limit` tokens before this tick (None: all of it). Each
        slice is its own history record, so a replica rebuilt from the history replays the same
        positions in the same order."""
        budget = len(call.text_queue) if limit is None else min(limit, len(call.text_queue))
        records = []
        while budget > 0:
            size = min(budget, self.limits.text_tokens_per_tick)
            insert = backbone_pb2.TextInsert(tokens=[call.text_queue.popleft() for _ in range(size)])
            budget -= size
            call.positions += size
            record = backbone_pb2.HistoryRecord(text=insert).SerializeToString()
            call.history.append(record)  # first: a replica rebuilt after a failed write replays it
            records.append(record)
            try:
                await backbone.write(backbone_pb2.StepRequest(text=insert))
            except Exception as e:  # noqa: BLE001 - the next request fails over and replays the insert
                log.warning("text_insert_deferred", session_id=call.session_id, error=str(e)[:200])
        entries, call.pending_transcript = call.pending_transcript, []
        if not records and not entries:
            return
        try:
            await self.store.append_history(call.session_id, records, owner=call.owner)
            await self.store.append_transcript(call.session_id, entries, owner=call.owner)
        except SessionStoreError as e:
            log.warning("store_write_failed", session_id=call.session_id, error=str(e))

    async def _generate_text(self, call: CallState, backbone: StageLink) -> str:
        response = await backbone.request(backbone_pb2.StepRequest(generate=backbone_pb2.GenerateText(max_tokens=64)))
        call.positions += len(response.generated.tokens) + 1  # the reply's start, then its tokens
        return response.agent_text

    async def _mark_cut_off(self, call: CallState, now_ms: int, heard_samples: int, log_) -> None:
        try:
            await self.store.mark_cut_off(call.session_id, now_ms, heard_samples, owner=call.owner)
        except SessionStoreError as e:
            log_.warning("store_write_failed", error=str(e))

    async def _record_tick(self, call: CallState, entries: list, log_) -> bool:
        """One atomic store update per tick; False when the store failed (the call goes on, the
        gateway keeps its own copy of the history)."""
        try:
            await self.store.append_tick(call.session_id, [call.history[-1]], entries, call.tick, owner=call.owner)
            return True
        except SessionStoreError as e:
            log_.warning("store_write_failed", tick=call.tick, error=str(e))
            return False


def _raise_client_error(reader: asyncio.Task) -> None:
    """What went wrong reading the client's stream (bad audio...), if it has."""
    if reader.done() and not reader.cancelled() and reader.exception():
        raise reader.exception()


def _error(tick: int, code: grpc.StatusCode, message: str) -> pb.ConverseResponse:
    """An Event.Error: a problem the call survives."""
    return pb.ConverseResponse(event=pb.Event(tick=tick, error=pb.Event.Error(code=code.value[0], message=message)))


def _positions(record: bytes) -> int:
    """Context positions a stored history record holds."""
    r = backbone_pb2.HistoryRecord.FromString(record)
    return 1 if r.WhichOneof("record") == "tick" else len(r.text.tokens)


def _out_frame(rate_hz: int) -> int:
    """Agent samples per tick at the output rate."""
    return rate_hz * FRAME // MODEL_RATE_HZ
