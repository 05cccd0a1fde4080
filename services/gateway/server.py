"""Gateway: the public `Converse` API. It owns each call: real-time pacing (one tick per 80 ms),
a jitter buffer for the caller's audio, turn management, the stage streams (with failover) and
the session record in the store (Redis or in-process)."""
from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np
import structlog

from michi.audio.io import AudioError
from michi.audio.pcm import Encoding, check_format, decode, encode
from michi.audio.resample import StreamingResampler
from michi.audio.vad import StreamingVAD
from michi.proto.backbone.v1 import backbone_pb2, backbone_pb2_grpc
from michi.proto.gateway.v1 import gateway_pb2 as pb
from michi.proto.gateway.v1 import gateway_pb2_grpc
from michi.proto.listen.v1 import listen_pb2, listen_pb2_grpc
from michi.proto.vocoder.v1 import vocoder_pb2, vocoder_pb2_grpc
from michi.serving.metrics import FIRST_AUDIO_SECONDS, LIVE_SESSIONS, MISSED_TICKS, TICK_SECONDS
from michi.session.store import SessionStore, SessionStoreError, StoreUnavailable, TranscriptEntry

from .jitter import JitterBuffer
from .stages import Channels, StageLink, StageUnavailable
from .turns import TurnManager, TurnSettings

log = structlog.get_logger()
TICK_S = 0.080
MODEL_RATE_HZ = 24_000
FRAME = 1920
VOCODER_WARMUP_TICKS = 8  # latents replayed into a new vocoder replica (covers its receptive field)
ROLE_NAMES = {pb.USER: "user", pb.SYSTEM: "system", pb.CONTEXT: "context", pb.TOOL: "tool",
              pb.TEXT_ROLE_UNSPECIFIED: "user"}
ENCODINGS = {pb.LINEAR16: Encoding.LINEAR16, pb.MULAW: Encoding.MULAW}


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


@dataclass
class CallState:
    session_id: str
    owner: str
    config: pb.ConverseConfig
    in_encoding: Encoding
    out_encoding: Encoding
    tick: int = 0
    history: list[bytes] = field(default_factory=list)  # serialized backbone HistoryRecords
    latents: list[list[float]] = field(default_factory=list)  # recent agent latents (vocoder warm-up)
    samples_sent: int = 0  # agent samples sent, output rate
    turn_samples_sent: int = 0
    agent_turn_text: str = ""
    agent_turn_start_ms: int = 0
    first_audio_s: float | None = None
    resume_token: str = ""
    store_degraded: bool = False


