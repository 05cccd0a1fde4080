"""Contract of the session store: every test runs against MemoryStore and RedisStore (our own
redis-server), and both must behave the same."""
import asyncio
import time
import uuid

import pytest
import redis
from redis.crc import key_slot

from michi.session import (
    BadResumeToken,
    LeaseLost,
    MemoryStore,
    RedisStore,
    SessionBusy,
    SessionEnded,
    SessionExists,
    SessionNotFound,
    TranscriptEntry,
    open_store,
)

CONFIG = {"voice": "kal16", "sample_rate_hz": 24000, "duplex": True, "prompt": "héllo 日本 😀"}


def sid():
    return "call-" + uuid.uuid4().hex


def user(text, start, end):
    return TranscriptEntry("user", text, start, end)


def agent(text, start, end):
    return TranscriptEntry("agent", text, start, end)


def test_create_and_load(stores):
    async def body(store):
        s, before = sid(), int(time.time() * 1000)
        token = await store.create(s, CONFIG, ttl_s=60)
        rec = await store.load(s)
        assert rec.session_id == s and rec.config == CONFIG
        assert rec.transcript == [] and rec.history_len == 0 and rec.last_tick == -1
        assert rec.owner is None and rec.heard_samples is None and rec.ttl_s == 60
        assert before <= rec.created_ms == rec.updated_ms <= int(time.time() * 1000)
        assert isinstance(token, str) and len(token) >= 32
        assert await store.create(sid(), {}, ttl_s=60) != token  # random per session
        with pytest.raises(SessionExists):
            await store.create(s, {"other": 1}, ttl_s=60)
        assert (await store.load(s)).config == CONFIG  # the failed create changed nothing
        for call in (store.load(sid()), store.history(sid()), store.claim(sid(), "a", 5, token),
                     store.append_tick(sid(), [b"x"], [], 0), store.renew(sid(), "a", 5)):
            with pytest.raises(SessionNotFound):
                await call
    stores.run(body)


def test_claim_needs_the_resume_token(stores):
    async def body(store):
        s = sid()
        token = await store.create(s, CONFIG, ttl_s=60)
        with pytest.raises(BadResumeToken):
            await store.claim(s, "gw1", 5)  # no token, and no lease of our own
        with pytest.raises(BadResumeToken):
            await store.claim(s, "gw1", 5, resume_token=token[:-1] + "x")
        assert (await store.load(s)).owner is None  # failed claims took nothing
        rec = await store.claim(s, "gw1", 5, resume_token=token)
        assert rec.owner == "gw1" and rec.config == CONFIG
        assert (await store.claim(s, "gw1", 5)).owner == "gw1"  # own live lease: no token needed
        with pytest.raises(BadResumeToken):  # a wrong token fails even for the holder
            await store.claim(s, "gw1", 5, resume_token="nope")
    stores.run(body)


def test_second_client_is_busy_until_release(stores):
    async def body(store):
        other = stores.open()  # a second gateway on the same backend
        s = sid()
        token = await store.create(s, CONFIG, ttl_s=60)
        results = await asyncio.gather(store.claim(s, "gw1", 5, token),
                                       other.claim(s, "gw2", 5, token), return_exceptions=True)
        busy = [r for r in results if isinstance(r, SessionBusy)]
        won = [r for r in results if not isinstance(r, Exception)]
        assert len(busy) == 1 and len(won) == 1, results
        assert "already connected elsewhere" in str(busy[0])
        winner = won[0].owner
        loser = "gw2" if winner == "gw1" else "gw1"
        assert (await store.load(s)).owner == winner
        assert await store.release(s, loser) is False  # only the owner can release
        with pytest.raises(LeaseLost):
            await store.renew(s, loser, 5)
        with pytest.raises(SessionBusy):
            await other.claim(s, loser, 5, token)
        assert await store.release(s, winner) is True
        assert (await store.load(s)).owner is None
        assert (await other.claim(s, loser, 5, token)).owner == loser
        assert await store.release(s, winner) is False
    stores.run(body)


def test_lease_expires_by_itself_and_renew_extends_it(stores):
    async def body(store):
        s = sid()
        token = await store.create(s, CONFIG, ttl_s=60)
        await store.claim(s, "gw1", 0.5, token)
        await asyncio.sleep(0.3)
        await store.renew(s, "gw1", 0.5)  # now lives until ~0.8 s
        await asyncio.sleep(0.3)
        with pytest.raises(SessionBusy):  # at 0.6 s: alive only thanks to the renew
            await store.claim(s, "gw2", 5, token)
        await asyncio.sleep(0.4)  # at 1.0 s: the client vanished, its lease is gone
        assert (await store.load(s)).owner is None
        with pytest.raises(LeaseLost):  # a lapsed lease is not silently re-taken
            await store.renew(s, "gw1", 0.5)
        assert (await store.claim(s, "gw2", 5, token)).owner == "gw2"
    stores.run(body)


