"""In-process session store: the same semantics as RedisStore for a single process (no
REDIS_URL). Expiry runs on the monotonic clock; no method awaits while it holds the lock, so
every update is atomic for the event loop and for other threads."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

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
    TranscriptEntry,
    check_config,
    check_owner,
    ended_message,
    new_resume_token,
    token_hash,
)

log = structlog.get_logger()


def _wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Session:
    config_json: str
    token_hash: str
    ttl_s: float
    created_ms: int
    updated_ms: int
    expires_at: float  # monotonic
    transcript: list[TranscriptEntry] = field(default_factory=list)
    history: list[bytes] = field(default_factory=list)
    last_tick: int = -1
    heard_samples: int | None = None
    owner: str | None = None
    lease_until: float = 0.0  # monotonic
    ended: bool = False

    def holder(self, now: float) -> str | None:
        return self.owner if self.owner is not None and now < self.lease_until else None


class MemoryStore(SessionStore):
    def __init__(self, *, ttl_s: float = DEFAULT_TTL_S, clock=time.monotonic):
        self.default_ttl_s = ttl_s
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def _live(self, session_id: str, now: float) -> _Session:
        s = self._sessions.get(session_id)
        if s is not None and now >= s.expires_at:
            del self._sessions[session_id]
            log.info("session_expired", session_id=session_id)
            s = None
        if s is None:
            raise SessionNotFound(f"session {session_id} not found (never created, or expired)")
        return s

    def _sweep(self, now: float) -> None:
        """Drop expired sessions nobody asked for again (O(sessions), run on create)."""
        for session_id in [k for k, s in self._sessions.items() if now >= s.expires_at]:
            del self._sessions[session_id]
            log.info("session_expired", session_id=session_id)

    def _writable(self, session_id: str, owner: str | None, now: float) -> _Session:
        s = self._live(session_id, now)
        if owner is not None and s.holder(now) != owner:
            raise LeaseLost(f"session {session_id}: {owner} no longer holds its lease")
        return s

    def _touch(self, s: _Session, now: float) -> None:
        s.updated_ms = _wall_ms()
        s.expires_at = now + s.ttl_s

    async def create(self, session_id, config, ttl_s=None):
        config_json = check_config(config)
        ttl_s = self.default_ttl_s if ttl_s is None else ttl_s
        token = new_resume_token()
        with self._lock:
            now = self._clock()
            self._sweep(now)
            if session_id in self._sessions:
                raise SessionExists(f"session {session_id} already exists")
            wall = _wall_ms()
            self._sessions[session_id] = _Session(config_json, token_hash(token), ttl_s, wall,
                                                  wall, now + ttl_s)
        log.info("session_created", session_id=session_id, ttl_s=ttl_s)
        return token

    async def claim(self, session_id, owner, lease_s, resume_token=None):
        check_owner(owner)
        with self._lock:
            now = self._clock()
            s = self._live(session_id, now)
            holder = s.holder(now)
            if resume_token is None:
                if holder != owner:
                    raise BadResumeToken(f"session {session_id}: a resume token is required")
            elif token_hash(resume_token) != s.token_hash:
                raise BadResumeToken(f"session {session_id}: wrong resume token")
            if s.ended:
                raise SessionEnded(ended_message(session_id))
            if holder is not None and holder != owner:
                log.info("session_busy", session_id=session_id, owner=owner, holder=holder)
                raise SessionBusy(f"session {session_id} is already connected elsewhere")
            s.owner, s.lease_until = owner, now + lease_s
            self._touch(s, now)
            record = self._record(session_id, s, now)
        log.info("session_claimed", session_id=session_id, owner=owner, lease_s=lease_s,
                 resumed=resume_token is not None and holder is None)
        return record

    async def renew(self, session_id, owner, lease_s):
        check_owner(owner)
        with self._lock:
            now = self._clock()
            s = self._writable(session_id, owner, now)
            s.lease_until = now + lease_s
            self._touch(s, now)

    async def release(self, session_id, owner):
        with self._lock:
            now = self._clock()
            try:
                s = self._live(session_id, now)
            except SessionNotFound:
                return False
            if s.holder(now) != owner:
                return False
            s.owner, s.lease_until = None, 0.0
            self._touch(s, now)
        log.info("session_released", session_id=session_id, owner=owner)
        return True

    async def end(self, session_id, owner):
        check_owner(owner)
        with self._lock:
            now = self._clock()
            s = self._writable(session_id, owner, now)
            s.ended = True
            s.owner, s.lease_until = None, 0.0
            self._touch(s, now)
        log.info("session_ended", session_id=session_id, owner=owner)

    async def append_transcript(self, session_id, entries, *, owner=None):
        with self._lock:
            now = self._clock()
            s = self._writable(session_id, owner, now)
            s.transcript.extend(entries)
            self._touch(s, now)

    async def append_history(self, session_id, records, *, owner=None):
        records = [bytes(r) for r in records]
        with self._lock:
            now = self._clock()
            s = self._writable(session_id, owner, now)
            s.history.extend(records)
            self._touch(s, now)

    async def append_tick(self, session_id, history_records, transcript_entries, tick, *,
                          owner=None):
        records = [bytes(r) for r in history_records]
        with self._lock:
            now = self._clock()
            s = self._writable(session_id, owner, now)
            if tick <= s.last_tick:
                last = s.last_tick
            else:
                s.history.extend(records)
                s.transcript.extend(transcript_entries)
                s.last_tick = tick
                self._touch(s, now)
                return True
        log.warning("duplicate_tick", session_id=session_id, tick=tick, last_tick=last)
        return False

    async def mark_cut_off(self, session_id, after_ms, heard_samples, *, owner=None):
        with self._lock:
            now = self._clock()
            s = self._writable(session_id, owner, now)
            marked = 0
            for i in range(len(s.transcript) - 1, -1, -1):  # newest first, as RedisStore
                e = s.transcript[i]
                if e.speaker != "agent":
                    continue
                if e.start_ms < after_ms:
                    break
                if not e.cut_off:
                    s.transcript[i] = replace(e, cut_off=True, heard_samples=heard_samples)
                    marked += 1
            s.heard_samples = heard_samples
            self._touch(s, now)
        log.info("cut_off_marked", session_id=session_id, after_ms=after_ms,
                 heard_samples=heard_samples, entries=marked)
        return marked

    async def history(self, session_id, start=0):
        with self._lock:
            return list(self._live(session_id, self._clock()).history[start:])

    async def load(self, session_id):
        with self._lock:
            now = self._clock()
            return self._record(session_id, self._live(session_id, now), now)

    async def delete(self, session_id):
        with self._lock:
            s = self._sessions.pop(session_id, None)
            existed = s is not None and self._clock() < s.expires_at
        if existed:
            log.info("session_deleted", session_id=session_id)
        return existed

    async def ping(self):
        return True

    def _record(self, session_id: str, s: _Session, now: float) -> SessionRecord:
        config: dict[str, Any] = json.loads(s.config_json)
        return SessionRecord(session_id, config, list(s.transcript), len(s.history),
                             s.last_tick, s.heard_samples, s.holder(now), s.created_ms,
                             s.updated_ms, s.ttl_s, s.ended)
