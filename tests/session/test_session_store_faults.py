"""Faults of the Redis store: Redis down at start, Redis that never answers, Redis killed mid-call
and restarted, two clients claiming one session. Every failure must come fast (never a hang)
as StoreUnavailable with a message that says where the store is."""
import asyncio
import socket
import time
import uuid

import pytest
from structlog.testing import capture_logs

from michi.session import (
    LeaseLost,
    RedisStore,
    SessionBusy,
    SessionNotFound,
    StoreUnavailable,
    TranscriptEntry,
    open_store,
)

BOUND_S = 3.0  # every failing call must raise within this


async def fails_fast(call):
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await call
    elapsed = time.monotonic() - t0
    assert elapsed < BOUND_S, f"took {elapsed:.2f} s"
    return str(info.value)


def test_redis_down_at_start_fails_fast_with_a_clear_error(unused_port):
    url = f"redis://127.0.0.1:{unused_port}/0"

    async def body():
        store = open_store(url)
        try:
            with capture_logs() as logs:
                msg = await fails_fast(store.ping())
                await fails_fast(store.create("call-1", {}, ttl_s=60))
                await fails_fast(store.load("call-1"))
            return msg, logs
        finally:
            await store.close()
    msg, logs = asyncio.run(body())
    assert msg.startswith(f"session store at {url} unreachable: ")
    assert [(e["event"], e["op"]) for e in logs] == [
        ("session_store_unavailable", "ping"), ("session_store_unavailable", "create"),
        ("session_store_unavailable", "load")]
    assert logs[1]["session_id"] == "call-1" and logs[1]["store"] == url


def test_password_is_not_in_the_error(unused_port):
    url = f"redis://:hunter2@127.0.0.1:{unused_port}/0"

    async def body():
        store = RedisStore(url)
        try:
            return await fails_fast(store.ping())
        finally:
            await store.close()
    msg = asyncio.run(body())
    assert "hunter2" not in msg and ":***@127.0.0.1" in msg


def test_a_redis_that_never_answers_does_not_hang():
    """The TCP connection is accepted (by the kernel's backlog) but no reply ever comes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def body():
            store = RedisStore(url)
            try:
                msg = await fails_fast(store.ping())
                await fails_fast(store.append_tick("call-1", [b"h"], [], 0))
                return msg
            finally:
                await store.close()
        msg = asyncio.run(body())
    assert msg.startswith(f"session store at {url} unreachable: ")


def test_redis_killed_mid_call_then_restarted(own_redis):
    """The server keeps nothing (no RDB, no AOF), so the call's data dies with it: the store
    says so (SessionNotFound) and works again as soon as Redis is back on the same port."""
    async def body():
        store = RedisStore(own_redis.url)
        try:
            s = "call-" + uuid.uuid4().hex
            token = await store.create(s, {"voice": "slt"}, ttl_s=60)
            await store.claim(s, "gw1", 5, token)
            assert await store.append_tick(s, [b"t0"], [TranscriptEntry("user", "hi", 0, 80)], 0)

            own_redis.kill()
            msg = await fails_fast(store.append_tick(s, [b"t1"], [], 1))
            assert msg.startswith(f"session store at {own_redis.url} unreachable: ")
            for call in (store.load(s), store.renew(s, "gw1", 5), store.history(s),
                         store.mark_cut_off(s, 0, 0), store.ping()):
                await fails_fast(call)

            own_redis.start()  # same port, empty
            assert await store.ping() is True
            with pytest.raises(SessionNotFound):  # lost with the server, as expected here
                await store.load(s)
            token = await store.create(s, {"voice": "slt"}, ttl_s=60)  # scripts reloaded
            await store.claim(s, "gw1", 5, token)
            assert await store.append_tick(s, [b"t1"], [], 1)
            rec = await store.load(s)
            assert rec.owner == "gw1" and rec.last_tick == 1 and rec.history_len == 1
        finally:
            await store.close()
    asyncio.run(body())


def test_call_survives_a_redis_crash_when_redis_persists(redis_factory):
    """With AOF (appendfsync always) a SIGKILLed Redis comes back with the call intact, and the
    same store object carries on (its scripts are reloaded on NOSCRIPT)."""
    server = redis_factory(extra_args=["--appendonly", "yes", "--appendfsync", "always"])

    async def body():
        store = RedisStore(server.url)
        try:
            s = "call-" + uuid.uuid4().hex
            token = await store.create(s, {"voice": "awb"}, ttl_s=60)
            await store.claim(s, "gw1", 5, token)
            await store.append_tick(s, [b"t0"], [TranscriptEntry("agent", "Hi", 0, 80)], 0)
            server.kill()
            await fails_fast(store.append_tick(s, [b"t1"], [], 1))
            server.start()
            assert await store.append_tick(s, [b"t1"], [], 1)  # the gateway retries
            server.kill()  # a restart between two ticks: the dead pooled connection is
            server.start()  # replaced on the spot, the caller sees no error
            assert await store.append_tick(s, [b"t2"], [], 2)
            await store.mark_cut_off(s, 0, 1920)
            rec = await store.load(s)
            assert rec.owner == "gw1" and rec.last_tick == 2 and rec.heard_samples == 1920
            assert await store.history(s) == [b"t0", b"t1", b"t2"]
            assert [(e.text, e.cut_off) for e in rec.transcript] == [("Hi", True)]
        finally:
            await store.close()
    asyncio.run(body())


def test_two_clients_one_session_lease_expiry(redis_server):
    """Client 1 vanishes without releasing: client 2 is refused until the lease runs out,
    then takes the call over; client 1 learns it lost the call."""
    async def body():
        gw1, gw2 = RedisStore(redis_server.url), RedisStore(redis_server.url)
        try:
            s = "call-" + uuid.uuid4().hex
            token = await gw1.create(s, {}, ttl_s=60)
            await gw1.claim(s, "conn-1", 0.4, token)
            with pytest.raises(SessionBusy, match="already connected elsewhere"):
                await gw2.claim(s, "conn-2", 5, token)
            await asyncio.sleep(0.6)
            rec = await gw2.claim(s, "conn-2", 5, token)
            assert rec.owner == "conn-2"
            with pytest.raises(LeaseLost):
                await gw1.renew(s, "conn-1", 0.4)
            with pytest.raises(LeaseLost):  # and cannot write into the call any more
                await gw1.append_tick(s, [b"stale"], [], 7, owner="conn-1")
            assert await gw2.history(s) == []
        finally:
            await gw1.close()
            await gw2.close()
    asyncio.run(body())
