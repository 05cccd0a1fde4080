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
from michi.config import FRAME_SAMPLES
from michi.data.whisper import load_whisper
from michi.proto.listen.v1 import listen_pb2, listen_pb2_grpc
from michi.serving.admission import Admission, refuse
from michi.serving.execution import EncoderStream, TorchEncoderStream
from michi.serving.liveness import WatchedExecutor
from michi.serving.metrics import LIVE_SESSIONS
from michi.serving.stage_cli import DEFAULT_MAX_CALLS
from michi.serving.triton.client import TritonError
from michi.transcript import SOURCES, Heard, transcriber

log = structlog.get_logger()


class ListenStream:
    """One call's listen state: resampler, encoder stream (in-process or on Triton), and its
    transcript source (`michi.transcript`: the learned text head, or Whisper streaming)."""

    def __init__(self, michi: Michi, rate_hz: int, encoder: EncoderStream, source: str = "head", whisper=None):
        self.michi, self.encoder = michi, encoder
        self.resampler = StreamingResampler(rate_hz, michi.cfg.sample_rate_hz)
        self.pcm = np.zeros(0, dtype=np.float32)  # 24 kHz audio not yet in a whole frame
        self.text = transcriber(source, michi, whisper)

    @torch.inference_mode()
    def push(self, pcm: np.ndarray) -> list[tuple[np.ndarray, Heard]]:
        audio = self.resampler.push(pcm)
        latents, features = self.encoder.encode(audio)
        n = latents.shape[0]
        self.pcm = np.concatenate([self.pcm, audio])
        frames, self.pcm = self.pcm[:n * FRAME_SAMPLES], self.pcm[n * FRAME_SAMPLES:]
        heard = self.text.push(frames, features) if n else []
        return [(latents[i].float().cpu().numpy(), heard[i]) for i in range(n)]


class ListenServicer(listen_pb2_grpc.ListenServicer):
    def __init__(self, michi: Michi, executor, encoder_streams: Callable[[], EncoderStream] | None = None,
                 admission: Admission | None = None, transcript: str = "head"):
        """`transcript`: the user text source (`michi.transcript.SOURCES`); "whisper" loads
        faster-whisper once, shared by the calls."""
        if transcript not in SOURCES:
            raise ValueError(f"unknown transcript source {transcript!r}; one of {SOURCES}")
        self.michi, self.executor, self.transcript = michi, executor, transcript
        self.whisper = load_whisper() if transcript == "whisper" else None
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
            stream = ListenStream(self.michi, first.start.sample_rate_hz, self.encoder_streams(),
                                  self.transcript, self.whisper)
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
                for latent, heard in frames:
                    yield listen_pb2.EncodeResponse(frame=frame, latent=latent.tolist(), tokens=heard.tokens,
                                                    text=heard.text, interim=heard.interim)
                    frame += 1
        finally:
            if counted:
                LIVE_SESSIONS.labels("listen").dec()
            self.admission.release()
            log.info("listen_stream_closed", session_id=session, frames=frame)