def test_append_tick_history_order_and_duplicates(stores):
    async def body(store):
        s = sid()
        await store.create(s, CONFIG, ttl_s=60)
        await store.append_history(s, [b"sys:prompt", b"\x00\xff binary"])
        assert await store.append_tick(s, [b"t0"], [user("hi", 0, 80)], 0)
        assert await store.append_tick(s, [b"t1a", b"t1b"], [], 1)
        assert await store.append_tick(s, [], [agent("hello", 80, 240)], 3)  # ticks may skip
        # a retry of an already recorded tick writes nothing
        assert not await store.append_tick(s, [b"dup"], [agent("dup", 0, 1)], 3)
        assert not await store.append_tick(s, [b"old"], [], 2)
        await store.append_transcript(s, [TranscriptEntry("tool", "42", 240, 240)])
        hist = [b"sys:prompt", b"\x00\xff binary", b"t0", b"t1a", b"t1b"]
        assert await store.history(s) == hist
        assert await store.history(s, start=3) == hist[3:]
        assert await store.history(s, start=len(hist)) == []
        rec = await store.load(s)
        assert rec.last_tick == 3 and rec.history_len == len(hist)
        assert [e.text for e in rec.transcript] == ["hi", "hello", "42"]
        assert rec.transcript[0] == user("hi", 0, 80)
    stores.run(body)


def test_append_tick_is_atomic_under_concurrency(stores):
    """Two writers race on one session: every accepted tick has all its history records
    contiguous and its transcript entry present, in the same order; rejected ticks left
    nothing behind. History and transcript never disagree."""
    async def body(store):
        other = stores.open()
        s = sid()
        await store.create(s, CONFIG, ttl_s=60)
        big = [f"rec{i}".encode() * 10 for i in range(1500)]  # > one Lua unpack chunk
        assert await store.append_tick(s, big, [], 0)

        async def tick(client, t):
            recs = [f"t{t}:{k}".encode() for k in range(3)]
            return t, await client.append_tick(s, recs, [agent(f"w{t}", t * 80, t * 80 + 80)], t)
        results = await asyncio.gather(*(tick(store if t % 2 else other, t) for t in range(1, 41)))
        accepted = [t for t, ok in results if ok]
        assert accepted
        hist = (await store.history(s))[len(big):]
        assert hist == [f"t{t}:{k}".encode() for t in accepted for k in range(3)]
        rec = await store.load(s)
        assert [e.text for e in rec.transcript] == [f"w{t}" for t in accepted]
        assert rec.last_tick == max(accepted) and rec.history_len == len(big) + 3 * len(accepted)
        assert (await store.history(s))[:len(big)] == big
    stores.run(body)


def test_writes_are_fenced_by_the_lease_owner(stores):
    async def body(store):
        s = sid()
        token = await store.create(s, CONFIG, ttl_s=60)
        await store.claim(s, "gw1", 5, token)
        assert await store.append_tick(s, [b"a"], [user("a", 0, 1)], 0, owner="gw1")
        for write in (store.append_tick(s, [b"b"], [user("b", 1, 2)], 1, owner="gw2"),
                      store.append_history(s, [b"b"], owner="gw2"),
                      store.append_transcript(s, [user("b", 1, 2)], owner="gw2"),
                      store.mark_cut_off(s, 0, 0, owner="gw2")):
            with pytest.raises(LeaseLost):
                await write
        rec = await store.load(s)
        assert rec.last_tick == 0 and rec.history_len == 1 and len(rec.transcript) == 1
        assert rec.heard_samples is None
    stores.run(body)


