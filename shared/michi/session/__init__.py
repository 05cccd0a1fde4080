"""Session state of a call (config, transcript, stream history, live-connection lease), in
Redis when REDIS_URL is set, in process otherwise: `store = open_store()`."""
from .memory import MemoryStore
from .redis_store import RedisStore
from .store import (
                    DEFAULT_TTL_S,
                    SPEAKERS,
                    BadResumeToken,
                    LeaseLost,
                    SessionBusy,
                    SessionEnded,
                    SessionExists,
                    SessionNotFound,
                    SessionRecord,
                    SessionStore,
                    SessionStoreError,
                    StoreUnavailable,
                    TranscriptEntry,
                    open_store,
)

__all__ = ["DEFAULT_TTL_S", "SPEAKERS", "BadResumeToken", "LeaseLost", "MemoryStore",
           "RedisStore", "SessionBusy", "SessionEnded", "SessionExists", "SessionNotFound",
           "SessionRecord", "SessionStore", "SessionStoreError", "StoreUnavailable",
           "TranscriptEntry", "open_store"]
