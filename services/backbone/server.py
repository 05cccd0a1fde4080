"""Backbone stage: backbone + text head + speak head. One stream per call; the ticks of all live
calls are batched into one forward pass (see batcher.py).

A stream takes an engine row from `open` until it ends, however it ends (client gone, gateway
timeout, bad request, engine error): the row is closed by a job queued in the stream's `finally`,
which neither waits nor can fail. At most `admission.max_calls` streams at once; one more is
refused with RESOURCE_EXHAUSTED (see michi.serving.admission)."""
from __future__ import annotations

import uuid

import grpc
import structlog
import torch

from michi.api import Michi
from michi.engine import BackboneEngine, HistoryTick, TickInput
from michi.proto.backbone.v1 import backbone_pb2, backbone_pb2_grpc
from michi.serving.admission import Admission, refuse
from michi.serving.liveness import WatchedExecutor
from michi.serving.metrics import LIVE_SESSIONS
from michi.serving.stage_cli import DEFAULT_MAX_CALLS

from .batcher import Batcher

log = structlog.get_logger()


def history_items(records) -> list:
    """Proto history records -> what `BackboneEngine.replay` takes."""
    items = []
    for record in records:
        if record.WhichOneof("record") == "tick":
            t = record.tick
            items.append(HistoryTick(torch.tensor(list(t.user_latent)), list(t.user_tokens), t.agent_token,
                                     torch.tensor(list(t.agent_latent)), list(t.agent_phones), t.next_phone))
        else:
            items.append(list(record.text.tokens))
    return items


class BackboneServicer(backbone_pb2_grpc.BackboneServicer):
    def __init__(self, michi: Michi, executor, rows: int = 8, window_s: float = 0.004,
                 admission: Admission | None = None):
        self.michi, self.executor = michi, executor
        self.engine = BackboneEngine(michi.model, rows=rows)
        # before the stage reports ready: no call pays the one-time costs
        self.engine.warm_up(michi.tokenizer.encode("Hello, how are you?"))
        self.batcher = Batcher(self.engine, executor, window_s=window_s)
        self.admission = admission or Admission("backbone", DEFAULT_MAX_CALLS)

    def liveness(self, stall_s: float) -> str | None:
        """The stage watchdog's probe: why the batcher is stuck (its loop ended, a job waited or an
        engine call ran longer than stall_s), or None."""
        reason = self.batcher.stalled(stall_s)
        if reason is None and isinstance(self.executor, WatchedExecutor):
            reason = self.executor.stalled(stall_s)
        return reason

    def _decode(self, tokens) -> str:
        return self.michi.tokenizer.decode([t for t in tokens if self.michi.vocab.is_text(t)])

    async def Step(self, request_iterator, context):
        self.batcher.start()
        if self.batcher.task.done():  # cannot happen by design; if it does, fail over at once
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the backbone's scheduler has stopped")
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("request") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be `open`")
        o = first.open
        try:
            history = history_items(o.history)
        except (RuntimeError, ValueError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad history: {e}")
        if not self.admission.try_admit():
            log.warning("backbone_call_refused", session_id=o.session_id, live=self.admission.live)
            await refuse(context, self.admission)
        key = f"{o.session_id}/{uuid.uuid4().hex[:8]}"  # a reconnecting call gets a fresh row
        counted = False
        try:
            await self.batcher.call(lambda: self.engine.open(key, seed=o.seed,
                                                             text_temperature=o.text_temperature or 0.8))
            replayed = await self.batcher.replay(key, history)
            LIVE_SESSIONS.labels("backbone").inc()
            counted = True
            log.info("backbone_stream_opened", session_id=o.session_id, replayed_ticks=replayed)
            yield backbone_pb2.StepResponse(opened=backbone_pb2.Opened(
                position=self.engine.position(key), replayed_ticks=replayed, trained_weights=self.michi.trained))
            async for request in request_iterator:
                kind = request.WhichOneof("request")
                if kind == "tick":
                    yield await self._tick(key, request.tick, context)
                elif kind == "text":
                    await self.batcher.insert_text(key, list(request.text.tokens))
                elif kind == "generate":
                    n = max(1, min(request.generate.max_tokens or 64, 1024))
                    tokens = await self.batcher.generate_text(key, n)
                    yield backbone_pb2.StepResponse(generated=backbone_pb2.GeneratedText(tokens=tokens),
                                                    agent_text=self._decode(tokens))
                else:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected `{kind}` after `open`")
        finally:
            # Nothing here awaits: a stream cancelled again while it cleans up (or a stuck batcher)
            # can neither hang it nor skip a step. The close job runs after every job this stream
            # queued (a no-op if its open never ran).
            if counted:
                LIVE_SESSIONS.labels("backbone").dec()
            self.admission.release()
            self.batcher.submit(lambda: self.engine.close(key))
            log.info("backbone_stream_closed", session_id=o.session_id)

    async def _tick(self, key: str, t: backbone_pb2.Tick, context) -> backbone_pb2.StepResponse:
        """One tick of the call's row, batched with the other calls' (and its forced text first)."""
        dim = self.michi.cfg.latent_dim
        if len(t.user_latent) != dim or (t.forced_latent and len(t.forced_latent) != dim):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"latents must have {dim} values")
        if t.forced_text:
            await self.batcher.call(lambda: self.engine.force_text(key, list(t.forced_text)))
        x = TickInput(torch.tensor(list(t.user_latent)), list(t.user_tokens),
                      torch.tensor(list(t.forced_latent)) if t.forced_latent else None)
        out = await self.batcher.tick(key, x)
        return backbone_pb2.StepResponse(
            tick=backbone_pb2.TickRecord(tick=t.tick, user_latent=t.user_latent, user_tokens=t.user_tokens,
                                         agent_token=out.agent_token,
                                         agent_latent=out.agent_latent.float().cpu().tolist(),
                                         agent_phones=out.phones, next_phone=out.next_phone),
            agent_text=self._decode([out.agent_token]))
