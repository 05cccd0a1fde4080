"""The session store: what a call needs to survive the loss of a stage replica or a reconnect.

One record per call: its config, the transcript (what each side said and heard, with times,
and which agent words a barge-in cut off), the stream history the gateway packs per tick so a
fresh backbone replica can be re-prefilled, and a live-connection lease so only one client
drives a call at a time. Two stores serve the same interface: `RedisStore` (shared by every
gateway replica) and `MemoryStore` (one process, the default when `REDIS_URL` is unset).

Rules both stores keep:
- every write is atomic and refreshes the TTL of all of the session's data (a sliding TTL:
  a session lives `ttl_s` past its last write, then is gone);
- the lease expires by itself (`lease_s`), so a vanished client frees its session;
- `claim` needs the resume token returned by `create`, except for the owner that already
  holds the live lease (re-claiming your own lease is a renew);
- write methods take an optional `owner`: given, the write happens only while that owner
  holds the live lease (`LeaseLost` otherwise), so a gateway that lost a call cannot write
  into it after another connection took it over;
- `append_tick` with a tick number not above the last one recorded is a duplicate (a retry
  after a lost reply): nothing is written and it returns False;
- agent transcript entries are appended in `start_ms` order (`mark_cut_off` relies on it);
- `end` (the call hung up, END_CALL) is final: it frees the lease and every later `claim`
  raises `SessionEnded`; the record, transcript and history stay readable until the TTL.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

SPEAKERS = ("user", "agent", "system", "context", "tool")
DEFAULT_TTL_S = 3600.0  # a session outlives its last write by this much
ENV = object()  # open_store's default: read REDIS_URL when called


class SessionStoreError(Exception):
    """Base of the store's errors. `grpc_status` names the grpc.StatusCode a servicer should
    answer with (a name, so this module does not import grpc)."""

    grpc_status = "INTERNAL"


class StoreUnavailable(SessionStoreError):
    grpc_status = "UNAVAILABLE"


class SessionNotFound(SessionStoreError):
    grpc_status = "NOT_FOUND"


class SessionExists(SessionStoreError):
    grpc_status = "ALREADY_EXISTS"


class SessionBusy(SessionStoreError):
    grpc_status = "FAILED_PRECONDITION"


class BadResumeToken(SessionStoreError):
    grpc_status = "PERMISSION_DENIED"


class LeaseLost(SessionStoreError):
    grpc_status = "ABORTED"


class SessionEnded(SessionStoreError):
    """The call was ended (END_CALL): it cannot be resumed."""

    grpc_status = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class TranscriptEntry:
    """One stretch of text said by one side. For agent entries, `cut_off` means the user never
    heard it (a barge-in stopped playback first) and `heard_samples` is how many agent samples
    had been played when that happened."""

    speaker: str
    text: str
    start_ms: int
    end_ms: int
    cut_off: bool = False
    heard_samples: int | None = None

    def __post_init__(self):
        if self.speaker not in SPEAKERS:
            raise ValueError(f"speaker must be one of {SPEAKERS}, not {self.speaker!r}")
        if self.end_ms < self.start_ms:
            raise ValueError(f"end_ms {self.end_ms} is before start_ms {self.start_ms}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "TranscriptEntry":
        d = json.loads(raw)
        return cls(d["speaker"], d["text"], int(d["start_ms"]), int(d["end_ms"]),
                   bool(d.get("cut_off", False)),
                   None if d.get("heard_samples") is None else int(d["heard_samples"]))


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    config: dict[str, Any]
    transcript: list[TranscriptEntry] = field(default_factory=list)
    history_len: int = 0  # number of history records; history(id, start=history_len) is empty
    last_tick: int = -1  # -1 until the first append_tick
    heard_samples: int | None = None  # agent samples played at the last barge-in
    owner: str | None = None  # holder of the live lease, None when free
    created_ms: int = 0  # wall clock, ms since the epoch
    updated_ms: int = 0
    ttl_s: float = DEFAULT_TTL_S
    ended: bool = False  # `end` was called: readable until the TTL, never claimable again


def ended_message(session_id: str) -> str:
    return f"session {session_id} ended (END_CALL); it cannot be resumed"


def token_hash(token: str) -> str:
    """Stores keep a hash of the resume token, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_resume_token() -> str:
    return secrets.token_urlsafe(32)


