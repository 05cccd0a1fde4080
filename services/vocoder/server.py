"""Vocoder stage: agent latents in, 24 kHz PCM out (float32), conv caches per stream."""
from __future__ import annotations

import asyncio
from typing import Callable

import grpc
import numpy as np
import structlog

from michi.api import Michi
from michi.proto.vocoder.v1 import vocoder_pb2, vocoder_pb2_grpc
from michi.serving.admission import Admission, refuse
from michi.serving.execution import TorchVocoderStream, VocoderStream
from michi.serving.liveness import WatchedExecutor
from michi.serving.metrics import LIVE_SESSIONS
from michi.serving.stage_cli import DEFAULT_MAX_CALLS
from michi.serving.triton.client import TritonError

log = structlog.get_logger()


class VocoderServicer(vocoder_pb2_grpc.VocoderServicer):
    def __init__(self, michi: Michi, executor, vocoder_streams: Callable[[], VocoderStream] | None = None,
                 admission: Admission | None = None):
        self.michi, self.executor = michi, executor
        self.vocoder_streams = vocoder_streams or (lambda: TorchVocoderStream(michi))
        self.admission = admission or Admission("vocoder", DEFAULT_MAX_CALLS)

    def liveness(self, stall_s: float) -> str | None:
        """The stage watchdog's probe: a model call running (or waiting) longer than stall_s."""
        return self.executor.stalled(stall_s) if isinstance(self.executor, WatchedExecutor) else None

    async def Decode(self, request_iterator, context):
        loop = asyncio.get_running_loop()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("request") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be `start`")
        dim = self.michi.cfg.latent_dim
        warmup = [list(latent.values) for latent in first.start.warmup]
        if any(len(w) != dim for w in warmup):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"warm-up latents must have {dim} values")
        if not self.admission.try_admit():
            log.warning("vocoder_call_refused", session_id=first.start.session_id, live=self.admission.live)
            await refuse(context, self.admission)
        counted = False
        try:
            stream = self.vocoder_streams()
            if warmup:  # rebuild the conv caches of a call moved here from a lost replica
                await loop.run_in_executor(self.executor, stream.decode, warmup)
            LIVE_SESSIONS.labels("vocoder").inc()
            counted = True
            async for request in request_iterator:
                latent = request.latent
                if request.WhichOneof("request") != "latent" or len(latent.values) != dim:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected a latent of {dim} values")
                try:
                    audio = await loop.run_in_executor(self.executor, stream.decode, [list(latent.values)])
                except TritonError as e:  # the gateway moves the call to another replica
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                yield vocoder_pb2.DecodeResponse(tick=latent.tick, pcm=audio.astype("<f4").tobytes())
        finally:
            if counted:
                LIVE_SESSIONS.labels("vocoder").dec()
            self.admission.release()
            log.info("vocoder_stream_closed", session_id=first.start.session_id)


def pcm_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")
