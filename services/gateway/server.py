"""Gateway: the public `Converse` API. It owns each call: admission, the strict contract
(contract.py), the session record in the store (Redis or in-process) and its lease, and the stage
streams (with failover, stages.py). A call, once open, runs in call.py: real-time pacing (one tick
per 80 ms), a jitter buffer for the caller's audio, turn management (turns.py, typed events in
events.py) and the agent timeline (timeline.py)."""
from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
import structlog

from michi.audio.io import AudioError
from michi.proto.backbone.v1 import backbone_pb2, backbone_pb2_grpc
from michi.proto.gateway.v1 import gateway_pb2 as pb
from michi.proto.listen.v1 import listen_pb2, listen_pb2_grpc
from michi.proto.vocoder.v1 import vocoder_pb2, vocoder_pb2_grpc
from michi.serving.admission import Admission, refuse, retry_metadata
from michi.serving.metrics import LIVE_SESSIONS
from michi.session.store import SessionStore, SessionStoreError, StoreUnavailable

from .call import VOCODER_WARMUP_TICKS, Call, CallState, out_frame
from .contract import BadRequest, CallConfig, Limits, capabilities, parse_config, public_token
from .inbox import parse_request, request_kind
from .stages import Channels, StageFull, StageLink, StageUnavailable
from .timeline import AgentTimeline

log = structlog.get_logger()


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
        call.timeline = AgentTimeline.resumed_at(call.tick, out_frame(cc.out_rate))
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
    async def _run_call(self, state: CallState, requests, context, log_):
        """Open the call's stage streams, then run it (call.py): text only, or tick by tick."""
        call = Call(self, state, await self._open_stages(state, state.cc.in_rate), requests, log_)
        try:
            yield call.started()
            call.setup()
            async with aclosing(call.run_text_only() if call.text_only else call.run_ticks()) as responses:
                async for response in responses:
                    yield response
        finally:
            call.close()

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

def _positions(record: bytes) -> int:
    """Context positions a stored history record holds."""
    r = backbone_pb2.HistoryRecord.FromString(record)
    return 1 if r.WhichOneof("record") == "tick" else len(r.text.tokens)
