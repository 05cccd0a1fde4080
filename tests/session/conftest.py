"""Fixtures for the session store tests: our own redis-server processes (so a test can kill one),
and `stores`, which runs one async test body against each store."""
import asyncio
import shutil
import signal
import socket
import subprocess
import time

import pytest
import redis

from michi.session import MemoryStore, RedisStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 that keeps nothing on disk."""

    def __init__(self, workdir, port=None, extra_args=()):
        self.workdir, self.port, self.proc = workdir, port or free_port(), None
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.2)
        deadline = time.monotonic() + 5
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.proc.stderr.read().decode()}")
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self):
        """A crash: SIGKILL, nothing flushed."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def redis_binary():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")


@pytest.fixture(scope="session")
def redis_server(redis_binary, tmp_path_factory):
    """One server for the contract tests (each test uses its own session ids)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(redis_binary, tmp_path):
    """A server this test may kill and restart."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory(redis_binary, tmp_path):
    """make(**RedisServer kwargs) -> a started server, stopped after the test."""
    servers = []

    def make(**kwargs):
        servers.append(RedisServer(tmp_path / f"redis{len(servers)}", **kwargs))
        servers[-1].workdir.mkdir()
        return servers[-1].start()
    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def unused_port():
    """A port nothing listens on."""
    return free_port()


class Stores:
    """Runs `async def body(store)` in a fresh event loop against one kind of store.
    `open()` (inside body) gives another client of the same backend: a second gateway."""

    def __init__(self, kind, redis_url=None):
        self.kind, self.redis_url = kind, redis_url
        self._memory, self._opened = None, []

    def open(self, **kwargs):
        if self.kind == "memory":  # one process: every "client" shares the one store
            self._memory = self._memory or MemoryStore(**kwargs)
            return self._memory
        store = RedisStore(self.redis_url, **kwargs)
        self._opened.append(store)
        return store

    def run(self, body, **kwargs):
        async def main():
            try:
                return await body(self.open(**kwargs))
            finally:
                for store in self._opened:
                    await store.close()
                self._opened.clear()
        return asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def stores(request):
    if request.param == "memory":
        return Stores("memory")
    return Stores("redis", request.getfixturevalue("redis_server").url)
