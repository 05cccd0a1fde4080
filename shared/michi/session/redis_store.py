"""Redis session store, shared by every gateway replica.

Keys of one session (the `{id}` hash tag keeps them on one cluster slot, so the Lua scripts
that update them together are legal on a cluster too):
    michi:session:{id}:meta        hash: config, token (sha256), ttl_ms, created_ms,
                                   updated_ms, last_tick, heard_samples, ended (set
                                   to 1 by `end`; absent while the call is live)
    michi:session:{id}:lease       string: owner, with PX = the lease
    michi:session:{id}:transcript  list: TranscriptEntry JSON, in order
    michi:session:{id}:history     list: opaque history records, in order
Every update is one Lua script (atomic, and it checks the session exists so a write after
expiry cannot leave orphan keys). Every call is bounded: 1 s to connect, 1 s per socket read,
one retry on a broken pooled connection, and a hard `op_timeout_s` around it all.
"""
from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .store import (
    DEFAULT_TTL_S,
    BadResumeToken,
    LeaseLost,
    SessionBusy,
    SessionEnded,
    SessionExists,
    SessionNotFound,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    TranscriptEntry,
    check_config,
    check_owner,
    ended_message,
    new_resume_token,
    token_hash,
)

log = structlog.get_logger()

PREFIX = "michi:session"

# Errors that mean "Redis is not there (or not usable) right now", as opposed to a bug.
UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError,
               rexc.OutOfMemoryError, rexc.ClusterDownError, rexc.TryAgainError,
               asyncio.TimeoutError, TimeoutError, OSError)

# KEYS: meta, lease, transcript, history. Scripts answer {status, ...}: plain values rather
# than error replies, whose prefixes redis-py maps onto its own exception classes.
_PRELUDE = """
local meta, lease, transcript, history = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function touch(now)
  local ttl = redis.call('HGET', meta, 'ttl_ms')
  redis.call('HSET', meta, 'updated_ms', now)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', transcript, ttl)
  redis.call('PEXPIRE', history, ttl)
end
local function push(key, from, to)  -- RPUSH ARGV[from..to]; unpack has a stack limit
  local i = from
  while i <= to do
    local j = math.min(i + 999, to)
    redis.call('RPUSH', key, unpack(ARGV, i, j))
    i = j + 1
  end
end
local function writable(owner)
  if redis.call('EXISTS', meta) == 0 then return {'notfound'} end
  if owner ~= '' and redis.call('GET', lease) ~= owner then return {'lost'} end
  return nil
end
"""

_CREATE = """  -- config, token_hash, ttl_ms, now
if redis.call('EXISTS', meta) == 1 then return {'exists'} end
redis.call('DEL', lease, transcript, history)
redis.call('HSET', meta, 'config', ARGV[1], 'token', ARGV[2], 'ttl_ms', ARGV[3],
           'created_ms', ARGV[4], 'updated_ms', ARGV[4], 'last_tick', -1)
redis.call('PEXPIRE', meta, ARGV[3])
return {'ok'}
"""

_CLAIM = """  -- owner, token_hash or '', lease_ms, now
if redis.call('EXISTS', meta) == 0 then return {'notfound'} end
local holder = redis.call('GET', lease)
if ARGV[2] == '' then
  if holder ~= ARGV[1] then return {'notoken'} end
elseif redis.call('HGET', meta, 'token') ~= ARGV[2] then
  return {'badtoken'}
end
if redis.call('HEXISTS', meta, 'ended') == 1 then return {'ended'} end
if holder and holder ~= ARGV[1] then return {'busy', holder} end
redis.call('SET', lease, ARGV[1], 'PX', ARGV[3])
touch(ARGV[4])
return {'ok', holder or ''}
"""

_RENEW = """  -- owner, lease_ms, now
local err = writable(ARGV[1]); if err then return err end
redis.call('SET', lease, ARGV[1], 'PX', ARGV[2])
touch(ARGV[3])
return {'ok'}
"""

_RELEASE = """  -- owner, now
if redis.call('EXISTS', meta) == 0 or redis.call('GET', lease) ~= ARGV[1] then
  return {'no'}
end
redis.call('DEL', lease)
touch(ARGV[2])
return {'ok'}
"""

_END = """  -- owner, now
local err = writable(ARGV[1]); if err then return err end
redis.call('HSET', meta, 'ended', 1)
redis.call('DEL', lease)
touch(ARGV[2])
return {'ok'}
"""

_APPEND = """  -- owner, now, items... (KEYS[5] is the list to append to)
local err = writable(ARGV[1]); if err then return err end
push(KEYS[5], 3, #ARGV)
touch(ARGV[2])
return {'ok'}
"""

