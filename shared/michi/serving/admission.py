"""Admission control: a stage (or the gateway) takes at most `max_calls` calls at once. A call
beyond that is refused at once (RESOURCE_EXHAUSTED with a retry hint), so the calls already
admitted keep real time; a refused call costs the stage nothing.

Capacity is shown three ways: the `michi_capacity_calls` and `michi_live_sessions` gauges, the
`michi_refused_calls_total` counter, and the health service `michi.capacity`, NOT_SERVING while
the stage is full (a load balancer's readiness probe can read it; the plain health service ""
stays about liveness)."""
from __future__ import annotations

from typing import Callable

from .metrics import CAPACITY, REFUSED_CALLS

CAPACITY_HEALTH_SERVICE = "michi.capacity"
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a refusal: when a retry may succeed


class Admission:
    def __init__(self, stage: str, max_calls: int, on_full_changed: Callable[[bool], None] | None = None):
        if max_calls < 1:
            raise ValueError(f"max_calls must be at least 1 (got {max_calls})")
        self.stage, self.max_calls, self.live = stage, max_calls, 0
        self.on_full_changed = on_full_changed
        CAPACITY.labels(stage).set(max_calls)

    @property
    def full(self) -> bool:
        return self.live >= self.max_calls

    def try_admit(self) -> bool:
        if self.full:
            REFUSED_CALLS.labels(self.stage).inc()
            return False
        self.live += 1
        if self.full and self.on_full_changed:
            self.on_full_changed(True)
        return True

    def release(self) -> None:
        was_full = self.full
        self.live = max(0, self.live - 1)
        if was_full and not self.full and self.on_full_changed:
            self.on_full_changed(False)

    def refusal(self, what: str = "calls") -> str:
        return (f"{self.stage} is at capacity ({self.live}/{self.max_calls} {what}; set --max-calls or "
                f"MICHI_MAX_CALLS); retry later or on another replica")


RETRY_AFTER_MS = 1000  # what a stage's refusal suggests: retry this much later (or now, elsewhere)


def retry_metadata(retry_after_ms: int = RETRY_AFTER_MS) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a refusal at capacity."""
    return ((RETRY_AFTER_KEY, str(retry_after_ms)),)


async def refuse(context, admission: Admission, what: str = "calls", retry_after_ms: int = RETRY_AFTER_MS) -> None:
    """Abort a gRPC call that `admission.try_admit()` turned away: RESOURCE_EXHAUSTED, the
    refusal message, and `retry-after-ms` in the trailing metadata. Raises (as `context.abort`)."""
    import grpc

    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, admission.refusal(what),
                        trailing_metadata=retry_metadata(retry_after_ms))
