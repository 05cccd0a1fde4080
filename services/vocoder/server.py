"""Vocoder stage: agent latents in, 24 kHz PCM out (float32), conv caches per stream."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import structlog
import torch

from michi.api import Michi
from michi.proto.vocoder.v1 import vocoder_pb2, vocoder_pb2_grpc
from michi.serving.metrics import LIVE_SESSIONS

log = structlog.get_logger()


class VocoderServicer(vocoder_pb2_grpc.VocoderServicer):
    def __init__(self, michi: Michi, executor):
        self.michi, self.executor = michi, executor

    @torch.inference_mode()
    def _decode(self, latents: list[list[float]], state):
        x = torch.tensor(latents, dtype=torch.float32, device=self.michi.device)[None]
        audio, state = self.michi.model.vocoder.step(x, state)
        return audio[0].float().cpu().numpy(), state

    async def Decode(self, request_iterator, context):
        loop = asyncio.get_running_loop()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("request") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be `start`")
        dim = self.michi.cfg.latent_dim
        with torch.inference_mode():
            state = self.michi.model.vocoder.init_state(1, device=self.michi.device)
        warmup = [list(latent.values) for latent in first.start.warmup]
        if any(len(w) != dim for w in warmup):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"warm-up latents must have {dim} values")
        if warmup:  # rebuild the conv caches of a call moved here from a lost replica
            _, state = await loop.run_in_executor(self.executor, self._decode, warmup, state)
        LIVE_SESSIONS.labels("vocoder").inc()
        try:
            async for request in request_iterator:
                latent = request.latent
                if request.WhichOneof("request") != "latent" or len(latent.values) != dim:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected a latent of {dim} values")
                audio, state = await loop.run_in_executor(self.executor, self._decode, [list(latent.values)], state)
                yield vocoder_pb2.DecodeResponse(tick=latent.tick, pcm=audio.astype("<f4").tobytes())
        finally:
            LIVE_SESSIONS.labels("vocoder").dec()
            log.info("vocoder_stream_closed", session_id=first.start.session_id)


def pcm_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")
