"""A thin client of the public API: `Converse` over one bidirectional stream."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable

import grpc
import numpy as np

from ..audio.pcm import Encoding, decode, encode
from ..proto.gateway.v1 import gateway_pb2 as pb
from ..proto.gateway.v1 import gateway_pb2_grpc
from .server import CHANNEL_OPTIONS


@dataclass
class CallResult:
    session_id: str = ""
    resume_token: str = ""
    trained_weights: bool = False
    audio: list[np.ndarray] = field(default_factory=list)
    agent_text: str = ""
    user_text: str = ""
    events: list[pb.Event] = field(default_factory=list)
    final_transcripts: list[str] = field(default_factory=list)  # the user's turns, whole
    user_pieces: list[pb.UserTranscript] = field(default_factory=list)  # the stable pieces, with their ticks
    interims: list[str] = field(default_factory=list)  # every interim guess, in order
    audio_chunks: list[pb.AgentAudio] = field(default_factory=list)  # as sent (tick, start_sample)
    ended: pb.CallEnded | None = None  # why the call ended (the last message)
    first_audio_ms: float | None = None
    responses: int = 0

    @property
    def pcm(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)


def aio_channel(address: str, root_certs: bytes | None = None) -> grpc.aio.Channel:
    """An asyncio channel to the gateway: plaintext, or TLS trusting `root_certs` (PEM)."""
    if root_certs is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root_certs),
                                   options=CHANNEL_OPTIONS)


def config(mode=pb.CONVERSATION, rate_in=16_000, rate_out=24_000, encoding=pb.LINEAR16, **fields) -> pb.ConverseRequest:
    return pb.ConverseRequest(config=pb.ConverseConfig(
        mode=mode, input_audio=pb.AudioFormat(encoding=encoding, sample_rate_hz=rate_in),
        output_audio=pb.AudioFormat(encoding=pb.LINEAR16, sample_rate_hz=rate_out), **fields))


async def audio_requests(pcm: np.ndarray, rate_hz: int, chunk_ms: int = 20, realtime: bool = True,
                         encoding: Encoding = Encoding.LINEAR16) -> AsyncIterator[pb.ConverseRequest]:
    """A file streamed like a live caller: `chunk_ms` chunks, paced in real time."""
    step = rate_hz * chunk_ms // 1000
    start = time.monotonic()
    for i in range(0, len(pcm), step):
        yield pb.ConverseRequest(audio=encode(pcm[i:i + step], encoding))
        if realtime:
            await asyncio.sleep(max(0.0, start + (i + step) / rate_hz - time.monotonic()))


async def converse(address: str, first: pb.ConverseRequest, rest: AsyncIterator[pb.ConverseRequest] | Iterable = (),
                   token: str | None = None, timeout_s: float | None = None, tail_s: float = 0.0,
                   root_certs: bytes | None = None) -> CallResult:
    """Run one call to its end; `tail_s` keeps the stream open that long after `rest` is sent.
    `root_certs` (PEM): reach a TLS gateway, trusting these roots (its self-signed certificate)."""
    result = CallResult()
    out_encoding = Encoding.LINEAR16

    async def requests():
        yield first
        if hasattr(rest, "__aiter__"):
            async for r in rest:
                yield r
        else:
            for r in rest:
                yield r
        if tail_s:
            await asyncio.sleep(tail_s)

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with aio_channel(address, root_certs) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.perf_counter()
        async for response in stub.Converse(requests(), metadata=metadata, timeout=timeout_s):
            result.responses += 1
            kind = response.WhichOneof("response")
            if kind == "started":
                result.session_id = response.started.session_id
                result.resume_token = response.started.resume_token
                result.trained_weights = response.started.trained_weights
            elif kind == "audio":
                if result.first_audio_ms is None:
                    result.first_audio_ms = (time.perf_counter() - started) * 1e3
                result.audio.append(decode(response.audio.audio, out_encoding))
                result.audio_chunks.append(response.audio)
            elif kind == "agent_text":
                result.agent_text += response.agent_text.text
            elif kind == "transcript" and response.transcript.is_final:
                result.final_transcripts.append(response.transcript.text)
            elif kind == "transcript":
                result.user_text += response.transcript.text
                if response.transcript.text:
                    result.user_pieces.append(response.transcript)
                result.interims.append(response.transcript.interim)
            elif kind == "event":
                result.events.append(response.event)
            elif kind == "ended":
                result.ended = response.ended
    return result
