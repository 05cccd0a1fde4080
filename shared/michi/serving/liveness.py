"""Liveness of a stage's work loop: what the watchdog of `Stage` (server.py) asks every
`WATCHDOG_INTERVAL_S`. A probe is a callable that returns None while the stage's work moves, or a
short reason when it is stuck; the stage's health service then says NOT_SERVING (and SERVING
again once the probe passes).

A model stage runs its model on one executor thread (`model_executor`); `WatchedExecutor` times
every call on it, so a model call that runs longer than `stall_s` is seen: that is a stage whose
calls no longer get answers, whatever its gRPC server says. (The backbone's batcher also counts
jobs that wait longer than that, see services/backbone/batcher.py.)"""
from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

DEFAULT_STALL_S = 2.0  # a model call (or a wait for one) longer than this: the stage is stuck
WATCHDOG_INTERVAL_S = 0.25


class WatchedExecutor(ThreadPoolExecutor):
    """A ThreadPoolExecutor that knows since when its oldest call has been waiting or running."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: dict[int, float] = {}  # submitted, not started: monotonic submit time
        self._running: dict[int, float] = {}  # started, not finished: monotonic start time

    def submit(self, fn, /, *args, **kwargs):
        job = next(self._ids)
        with self._lock:
            self._waiting[job] = time.monotonic()

        def timed():
            with self._lock:
                self._waiting.pop(job, None)
                self._running[job] = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._running.pop(job, None)

        try:
            future = super().submit(timed)
        except BaseException:
            with self._lock:
                self._waiting.pop(job, None)
            raise
        # a call cancelled before it started never runs `timed`: forget it
        future.add_done_callback(lambda f: f.cancelled() and self._forget(job))
        return future

    def _forget(self, job: int) -> None:
        with self._lock:
            self._waiting.pop(job, None)

    def longest(self) -> tuple[float, float]:
        """(seconds the oldest running call has run, seconds the oldest waiting call has waited)."""
        now = time.monotonic()
        with self._lock:
            running = now - min(self._running.values()) if self._running else 0.0
            waiting = now - min(self._waiting.values()) if self._waiting else 0.0
        return running, waiting

    def stalled(self, stall_s: float, count_waiting: bool = False) -> str | None:
        """Why this executor counts as stuck, or None: a call running longer than stall_s (with
        `count_waiting`, also a call waiting that long for the thread: an overloaded stage)."""
        running, waiting = self.longest()
        if running > stall_s:
            return f"a model call has been running for {running:.1f} s (stall limit {stall_s:g} s)"
        if count_waiting and waiting > stall_s:
            return f"a model call has waited {waiting:.1f} s for the model thread (stall limit {stall_s:g} s)"
        return None
