"""Listen stage: user PCM (any chunking, any supported rate) -> per 80 ms frame, the user latent
and the user text tokens. One stream per call; encoder and text-head caches per stream."""
from __future__ import annotations

import asyncio
from typing import Callable

import grpc
import numpy as np
import structlog
import torch

from michi.api import Michi
from michi.audio.io import AudioError
from michi.audio.pcm import Encoding, check_format, decode
from michi.audio.resample import StreamingResampler
from michi.model.listen import emitted
from michi.proto.listen.v1 import listen_pb2, listen_pb2_grpc
from michi.serving.admission import Admission, refuse
from michi.serving.execution import EncoderStream, TorchEncoderStream
from michi.serving.liveness import WatchedExecutor
from michi.serving.metrics import LIVE_SESSIONS
from michi.serving.stage_cli import DEFAULT_MAX_CALLS
from michi.serving.triton.client import TritonError

log = structlog.get_logger()


class ListenStream:
    """One call's listen state: resampler, encoder stream (in-process or on Triton), CTC text head."""

    def __init__(self, michi: Michi, rate_hz: int, encoder: EncoderStream):
        m = michi.model
        self.michi, self.device, self.encoder = michi, michi.device, encoder
        self.resampler = StreamingResampler(rate_hz, michi.cfg.sample_rate_hz)
        with torch.inference_mode():
            self.text = m.listen_text.init_state(1, device=self.device)  # conv + CTC decoder

    @torch.inference_mode()
    def push(self, pcm: np.ndarray) -> list[tuple[np.ndarray, list[int]]]:
        m = self.michi.model
        latents, features = self.encoder.encode(self.resampler.push(pcm))
        tokens, self.text = m.listen_text.read(features[None], self.text)
        return [(latents[i].float().cpu().numpy(), emitted(tokens[0, i])) for i in range(latents.shape[0])]


class ListenServicer(listen_pb2_grpc.ListenServicer):
    def __init__(self, michi: Michi, executor, encoder_streams: Callable[[], EncoderStream] | None = None,
                 admission: Admission | None = None):
        self.michi, self.executor = michi, executor
        self.encoder_streams = encoder_streams or (lambda: TorchEncoderStream(michi))
        self.admission = admission or Admission("listen", DEFAULT_MAX_CALLS)

    def liveness(self, stall_s: float) -> str | None:
        """The stage watchdog's probe: a model call running (or waiting) longer than stall_s."""
        return self.executor.stalled(stall_s) if isinstance(self.executor, WatchedExecutor) else None

    async def Encode(self, request_iterator, context):
        loop = asyncio.get_running_loop()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("request") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be `start`")
        try:
            check_format(Encoding.LINEAR16, first.start.sample_rate_hz)
        except AudioError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        session = first.start.session_id
        if not self.admission.try_admit():
            log.warning("listen_call_refused", session_id=session, live=self.admission.live)
            await refuse(context, self.admission)
        frame, counted = 0, False
        try:
            stream = ListenStream(self.michi, first.start.sample_rate_hz, self.encoder_streams())
            LIVE_SESSIONS.labels("listen").inc()
            counted = True
            async for request in request_iterator:
                if request.WhichOneof("request") != "pcm":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only `pcm` may follow `start`")
                try:
                    pcm = decode(request.pcm, Encoding.LINEAR16)
                except AudioError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                try:
                    frames = await loop.run_in_executor(self.executor, stream.push, pcm)
                except TritonError as e:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                for latent, tokens in frames:
                    yield listen_pb2.EncodeResponse(frame=frame, latent=latent.tolist(), tokens=tokens,
                                                    text=self.michi.tokenizer.decode(tokens))
                    frame += 1
        finally:
            if counted:
                LIVE_SESSIONS.labels("listen").dec()
            self.admission.release()
            log.info("listen_stream_closed", session_id=session, frames=frame)
