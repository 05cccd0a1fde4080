"""What every stage's gRPC server has: health checking, reflection (v1 and v1alpha), keepalive,
message size limits, graceful drain on SIGTERM, JSON logs, Prometheus metrics, optional TLS, a
watchdog and a capacity health service. (The gateway checks its optional bearer token itself, see
services/gateway/server.py.)

Health services of a stage:
- "" and each of the stage's own services (e.g. "michi.backbone.v1.Backbone"): liveness. SERVING
  while the stage runs and its work loop moves; NOT_SERVING while a liveness probe (see
  `Stage.add_liveness_probe`, liveness.py) finds it stuck, SERVING again once it recovers, and
  NOT_SERVING for good once it drains.
- "michi.capacity" (admission.py): readiness for one more call. SERVING, NOT_SERVING while the
  stage is at capacity (`Stage.set_full`) and once it drains."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Awaitable, Callable, Iterable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .admission import CAPACITY_HEALTH_SERVICE
from .liveness import WATCHDOG_INTERVAL_S, WatchedExecutor
from .metrics import STAGE_STUCK
from .reflection import enable_reflection

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one message; audio chunks are far smaller
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
CHANNEL_OPTIONS = KEEPALIVE + [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def configure_logging(stage: str) -> structlog.BoundLogger:
    """One JSON object per event on stderr, with the stage name (and session id, tick where bound)."""
    logging.basicConfig(level=os.environ.get("MICHI_LOG_LEVEL", "INFO"), stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr), cache_logger_on_first_use=True)
    structlog.contextvars.bind_contextvars(stage=stage)  # on every event of this process
    return structlog.get_logger()


class Stage:
    """A running gRPC server for one stage."""

    def __init__(self, name: str, service_names: Iterable[str], register: Callable[[grpc.aio.Server], None],
                 port: int, host: str = "127.0.0.1", tls: tuple[bytes, bytes] | None = None,
                 drain_s: float = 5.0):
        self.name, self.port, self.host, self.drain_s = name, port, host, drain_s
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS)
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services = list(service_names)
        enable_reflection(self.services + [health.SERVICE_NAME], self.server)
        self.probes: list[Callable[[], str | None]] = []
        self.stuck: str | None = None  # why the last watchdog check found the stage stuck
        self.full = False
        self.draining = False
        self._watchdog: asyncio.Task | None = None
        self._capacity_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task] = set()
        address = f"{host}:{port}"
        if tls:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])  # (key, cert)
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        self.log = structlog.get_logger().bind(stage=name, port=self.port)

    # ---- liveness ---------------------------------------------------------------------------------
    def add_liveness_probe(self, probe: Callable[[], str | None]) -> None:
        """`probe()` returns None while the stage's work loop moves, else why it is stuck. The
        watchdog calls every probe each `WATCHDOG_INTERVAL_S` (on the event loop: a probe must be
        quick and must not block); while any says stuck, the liveness health services ("" and the
        stage's own) say NOT_SERVING."""
        self.probes.append(probe)

    def check_liveness(self) -> str | None:
        """Why the stage is stuck now (the first probe that says so), or None."""
        for probe in self.probes:
            try:
                reason = probe()
            except Exception as e:  # noqa: BLE001 - a broken probe counts as stuck
                reason = f"liveness probe failed: {e!r}"
            if reason:
                return reason
        return None

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            reason = self.check_liveness()
            if self.draining:
                return
            try:
                if reason and not self.stuck:
                    self.log.error("stage_wedged", reason=reason)
                    STAGE_STUCK.labels(self.name).set(1)
                    await self._set_liveness(NOT_SERVING)
                elif self.stuck and not reason:
                    self.log.info("stage_recovered", was=self.stuck)
                    STAGE_STUCK.labels(self.name).set(0)
                    await self._set_liveness(SERVING)
                self.stuck = reason
            except Exception:  # noqa: BLE001 - the watchdog itself must not stop
                self.log.exception("stage_watchdog_failed")

    async def _set_liveness(self, status) -> None:
        for svc in self.services + [""]:
            await self.health.set(svc, status)

    # ---- capacity ---------------------------------------------------------------------------------
    def set_full(self, full: bool) -> None:
        """Admission's `on_full_changed`: the `michi.capacity` health service says NOT_SERVING while
        the stage is full. Callable from synchronous code on the event loop."""
        self.full = full
        self.log.info("stage_full" if full else "stage_has_room")
        task = asyncio.get_running_loop().create_task(self._publish_capacity())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_capacity(self) -> None:
        if self._capacity_lock is None:
            self._capacity_lock = asyncio.Lock()
        async with self._capacity_lock:  # FIFO: the last publish reads the latest state
            if not self.draining:
                await self.health.set(CAPACITY_HEALTH_SERVICE, NOT_SERVING if self.full else SERVING)

    # ---- life ---------------------------------------------------------------------------------------
    async def start(self, watchdog_interval_s: float = WATCHDOG_INTERVAL_S) -> None:
        await self.server.start()
        await self._set_liveness(SERVING)
        await self.health.set(CAPACITY_HEALTH_SERVICE, NOT_SERVING if self.full else SERVING)
        STAGE_STUCK.labels(self.name).set(0)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(watchdog_interval_s))
        self.log.info("stage_started")

    async def drain(self) -> None:
        """Stop taking calls (health says NOT_SERVING), let live calls finish for drain_s, stop."""
        self.log.info("stage_draining", drain_s=self.drain_s)
        self.draining = True
        if self._watchdog:
            self._watchdog.cancel()
        await self._set_liveness(NOT_SERVING)
        await self.health.set(CAPACITY_HEALTH_SERVICE, NOT_SERVING)
        await self.server.stop(self.drain_s)
        self.log.info("stage_stopped")

    async def serve_forever(self, on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.drain()
        if on_stop:
            await on_stop()


def model_executor() -> WatchedExecutor:
    """Model math runs off the event loop (torch releases the GIL), one call at a time per stage;
    every call timed, so that a stuck model call is seen (`WatchedExecutor.stalled`)."""
    return WatchedExecutor(max_workers=1, thread_name_prefix="model")


def start_metrics(port: int | None, host: str | None = None) -> None:
    """Prometheus endpoint on `host` (default MICHI_METRICS_HOST, else 127.0.0.1: in a container
    set it to 0.0.0.0 so the cluster's Prometheus can scrape it)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host or os.environ.get("MICHI_METRICS_HOST", "127.0.0.1"))