_APPEND_TICK = """  -- owner, now, tick, n_history, history..., transcript...
local err = writable(ARGV[1]); if err then return err end
local last = tonumber(redis.call('HGET', meta, 'last_tick'))
if tonumber(ARGV[3]) <= last then return {'duplicate', last} end
local n = tonumber(ARGV[4])
push(history, 5, 4 + n)
push(transcript, 5 + n, #ARGV)
redis.call('HSET', meta, 'last_tick', ARGV[3])
touch(ARGV[2])
return {'ok'}
"""

# Newest first; agent entries are in start_ms order, so the first agent entry that started
# before after_ms ends the scan (a barge-in costs what it cuts, not the whole transcript).
_MARK_CUT_OFF = """  -- owner, now, after_ms, heard_samples
local err = writable(ARGV[1]); if err then return err end
local after, heard = tonumber(ARGV[3]), tonumber(ARGV[4])
local marked, i, done = 0, redis.call('LLEN', transcript) - 1, false
while i >= 0 and not done do
  local lo = math.max(0, i - 63)
  local chunk = redis.call('LRANGE', transcript, lo, i)
  for j = #chunk, 1, -1 do
    local e = cjson.decode(chunk[j])
    if e.speaker == 'agent' then
      if e.start_ms < after then done = true; break end
      if not e.cut_off then
        e.cut_off = true
        e.heard_samples = heard
        redis.call('LSET', transcript, lo + j - 1, cjson.encode(e))
        marked = marked + 1
      end
    end
  end
  i = lo - 1
end
redis.call('HSET', meta, 'heard_samples', ARGV[4])
touch(ARGV[2])
return {'ok', marked}
"""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


