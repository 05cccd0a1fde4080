"""What every stage's gRPC server has: health checking, reflection, keepalive, message size
limits, graceful drain on SIGTERM, JSON logs, Prometheus metrics, optional TLS. (The gateway checks
its optional bearer token itself, see services/gateway/server.py.)"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Iterable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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
        reflection.enable_server_reflection(self.services + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        address = f"{host}:{port}"
        if tls:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])  # (key, cert)
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        self.log = structlog.get_logger().bind(stage=name, port=self.port)

    async def start(self) -> None:
        await self.server.start()
        for svc in self.services + [""]:
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        self.log.info("stage_started")

    async def drain(self) -> None:
        """Stop taking calls (health says NOT_SERVING), let live calls finish for drain_s, stop."""
        self.log.info("stage_draining", drain_s=self.drain_s)
        for svc in self.services + [""]:
            await self.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
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


def model_executor() -> ThreadPoolExecutor:
    """Model math runs off the event loop (torch releases the GIL), one call at a time per stage."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


def start_metrics(port: int | None, host: str | None = None) -> None:
    """Prometheus endpoint on `host` (default MICHI_METRICS_HOST, else 127.0.0.1: in a container
    set it to 0.0.0.0 so the cluster's Prometheus can scrape it)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host or os.environ.get("MICHI_METRICS_HOST", "127.0.0.1"))
