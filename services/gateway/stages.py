"""The gateway's streams to the stages, with failover: each stage has a list of replica
addresses; when a stream breaks, the call moves to the next replica and the caller rebuilds
the stage's state there (the `opener` gets the replica's fresh stream and sends what it needs)."""
from __future__ import annotations

import asyncio
import zlib
from typing import Awaitable, Callable

import grpc
import structlog

from michi.serving.metrics import FAILOVERS
from michi.serving.server import CHANNEL_OPTIONS

log = structlog.get_logger()
BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
          grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)


def replica_index(session_id: str, replicas: int) -> int:
    """The replica a call starts on: a stable hash of its id, so calls spread over replicas and a
    call lands on the same replica from any gateway."""
    return zlib.crc32(session_id.encode()) % replicas


class StageUnavailable(Exception):
    """Every replica of a stage failed."""


# What a broken stream raises is not one type: an RPC error, no answer in time, a write to an RPC
# the dead replica already ended (asyncio.InvalidStateError), or grpc's own ExecuteBatchError from
# a write that raced the peer's death. All of them mean: move the call to another replica.
STREAM_ERRORS = (Exception,)


class Channels:
    """One channel per address, shared by all calls."""

    def __init__(self):
        self.channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return self.channels[address]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels.values()))


class StageLink:
    """A call's bidirectional stream to one stage, moved to another replica when it breaks."""

    def __init__(self, stage: str, addresses: list[str], channels: Channels, method: Callable,
                 opener: Callable[["StageLink", bool], Awaitable[None]], session_id: str,
                 timeout_s: float = 5.0):
        self.stage, self.addresses, self.channels = stage, addresses, channels
        self.method, self.opener, self.session_id, self.timeout_s = method, opener, session_id, timeout_s
        self.index = replica_index(session_id, len(addresses))
        self.call = None

    async def open(self, rebuild: bool = False) -> None:
        errors = []
        for attempt in range(len(self.addresses)):
            address = self.addresses[(self.index + attempt) % len(self.addresses)]
            try:
                self.call = self.method(self.channels.get(address))(wait_for_ready=False)
                await asyncio.wait_for(self.opener(self, rebuild or attempt > 0), self.timeout_s)
                if attempt:
                    FAILOVERS.labels(self.stage).inc()
                    log.warning("stage_failover", stage=self.stage, session_id=self.session_id, address=address)
                self.index = (self.index + attempt) % len(self.addresses)
                return
            except STREAM_ERRORS as e:
                errors.append(f"{address}: {e.details() if isinstance(e, grpc.aio.AioRpcError) else repr(e)}")
                self.cancel()
        raise StageUnavailable(f"{self.stage} stage unreachable ({'; '.join(errors)})")

    async def write(self, request) -> None:
        await self.call.write(request)

    async def read(self):
        response = await asyncio.wait_for(self.call.read(), self.timeout_s)
        if response is grpc.aio.EOF:
            raise StageUnavailable(f"{self.stage} stage ended the stream")
        return response

    async def request(self, request):
        """write + read, moving to the next replica (and rebuilding) when the stream is broken."""
        try:
            await self.write(request)
            return await self.read()
        except STREAM_ERRORS as e:
            code = e.code() if isinstance(e, grpc.aio.AioRpcError) else None
            if code is not None and code not in BROKEN:
                raise  # a real answer (bad request...), not a dead replica
            log.warning("stage_stream_broken", stage=self.stage, session_id=self.session_id, error=str(e)[:200])
            self.cancel()
            self.index = (self.index + 1) % len(self.addresses)
            await self.open(rebuild=True)
            await self.write(request)
            return await self.read()

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