def test_mark_cut_off_marks_only_unheard_agent_entries(stores):
    async def body(store):
        s = sid()
        await store.create(s, CONFIG, ttl_s=60)
        await store.append_transcript(s, [
            agent("Sure,", 0, 400), agent("the café", 400, 900), user("hmm", 500, 700),
            agent("opens 日本", 1000, 1500), user("wait!", 1100, 1400),
            agent("at nine 😀", 1500, 2000)])
        # barge-in: playback stopped at 1000 ms, 24000 agent samples were heard
        assert await store.mark_cut_off(s, 1000, 24000) == 2
        rec = await store.load(s)
        got = [(e.speaker, e.text, e.cut_off, e.heard_samples) for e in rec.transcript]
        assert got == [("agent", "Sure,", False, None), ("agent", "the café", False, None),
                       ("user", "hmm", False, None), ("agent", "opens 日本", True, 24000),
                       ("user", "wait!", False, None), ("agent", "at nine 😀", True, 24000)]
        assert rec.heard_samples == 24000
        assert rec.transcript[3].start_ms == 1000 and rec.transcript[3].end_ms == 1500
        # the agent talks again and is cut once more: earlier cuts keep their first marking
        await store.append_transcript(s, [agent("Okay.", 3000, 3300), agent("So", 3300, 3500)])
        assert await store.mark_cut_off(s, 3300, 79200) == 1
        rec = await store.load(s)
        assert [(e.cut_off, e.heard_samples) for e in rec.transcript if e.speaker == "agent"] == [
            (False, None), (False, None), (True, 24000), (True, 24000), (False, None),
            (True, 79200)]
        assert rec.heard_samples == 79200
    stores.run(body)


def test_mark_cut_off_on_a_long_transcript(stores):
    """Cuts spanning many entries (the Redis script scans in chunks)."""
    async def body(store):
        s = sid()
        await store.create(s, CONFIG, ttl_s=60)
        entries = []
        for i in range(300):
            entries.append(agent(f"a{i}", i * 100, i * 100 + 90))
            if i % 7 == 0:
                entries.append(user(f"u{i}", i * 100 + 50, i * 100 + 60))
        await store.append_transcript(s, entries)
        assert await store.mark_cut_off(s, 13_000, 5) == 170  # a130 .. a299
        rec = await store.load(s)
        assert rec.transcript == [
            TranscriptEntry(e.speaker, e.text, e.start_ms, e.end_ms, True, 5)
            if e.speaker == "agent" and e.start_ms >= 13_000 else e for e in entries]
    stores.run(body)


def test_ttl_slides_with_writes_then_the_session_is_gone(stores):
    async def body(store):
        s, keep = sid(), sid()
        token = await store.create(s, CONFIG, ttl_s=0.8)
        await store.create(keep, CONFIG, ttl_s=60)
        await store.claim(s, "gw1", 0.2, token)
        await store.append_tick(s, [b"h"], [user("u", 0, 1)], 0)
        await asyncio.sleep(0.5)
        await store.append_tick(s, [b"h2"], [], 1)  # refreshes the TTL of every key
        await asyncio.sleep(0.5)  # 1.0 s after create, 0.5 s after the last write
        rec = await store.load(s)
        assert rec.history_len == 2 and len(rec.transcript) == 1 and rec.owner is None
        await asyncio.sleep(0.5)  # 1.0 s after the last write
        for call in (store.load(s), store.history(s), store.claim(s, "gw1", 1, token),
                     store.append_transcript(s, [user("late", 5, 6)])):
            with pytest.raises(SessionNotFound):
                await call
        assert (await store.load(keep)).config == CONFIG  # other sessions are untouched
        token2 = await store.create(s, {"new": True}, ttl_s=60)  # the id is free again
        rec = await store.load(s)
        assert rec.config == {"new": True} and rec.history_len == 0 and rec.transcript == []
        assert (await store.claim(s, "gw9", 5, token2)).owner == "gw9"
    stores.run(body)


def test_delete(stores):
    async def body(store):
        s = sid()
        token = await store.create(s, CONFIG, ttl_s=60)
        await store.claim(s, "gw1", 5, token)
        await store.append_tick(s, [b"h"], [user("u", 0, 1)], 0)
        assert await store.delete(s) is True
        assert await store.delete(s) is False
        with pytest.raises(SessionNotFound):
            await store.load(s)
        await store.create(s, CONFIG, ttl_s=60)
        assert (await store.load(s)).owner is None  # the old lease went with it
    stores.run(body)