def check_config(config: dict[str, Any]) -> str:
    """Configs must survive a JSON round trip in both stores; returns the JSON."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, not {type(config).__name__}")
    return json.dumps(config, separators=(",", ":"), sort_keys=True)


def check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner:
        raise ValueError("owner must be a non-empty string")


class SessionStore(abc.ABC):
    """Async interface of both stores. All methods raise `StoreUnavailable` (within a bounded
    time, never hanging) when the backing store cannot be reached."""

    default_ttl_s: float = DEFAULT_TTL_S

    @abc.abstractmethod
    async def create(self, session_id: str, config: dict[str, Any],
                     ttl_s: float | None = None) -> str:
        """Create a session; returns its resume token. `SessionExists` if the id is taken."""

    @abc.abstractmethod
    async def claim(self, session_id: str, owner: str, lease_s: float,
                    resume_token: str | None = None) -> SessionRecord:
        """Take the live-connection lease. `SessionNotFound`, `BadResumeToken` (wrong token, or
        none while `owner` does not already hold the lease), `SessionBusy` (another owner
        holds a live lease), `SessionEnded` (the call was ended; checked after the token)."""

    @abc.abstractmethod
    async def renew(self, session_id: str, owner: str, lease_s: float) -> None:
        """Extend `owner`'s lease to `lease_s` from now. `LeaseLost` if it lapsed or another
        owner holds it (claim again with the resume token to take it back)."""

    @abc.abstractmethod
    async def release(self, session_id: str, owner: str) -> bool:
        """Free the lease if `owner` holds it; False (and nothing done) otherwise."""

    @abc.abstractmethod
    async def end(self, session_id: str, owner: str) -> None:
        """The call is over (END_CALL): mark the session ended and free `owner`'s lease, in one
        atomic step. Later claims raise `SessionEnded`; `load` and `history` still answer
        until the TTL. `LeaseLost` if `owner` does not hold the lease (as `renew`),
        `SessionNotFound` if there is no such session."""

    @abc.abstractmethod
    async def append_transcript(self, session_id: str, entries: list[TranscriptEntry], *,
                                owner: str | None = None) -> None:
        ...

    @abc.abstractmethod
    async def append_history(self, session_id: str, records: list[bytes], *,
                             owner: str | None = None) -> None:
        """Append opaque stream-history records (text insertions between ticks, ...)."""

    @abc.abstractmethod
    async def append_tick(self, session_id: str, history_records: list[bytes],
                          transcript_entries: list[TranscriptEntry], tick: int, *,
                          owner: str | None = None) -> bool:
        """One atomic update: history records, transcript entries and the last tick number.
        Returns False (nothing written) if `tick` is not above the last recorded tick."""

    @abc.abstractmethod
    async def mark_cut_off(self, session_id: str, after_ms: int, heard_samples: int, *,
                           owner: str | None = None) -> int:
        """Barge-in: mark the agent entries that start at or after `after_ms` (not heard) as
        cut off with `heard_samples`, and record `heard_samples` on the session. An entry that
        started before `after_ms` was partly heard and is left as it is. Entries already cut
        off keep their first marking. Returns how many entries were marked."""

    @abc.abstractmethod
    async def history(self, session_id: str, start: int = 0) -> list[bytes]:
        """History records from index `start` on, in the order they were appended."""

    @abc.abstractmethod
    async def load(self, session_id: str) -> SessionRecord:
        ...

    @abc.abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Remove the session and its lease; False if there was none."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Health check: True, or `StoreUnavailable`."""

    async def close(self) -> None:  # noqa: B027  optional: a store with nothing to release keeps it
        pass


def open_store(url: Any = ENV, *, ttl_s: float = DEFAULT_TTL_S) -> SessionStore:
    """RedisStore for a redis:// (rediss://, unix://) URL, MemoryStore for None or "".
    The default reads REDIS_URL now. Nothing connects here: call `await store.ping()` at
    startup to fail fast with a clear `StoreUnavailable`."""
    if url is ENV:
        url = os.environ.get("REDIS_URL")
    if not url:
        from .memory import MemoryStore
        return MemoryStore(ttl_s=ttl_s)
    from .redis_store import RedisStore
    return RedisStore(url, ttl_s=ttl_s)
