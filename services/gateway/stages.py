"""The gateway's streams to the stages, with failover: each stage has a list of replica
addresses; when a stream breaks, the call moves to the next replica and the caller rebuilds
the stage's state there (the `opener` gets the replica's fresh stream and sends what it needs).

Which replica a call uses is session-affine: the replicas are ranked by rendezvous (highest
random weight) hashing of the session id with each address, the call starts on the first and
fails over down that ranking. Every gateway ranks the same way, and adding or removing one
replica moves only the calls that ranked it first. An address `dns:///NAME:PORT` (a Kubernetes
headless Service) is resolved to all its ready pods' addresses, each a replica of its own."""
from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from typing import Awaitable, Callable

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from michi.serving.metrics import FAILOVERS
from michi.serving.server import CHANNEL_OPTIONS

log = structlog.get_logger()
BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
          grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)


DNS_PREFIX = "dns:///"
DNS_TTL_S = 5.0  # how long a headless Service's resolved pod addresses are reused
HEALTH_TTL_S = 1.0  # how long a replica's health answer is reused when ranking replicas
HEALTH_TIMEOUT_S = 0.5


def rendezvous_score(session_id: str, address: str) -> int:
    digest = hashlib.blake2b(f"{address}\x00{session_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(session_id: str, addresses: list[str]) -> list[str]:
    """The replicas in the order a call tries them: highest rendezvous score first (ties, which
    a 64-bit hash makes unlikely, by address), duplicates dropped. Pure and stable across
    processes, so every gateway puts a call on the same replica."""
    unique = list(dict.fromkeys(addresses))
    return sorted(unique, key=lambda a: (-rendezvous_score(session_id, a), a))


def split_dns(address: str) -> tuple[str, int]:
    host, _, port = address[len(DNS_PREFIX):].rpartition(":")
    return host.strip("[]"), int(port)


async def resolve(addresses: list[str], cache: dict | None = None) -> list[str]:
    """Static addresses as they are; each `dns:///NAME:PORT` expanded to `IP:PORT` for every
    address NAME resolves to (a headless Service: one per ready pod). A name that does not
    resolve is kept as it is (its stream then fails like a dead replica's)."""
    out = []
    loop = asyncio.get_running_loop()
    for address in addresses:
        if not address.startswith(DNS_PREFIX):
            out.append(address)
            continue
        hit = cache.get(address) if cache is not None else None
        if hit and time.monotonic() - hit[0] < DNS_TTL_S:
            out.extend(hit[1])
            continue
        host, port = split_dns(address)
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            ips = sorted({info[4][0] for info in infos})
            found = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]
        except OSError as e:
            log.warning("stage_dns_failed", address=address, error=str(e))
            found = []
        if cache is not None and found:
            cache[address] = (time.monotonic(), found)
        out.extend(found or [address[len(DNS_PREFIX):]])
    return out


class StageUnavailable(Exception):
    """Every replica of a stage failed."""


class StageFull(StageUnavailable):
    """Every replica of a stage refused the call at capacity (RESOURCE_EXHAUSTED)."""


# What a broken stream raises is not one type: an RPC error, no answer in time, a write to an RPC
# the dead replica already ended (asyncio.InvalidStateError), or grpc's own ExecuteBatchError from
# a write that raced the peer's death. All of them mean: move the call to another replica.
STREAM_ERRORS = (Exception,)


class Channels:
    """One channel per address, shared by all calls, and what each replica's health said lately."""

    def __init__(self):
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.dns: dict[str, tuple[float, list[str]]] = {}  # dns:///NAME:PORT -> (resolved at, addresses)
        self.health: dict[str, tuple[float, bool]] = {}  # address -> (checked at, serving)

    async def serving(self, address: str) -> bool:
        """Whether the replica's health says SERVING (a wedged stage's watchdog says NOT_SERVING);
        asked at most once a HEALTH_TTL_S per replica, and a replica that does not answer in
        HEALTH_TIMEOUT_S counts as not serving."""
        hit = self.health.get(address)
        if hit and time.monotonic() - hit[0] < HEALTH_TTL_S:
            return hit[1]
        try:
            reply = await health_pb2_grpc.HealthStub(self.get(address)).Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        self.health[address] = (time.monotonic(), ok)
        return ok

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
        self.address: str | None = None  # the replica this call's stream is on
        self.failed: set[str] = set()  # replicas whose stream broke during this call: tried last
        self.call = None

    async def candidates(self) -> list[str]:
        """The replicas in the order this call tries them: rendezvous order, those whose health
        says NOT_SERVING (wedged, draining) and those that already failed this call last (they may
        be back: a restarted container keeps its address)."""
        order = rendezvous_order(self.session_id, await resolve(self.addresses, self.channels.dns))
        if len(order) > 1:
            serving = dict(zip(order, await asyncio.gather(*(self.channels.serving(a) for a in order))))
            order = [a for a in order if serving[a]] + [a for a in order if not serving[a]]
        return [a for a in order if a not in self.failed] + [a for a in order if a in self.failed]

    async def open(self, rebuild: bool = False) -> None:
        errors, full = [], 0
        for attempt, address in enumerate(await self.candidates()):
            try:
                self.call = self.method(self.channels.get(address))(wait_for_ready=False)
                await asyncio.wait_for(self.opener(self, rebuild or attempt > 0), self.timeout_s)
                if attempt:
                    FAILOVERS.labels(self.stage).inc()
                    log.warning("stage_failover", stage=self.stage, session_id=self.session_id, address=address)
                self.address = address
                return
            except STREAM_ERRORS as e:
                rpc_error = isinstance(e, grpc.aio.AioRpcError)
                errors.append(f"{address}: {e.details() if rpc_error else repr(e)}")
                full += rpc_error and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                if not (rpc_error and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED):
                    self.failed.add(address)  # a full replica is not a broken one
                self.cancel()
        if errors and full == len(errors):
            raise StageFull(f"{self.stage} stage is at capacity on every replica ({'; '.join(errors)})")
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
            if self.address is not None:
                self.failed.add(self.address)
            await self.open(rebuild=True)
            await self.write(request)
            return await self.read()

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