def _format(fmt: pb.AudioFormat, default_rate: int) -> tuple[Encoding, int]:
    encoding = ENCODINGS.get(fmt.encoding or pb.LINEAR16)
    if encoding is None:
        raise AudioError(f"unsupported audio encoding {fmt.encoding}")
    rate = fmt.sample_rate_hz or (8000 if encoding is Encoding.MULAW else default_rate)
    check_format(encoding, rate)
    return encoding, rate


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, settings: GatewaySettings, store: SessionStore, tokenizer, vocab, latent_dim: int,
                 auth_token: str | None = None):
        self.settings, self.store, self.auth_token = settings, store, auth_token
        self.tokenizer, self.vocab, self.latent_dim = tokenizer, vocab, latent_dim
        self.channels = Channels()
        self.trained = False  # what the backbone stage reports of its weights

    async def Converse(self, request_iterator, context):
        requests = aiter(request_iterator)
        first = await anext(requests, None)  # read before any refusal: aborting a stream whose
        # first message is still in flight can surface as INTERNAL instead of the real status
        if self.auth_token and dict(context.invocation_metadata() or ()).get("authorization") != f"Bearer {self.auth_token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if first is None or first.WhichOneof("request") != "config":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first message of a Converse stream must be `config`")
        config = first.config
        try:
            in_enc, in_rate = _format(config.input_audio, 16_000)
            out_enc, out_rate = _format(config.output_audio, in_rate)
        except AudioError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        call = await self._start_session(config, in_enc, out_enc, context)
        bound = log.bind(session_id=call.session_id)
        LIVE_SESSIONS.labels("gateway").inc()
        error = None
        try:
            async for response in self._run_call(call, requests, in_rate, out_rate, context, bound):
                yield response
        except StageUnavailable as e:
            bound.error("call_failed", error=str(e))
            error = (grpc.StatusCode.UNAVAILABLE, str(e))
        except AudioError as e:  # garbage from the client: say what, keep what was said so far
            bound.warning("bad_client_input", error=str(e))
            error = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:  # before the status goes out: a client told the call is over may resume it at once
            LIVE_SESSIONS.labels("gateway").dec()
            try:
                await self.store.release(call.session_id, call.owner)
            except SessionStoreError:
                pass
            bound.info("call_ended", ticks=call.tick, agent_samples_sent=call.samples_sent)
        if error:
            await context.abort(*error)

    async def _start_session(self, config, in_enc, out_enc, context) -> CallState:
        session_id = config.session_id or uuid.uuid4().hex
        owner = uuid.uuid4().hex
        stored = {"mode": int(config.mode), "system_text": config.system_text, "text": config.text}
        try:
            if config.resume_token:
                record = await self.store.claim(session_id, owner, self.settings.lease_s, config.resume_token)
                call = CallState(session_id, owner, config, in_enc, out_enc, tick=record.last_tick + 1)
                call.history = await self.store.history(session_id)
                call.resume_token = config.resume_token
            else:
                token = await self.store.create(session_id, stored)
                await self.store.claim(session_id, owner, self.settings.lease_s, token)
                call = CallState(session_id, owner, config, in_enc, out_enc)
                call.resume_token = token
        except StoreUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {e}")
        except SessionStoreError as e:
            await context.abort(getattr(grpc.StatusCode, e.grpc_status), str(e))
        return call

    # ---- the call -----------------------------------------------------------------------------------
    async def _run_call(self, call: CallState, requests, in_rate: int, out_rate: int, context, log_):
        s, cfg = self.settings, call.config
        resumed = bool(cfg.resume_token)
        links = await self._open_stages(call, in_rate)
        listen, backbone, vocoder = links
        inbox = CallInbox()
        reader = asyncio.create_task(self._read_client(requests, call, inbox, log_))
        frames: asyncio.Queue = asyncio.Queue()
        listen_reader = asyncio.create_task(self._read_listen(listen, frames))
        try:
            yield pb.ConverseResponse(started=pb.SessionStarted(
                session_id=call.session_id, resume_token=call.resume_token, resumed=resumed, tick=call.tick,
                trained_weights=self.trained))
            turns = TurnManager(TurnSettings(
                full_duplex=cfg.turn.policy != pb.HALF_DUPLEX,
                barge_in_min_speech_ms=cfg.turn.barge_in_min_speech_ms or 600,
                end_of_turn_silence_ms=cfg.turn.end_of_turn_silence_ms or 700))
            vad = StreamingVAD(in_rate)
            jitter = JitterBuffer(in_rate)
            out_resampler = StreamingResampler(MODEL_RATE_HZ, out_rate)
            in_frame = in_rate * FRAME // MODEL_RATE_HZ
            start_ticks, text_only = call.tick, cfg.mode == pb.TEXT_ONLY
            pending_text: list[tuple[str, str]] = []
            if cfg.system_text and not resumed:
                pending_text.append(("system", cfg.system_text))
            forced = self.tokenizer.encode(cfg.text) if cfg.mode == pb.TTS and not resumed else []
            # TTS without a limit: room for every forced token at the slowest pace, then a pause
            max_ticks = cfg.max_ticks or (3 * len(forced) + 12 if cfg.mode == pb.TTS else 0)
            silence_latent = [0.0] * self.latent_dim
            started = time.perf_counter()
            next_deadline = time.monotonic()
            while True:
                if inbox.ended or (max_ticks and call.tick - start_ticks >= max_ticks):
                    break
                _raise_client_error(reader)
                jitter.extend(inbox.take_audio())
                pending_text += inbox.take_text()
                for role, text in pending_text:  # text-only positions, before this tick
                    await self._insert_text(call, backbone, role, text)
                pending_text = []
                if text_only:
                    if inbox.wants_reply:
                        inbox.wants_reply = False
                        yield await self._generate_text(call, backbone)
                    await inbox.wait(0.05)
                    if inbox.closed and not inbox.has_input():
                        _raise_client_error(reader)
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
                step = await backbone.request(backbone_pb2.StepRequest(tick=tick_req))
                record = step.tick
                call.history.append(backbone_pb2.HistoryRecord(tick=record).SerializeToString())
                call.latents = (call.latents + [list(record.agent_latent)])[-VOCODER_WARMUP_TICKS:]
                decoded = await vocoder.request(vocoder_pb2.DecodeRequest(
                    latent=vocoder_pb2.Latent(tick=call.tick, values=record.agent_latent)))
                audio24 = np.frombuffer(decoded.pcm, dtype="<f4")
                agent_audible = bool(step.agent_text.strip()) or float(np.sqrt(np.mean(audio24 ** 2))) > 1e-3
                update = turns.update(vad.in_speech, vad.speech_ms, agent_audible, interrupt=inbox.take_interrupt())
                audio_out = out_resampler.push(audio24)
                now_ms = int((call.tick + 1) * TICK_S * 1000)
                for event in update.events:
                    yield self._event(call, event, len(audio_out), now_ms)
                    if event[0] == "barge_in":
                        await self._mark_cut_off(call, now_ms, log_)
                entries = []
                if update.send_agent_audio and len(audio_out):
                    yield pb.ConverseResponse(audio=pb.AgentAudio(
                        audio=encode(audio_out, call.out_encoding), tick=call.tick, start_sample=call.samples_sent))
                    call.samples_sent += len(audio_out)
                    call.turn_samples_sent += len(audio_out)
                    if call.first_audio_s is None:
                        call.first_audio_s = time.perf_counter() - started
                        FIRST_AUDIO_SECONDS.observe(call.first_audio_s)
                        log_.info("first_audio", tick=call.tick, ms=round(call.first_audio_s * 1e3, 1))
                if step.agent_text:
                    yield pb.ConverseResponse(agent_text=pb.AgentText(text=step.agent_text, tick=call.tick))
                    entries.append(TranscriptEntry("agent", step.agent_text, now_ms - 80, now_ms,
                                                   cut_off=not update.send_agent_audio))
                if user is not None and user.text:
                    yield pb.ConverseResponse(transcript=pb.UserTranscript(text=user.text, tick=call.tick))
                    entries.append(TranscriptEntry("user", user.text, now_ms - 80, now_ms))
                if not await self._record_tick(call, entries, log_) and not call.store_degraded:
                    call.store_degraded = True  # say it once: the call goes on, its record does not
                    yield pb.ConverseResponse(event=pb.Event(tick=call.tick, error=pb.Event.Error(
                        code=grpc.StatusCode.UNAVAILABLE.value[0],
                        message="session store unavailable: the call goes on, but it cannot be resumed "
                                "or moved to another replica until the store is back")))
                TICK_SECONDS.labels("gateway").observe(time.perf_counter() - tick_start)
                call.tick += 1
                if s.realtime:
                    next_deadline = self._next_deadline(next_deadline, call.tick == start_ticks + 1)
                    delay = next_deadline - time.monotonic()
                    if delay < 0:
                        MISSED_TICKS.inc()
                        next_deadline = self._next_deadline(time.monotonic(), True)  # no catching up
                    await asyncio.sleep(max(0.0, next_deadline - time.monotonic()))
                if inbox.closed and not inbox.has_input() and not jitter.pending and not max_ticks:
                    _raise_client_error(reader)  # the stream ended on bad input, or cleanly:
                    break  # the caller finished sending and everything it said was heard
        finally:
            reader.cancel()
            listen_reader.cancel()
            for link in links:
                link.cancel()

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

    async def _read_client(self, requests, call: CallState, inbox: "CallInbox", log_) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "audio":
                    inbox.audio.append(decode(request.audio, call.in_encoding))
                elif kind == "text":
                    inbox.text.append((ROLE_NAMES.get(request.text.role, "user"), request.text.text))
                    inbox.wants_reply = inbox.wants_reply or request.text.role in (pb.USER, pb.TEXT_ROLE_UNSPECIFIED)
                elif kind == "control":
                    if request.control.action == pb.Control.END_CALL:
                        inbox.ended = True
                    elif request.control.action == pb.Control.INTERRUPT_AGENT:
                        inbox.interrupt = True
                else:
                    raise AudioError("a second `config` in one stream; open a new stream to change it")
                inbox.notify()
        finally:
            inbox.closed = True
            inbox.notify()

    async def _insert_text(self, call: CallState, backbone: StageLink, role: str, text: str):
        v = self.vocab
        tokens = [v.bos, *self.tokenizer.encode(f"{role}: {text}"), v.eos]
        insert = backbone_pb2.TextInsert(tokens=tokens)
        record = backbone_pb2.HistoryRecord(text=insert).SerializeToString()
        call.history.append(record)  # first: a replica rebuilt after a failed write replays it
        try:
            await backbone.write(backbone_pb2.StepRequest(text=insert))
        except Exception as e:  # noqa: BLE001 - the next request fails over and replays the insert
            log.warning("text_insert_deferred", session_id=call.session_id, error=str(e)[:200])
        now_ms = int(call.tick * TICK_S * 1000)
        try:
            await self.store.append_history(call.session_id, [record], owner=call.owner)
            await self.store.append_transcript(call.session_id, [TranscriptEntry(role, text, now_ms, now_ms)],
                                               owner=call.owner)
        except SessionStoreError as e:
            log.warning("store_write_failed", session_id=call.session_id, error=str(e))

    async def _generate_text(self, call: CallState, backbone: StageLink):
        response = await backbone.request(backbone_pb2.StepRequest(generate=backbone_pb2.GenerateText(max_tokens=64)))
        return pb.ConverseResponse(agent_text=pb.AgentText(text=response.agent_text, tick=call.tick))

    def _event(self, call: CallState, event: tuple, cut_samples: int, now_ms: int) -> pb.ConverseResponse:
        if event[0] == "barge_in":
            played = call.turn_samples_sent
            call.turn_samples_sent = 0
            return pb.ConverseResponse(event=pb.Event(tick=call.tick, barge_in=pb.Event.BargeIn(
                agent_samples_played=played, agent_samples_cut=cut_samples)))
        kind, speaker = event
        if kind == "turn_start" and speaker == "agent":
            call.turn_samples_sent = 0
        message = pb.Event.TurnStart(speaker=speaker) if kind == "turn_start" else pb.Event.TurnEnd(speaker=speaker)
        return pb.ConverseResponse(event=pb.Event(tick=call.tick, **{kind: message}))

    async def _mark_cut_off(self, call: CallState, now_ms: int, log_) -> None:
        try:
            await self.store.mark_cut_off(call.session_id, now_ms, call.samples_sent, owner=call.owner)
        except SessionStoreError as e:
            log_.warning("store_write_failed", error=str(e))

    async def _record_tick(self, call: CallState, entries: list, log_) -> bool:
        """One atomic store update per tick; False when the store failed (the call goes on, the
        gateway keeps its own copy of the history)."""
        try:
            await self.store.append_tick(call.session_id, [call.history[-1]], entries, call.tick, owner=call.owner)
            if call.tick % 25 == 0:
                await self.store.renew(call.session_id, call.owner, self.settings.lease_s)
            return True
        except SessionStoreError as e:
            log_.warning("store_write_failed", tick=call.tick, error=str(e))
            return False


def _raise_client_error(reader: asyncio.Task) -> None:
    """What went wrong reading the client's stream (bad audio...), if it has."""
    if reader.done() and not reader.cancelled() and reader.exception():
        raise reader.exception()


class CallInbox:
    """What the client sent since the last tick."""

    def __init__(self):
        self.audio: list[np.ndarray] = []
        self.text: list[tuple[str, str]] = []
        self.interrupt = self.ended = self.closed = self.wants_reply = False
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self._event.clear()

    def has_input(self) -> bool:
        return bool(self.audio or self.text)

    def take_audio(self) -> list[np.ndarray]:
        audio, self.audio = self.audio, []
        return audio

    def take_text(self) -> list[tuple[str, str]]:
        text, self.text = self.text, []
        return text

    def take_interrupt(self) -> bool:
        interrupt, self.interrupt = self.interrupt, False
        return interrupt