def test_an_ended_call_cannot_be_resumed(stores):
    async def body(store):
        s = sid()
        token = await store.create(s, CONFIG, ttl_s=60)
        assert (await store.load(s)).ended is False
        await store.claim(s, "gw1", 5, token)
        await store.append_history(s, [b"sys:prompt"], owner="gw1")
        assert await store.append_tick(s, [b"t0"], [user("hi", 0, 80)], 0, owner="gw1")
        await store.end(s, "gw1")
        for who, tok in (("gw1", token), ("gw2", token)):  # the old owner too
            with pytest.raises(SessionEnded) as err:
                await store.claim(s, who, 5, tok)
            assert str(err.value) == f"session {s} ended (END_CALL); it cannot be resumed"
            assert err.value.grpc_status == "FAILED_PRECONDITION"
        with pytest.raises(BadResumeToken):  # the token is still checked first
            await store.claim(s, "gw2", 5, "nope")
        rec = await store.load(s)  # still readable until the TTL, with nobody holding it
        assert rec.ended is True and rec.owner is None
        assert rec.transcript == [user("hi", 0, 80)] and rec.last_tick == 0
        assert rec.history_len == 2 and rec.config == CONFIG
        assert await store.history(s) == [b"sys:prompt", b"t0"]
        assert await store.release(s, "gw1") is False  # harmless: nothing to free
        with pytest.raises(LeaseLost):  # the lease went with the end
            await store.renew(s, "gw1", 5)
        with pytest.raises(LeaseLost):
            await store.append_tick(s, [b"t1"], [], 1, owner="gw1")
        rec2 = await store.load(s)
        assert rec2.ended is True and rec2.history_len == 2 and rec2.last_tick == 0
    stores.run(body)


def test_only_the_lease_holder_ends_a_call(stores):
    async def body(store):
        s = sid()
        token = await store.create(s, CONFIG, ttl_s=60)
        with pytest.raises(LeaseLost):  # nobody holds it
            await store.end(s, "gw1")
        await store.claim(s, "gw1", 5, token)
        with pytest.raises(LeaseLost):
            await store.end(s, "gw2")
        rec = await store.load(s)
        assert rec.ended is False and rec.owner == "gw1"  # the failed end changed nothing
        with pytest.raises(SessionNotFound):
            await store.end(sid(), "gw1")
        await store.release(s, "gw1")
        assert (await store.claim(s, "gw2", 5, token)).owner == "gw2"  # still resumable
        await store.end(s, "gw2")
        with pytest.raises(LeaseLost):  # a second end finds no lease
            await store.end(s, "gw2")
        assert (await store.load(s)).ended is True
    stores.run(body)


def test_an_ended_session_still_expires(stores):
    async def body(store):
        s = sid()
        token = await store.create(s, CONFIG, ttl_s=0.5)
        await store.claim(s, "gw1", 5, token)
        await store.end(s, "gw1")
        assert (await store.load(s)).ended is True
        await asyncio.sleep(0.7)
        with pytest.raises(SessionNotFound):
            await store.load(s)
        await store.create(s, CONFIG, ttl_s=60)  # the id can be reused: a fresh call
        assert (await store.load(s)).ended is False
    stores.run(body)


def test_ping_and_config_must_be_json(stores):
    async def body(store):
        assert await store.ping() is True
        with pytest.raises(TypeError):
            await store.create(sid(), {"bad": object()}, ttl_s=60)
        with pytest.raises(ValueError):
            TranscriptEntry("narrator", "x", 0, 1)
    stores.run(body)


def test_redis_keys_share_a_slot_and_all_carry_the_ttl(redis_server):
    async def body():
        store = RedisStore(redis_server.url)
        try:
            s = sid()
            token = await store.create(s, CONFIG, ttl_s=30)
            await store.claim(s, "gw1", 5, token)
            await store.append_tick(s, [b"h"], [user("u", 0, 1)], 0)
            return s
        finally:
            await store.close()
    s = asyncio.run(body())
    keys = RedisStore.keys(s)
    assert all(f"{{{s}}}" in k for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1  # one cluster slot per session
    with redis.Redis(port=redis_server.port) as r:
        ttls = [r.pttl(k) for k in keys]
    assert all(25_000 < t <= 30_000 for t in ttls[:1] + ttls[2:]), ttls
    assert 0 < ttls[1] <= 5_000, ttls  # the lease has its own, shorter expiry


def test_open_store_picks_the_store_from_redis_url(monkeypatch, redis_server):
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert isinstance(open_store(), MemoryStore)
    assert isinstance(open_store(None), MemoryStore)
    monkeypatch.setenv("REDIS_URL", redis_server.url)

    async def body():
        store = open_store(ttl_s=12)
        try:
            assert isinstance(store, RedisStore) and store.default_ttl_s == 12
            s = sid()
            await store.create(s, {})
            return (await store.load(s)).ttl_s
        finally:
            await store.close()
    assert asyncio.run(body()) == 12