class RedisStore(SessionStore):
    def __init__(self, url: str, *, ttl_s: float = DEFAULT_TTL_S, connect_timeout_s: float = 1.0,
                 socket_timeout_s: float = 1.0, op_timeout_s: float = 2.5):
        self.default_ttl_s = ttl_s
        self.where = redact(url)
        self._op_timeout_s = op_timeout_s
        self._redis = aioredis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
            # one retry, at once, on a broken connection only: a pooled connection to a Redis
            # that restarted is replaced; a timed-out write is not replayed.
            retry=Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
            retry_on_timeout=False, decode_responses=False)
        script = lambda body: self._redis.register_script(_PRELUDE + body)  # noqa: E731
        self._create, self._claim, self._renew = script(_CREATE), script(_CLAIM), script(_RENEW)
        self._release, self._append = script(_RELEASE), script(_APPEND)
        self._append_tick, self._mark_cut_off = script(_APPEND_TICK), script(_MARK_CUT_OFF)
        self._end = script(_END)

    @staticmethod
    def keys(session_id: str) -> list[str]:
        base = f"{PREFIX}:{{{session_id}}}"
        return [f"{base}:meta", f"{base}:lease", f"{base}:transcript", f"{base}:history"]

    async def _bounded(self, op: str, session_id: str | None, call):
        """Run one Redis call; StoreUnavailable within op_timeout_s if Redis is not there."""
        try:
            return await asyncio.wait_for(call(), self._op_timeout_s)
        except UNAVAILABLE as e:
            reason = str(e) or type(e).__name__
            log.warning("session_store_unavailable", store=self.where, op=op,
                        session_id=session_id, error=reason)
            raise StoreUnavailable(f"session store at {self.where} unreachable: {reason}") from e

    async def _script(self, op, session_id, script, args, extra_keys=()):
        keys = self.keys(session_id) + list(extra_keys)
        reply = await self._bounded(op, session_id, lambda: script(keys=keys, args=args))
        status = reply[0].decode()
        if status == "notfound":
            raise SessionNotFound(f"session {session_id} not found (never created, or expired)")
        if status == "lost":
            raise LeaseLost(f"session {session_id}: {args[0]} no longer holds its lease")
        return status, reply[1:]

    async def create(self, session_id, config, ttl_s=None):
        if not isinstance(session_id, str) or not session_id:
            raise ValueError("session_id must be a non-empty string")
        ttl_s = self.default_ttl_s if ttl_s is None else ttl_s
        token = new_resume_token()
        status, _ = await self._script("create", session_id, self._create, [
            check_config(config), token_hash(token), _ms(ttl_s), _now_ms()])
        if status == "exists":
            raise SessionExists(f"session {session_id} already exists")
        log.info("session_created", session_id=session_id, ttl_s=ttl_s)
        return token

    async def claim(self, session_id, owner, lease_s, resume_token=None):
        check_owner(owner)
        token = "" if resume_token is None else token_hash(resume_token)
        status, rest = await self._script("claim", session_id, self._claim,
                                          [owner, token, _ms(lease_s), _now_ms()])
        if status == "notoken":
            raise BadResumeToken(f"session {session_id}: a resume token is required")
        if status == "badtoken":
            raise BadResumeToken(f"session {session_id}: wrong resume token")
        if status == "ended":
            raise SessionEnded(ended_message(session_id))
        if status == "busy":
            log.info("session_busy", session_id=session_id, owner=owner,
                     holder=rest[0].decode())
            raise SessionBusy(f"session {session_id} is already connected elsewhere")
        log.info("session_claimed", session_id=session_id, owner=owner, lease_s=lease_s,
                 resumed=resume_token is not None and rest[0] == b"")
        return await self.load(session_id)

    async def renew(self, session_id, owner, lease_s):
        check_owner(owner)
        await self._script("renew", session_id, self._renew, [owner, _ms(lease_s), _now_ms()])

    async def release(self, session_id, owner):
        status, _ = await self._script("release", session_id, self._release,
                                       [owner, _now_ms()])
        if status != "ok":
            return False
        log.info("session_released", session_id=session_id, owner=owner)
        return True

    async def end(self, session_id, owner):
        check_owner(owner)
        await self._script("end", session_id, self._end, [owner, _now_ms()])
        log.info("session_ended", session_id=session_id, owner=owner)

    async def append_transcript(self, session_id, entries, *, owner=None):
        if entries:
            await self._script("append_transcript", session_id, self._append,
                               [owner or "", _now_ms(), *(e.to_json() for e in entries)],
                               extra_keys=[self.keys(session_id)[2]])

    async def append_history(self, session_id, records, *, owner=None):
        if records:
            await self._script("append_history", session_id, self._append,
                               [owner or "", _now_ms(), *(bytes(r) for r in records)],
                               extra_keys=[self.keys(session_id)[3]])

    async def append_tick(self, session_id, history_records, transcript_entries, tick, *,
                          owner=None):
        args = [owner or "", _now_ms(), int(tick), len(history_records),
                *(bytes(r) for r in history_records), *(e.to_json() for e in transcript_entries)]
        status, rest = await self._script("append_tick", session_id, self._append_tick, args)
        if status == "duplicate":
            log.warning("duplicate_tick", session_id=session_id, tick=tick, last_tick=rest[0])
            return False
        return True

    async def mark_cut_off(self, session_id, after_ms, heard_samples, *, owner=None):
        _, rest = await self._script("mark_cut_off", session_id, self._mark_cut_off,
                                     [owner or "", _now_ms(), int(after_ms), int(heard_samples)])
        log.info("cut_off_marked", session_id=session_id, after_ms=after_ms,
                 heard_samples=heard_samples, entries=rest[0])
        return rest[0]

    async def history(self, session_id, start=0):
        meta, _, _, hist = self.keys(session_id)

        async def read():
            async with self._redis.pipeline(transaction=True) as p:
                return await p.exists(meta).lrange(hist, start, -1).execute()
        exists, records = await self._bounded("history", session_id, read)
        if not exists:
            raise SessionNotFound(f"session {session_id} not found (never created, or expired)")
        return records

    async def load(self, session_id):
        meta, lease, transcript, hist = self.keys(session_id)

        async def read():
            async with self._redis.pipeline(transaction=True) as p:
                return await (p.hgetall(meta).get(lease).lrange(transcript, 0, -1)
                              .llen(hist).execute())
        fields, holder, entries, history_len = await self._bounded("load", session_id, read)
        if not fields:
            raise SessionNotFound(f"session {session_id} not found (never created, or expired)")
        heard = fields.get(b"heard_samples")
        return SessionRecord(
            session_id=session_id, config=json.loads(fields[b"config"]),
            transcript=[TranscriptEntry.from_json(e) for e in entries],
            history_len=history_len, last_tick=int(fields[b"last_tick"]),
            heard_samples=None if heard is None else int(heard),
            owner=None if holder is None else holder.decode(),
            created_ms=int(fields[b"created_ms"]), updated_ms=int(fields[b"updated_ms"]),
            ttl_s=int(fields[b"ttl_ms"]) / 1000, ended=b"ended" in fields)

    async def delete(self, session_id):
        keys = self.keys(session_id)

        async def drop():
            async with self._redis.pipeline(transaction=True) as p:
                return await p.exists(keys[0]).delete(*keys).execute()
        existed = bool((await self._bounded("delete", session_id, drop))[0])
        if existed:
            log.info("session_deleted", session_id=session_id)
        return existed

    async def ping(self):
        return bool(await self._bounded("ping", None, self._redis.ping))

    async def close(self):
        await self._redis.aclose()
