"""Batching scheduler of the backbone stage: every engine operation goes through one queue and
one model thread; the ticks of all live calls that arrive together run as ONE forward pass.

A round waits until every live call has sent its tick or `window_s` has passed since the first,
whichever is first, so a slow call never holds the others past the window. Text insertions are
prefilled in chunks of at most `prefill_chunk` tokens between rounds, a rebuilt call's history is
replayed `replay_chunk` positions at a time, and text-only replies are generated `text_chunk`
tokens at a time: a long document, a long history or a long reply delays the other calls by one
chunk at most, not by the whole of it.

No caller can stop the loop: a job whose caller went away (its future cancelled: the client hung
up, the gateway timed the call out) is skipped, or its result dropped; an engine error goes to the
jobs it concerns; a tick of a call that is no longer open fails alone. `stalled()` tells the
stage's watchdog when the loop is stuck anyway (its task ended, a job waits or an engine call runs
longer than the stall limit)."""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import structlog

from michi.engine import BackboneEngine, HistoryTick, TickInput, TickOutput
from michi.serving.metrics import BATCH_SIZE, OPEN_ROWS, TICK_SECONDS

log = structlog.get_logger()


@dataclass
class _Job:
    kind: str  # "call" (any engine operation) or "tick"
    payload: Any  # call: fn(); tick: (key, TickInput)
    future: asyncio.Future
    id: int = 0
    queued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, engine: BackboneEngine, executor, window_s: float = 0.004, prefill_chunk: int = 64,
                 text_chunk: int = 4, replay_chunk: int = 64):
        self.engine, self.executor = engine, executor
        self.window_s, self.prefill_chunk, self.text_chunk = window_s, prefill_chunk, text_chunk
        self.replay_chunk = replay_chunk
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._waiting: dict[int, float] = {}  # queued jobs not started yet: id -> monotonic time queued
        self._running_since: float | None = None  # the engine call in progress started then
        self.failed_jobs = 0  # jobs that ended in an error (their caller got it)

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name="backbone-batcher")

    # ---- what callers queue ---------------------------------------------------------------------
    def _enqueue(self, kind: str, payload: Any) -> asyncio.Future:
        job = _Job(kind, payload, asyncio.get_running_loop().create_future(), next(self._ids))
        self._waiting[job.id] = job.queued
        self.queue.put_nowait(job)  # unbounded: never blocks, never raises
        return job.future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run an engine operation (open, replay, text...) in order with the ticks. Cancelled
        before it starts, it never runs."""
        return await self._enqueue("call", fn)

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Queue an engine operation that runs even if nobody waits for it (closing a call's row
        when its stream ends, however it ends): nothing to await, so a caller's clean-up can neither
        hang nor be cancelled half-way. Its error, if any, is logged."""
        future = self._enqueue("call", fn)
        future.add_done_callback(_log_unretrieved)
        return future

    async def insert_text(self, key: str, tokens: list[int]) -> None:
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i:i + self.prefill_chunk]
            await self.call(lambda chunk=chunk: self.engine.insert_text(key, chunk))

    async def replay(self, key: str, history: Sequence[HistoryTick | Sequence[int]]) -> int:
        """`engine.replay` `replay_chunk` positions per job (the same numbers as one prefill, up to
        float rounding): a reconnecting call with a long history never stalls the others."""
        ticks = 0
        for piece in _pieces(history, self.replay_chunk):
            ticks += await self.call(lambda piece=piece: self.engine.replay(key, piece))
        return ticks

    async def generate_text(self, key: str, max_tokens: int) -> list[int]:
        """A text-only reply, `text_chunk` tokens per queued job (the ticks of other calls run in
        between), until EOS or `max_tokens`."""
        stream = self.engine.text_stream(key, [], max_tokens)
        tokens: list[int] = []
        while True:
            part = await self.call(lambda: list(itertools.islice(stream, self.text_chunk)))
            tokens += part
            if len(part) < self.text_chunk:
                return tokens

    async def tick(self, key: str, x: TickInput) -> TickOutput:
        return await self._enqueue("tick", (key, x))

    # ---- liveness -------------------------------------------------------------------------------
    def stalled(self, stall_s: float) -> str | None:
        """Why the loop counts as stuck, or None: its task ended, a queued job has waited longer
        than stall_s, or an engine call has run longer than that. (Not started yet: not stuck.)"""
        if self.task is not None and self.task.done():
            error = None if self.task.cancelled() else self.task.exception()
            return f"the batcher loop has ended ({error!r})" if error else "the batcher loop has ended"
        now = time.monotonic()
        if self._running_since is not None and now - self._running_since > stall_s:
            return f"an engine call has been running for {now - self._running_since:.1f} s (stall limit {stall_s:g} s)"
        if self._waiting:
            waited = now - min(self._waiting.values())
            if waited > stall_s:
                return f"a backbone job has waited {waited:.1f} s (stall limit {stall_s:g} s)"
        return None

    # ---- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        held: list[_Job] = []  # jobs carried over to the next round
        while True:
            jobs = held or [await self.queue.get()]
            held = []
            try:
                held = await self._round(jobs)
            except Exception as e:  # noqa: BLE001 - a bug here must not end the loop for every call
                log.exception("batcher_round_failed")
                for job in jobs:
                    self._fail(job, e)
            finally:
                OPEN_ROWS.set(self.engine.live())

    async def _round(self, jobs: list[_Job]) -> list[_Job]:
        """Run one round (`jobs` grows with what arrives within the window); returns the jobs held
        for the next round."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while sum(job.kind == "tick" and not job.future.done() for job in jobs) < self.engine.live():
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
            except asyncio.TimeoutError:
                break
        held: list[_Job] = []
        ticks: dict[str, _Job] = {}
        for job in jobs:
            if job.future.done():  # its caller went away: not computed
                self._waiting.pop(job.id, None)
            elif job.kind == "call":  # in arrival order, before this round's ticks
                await self._resolve(job)
            elif job.payload[0] in ticks:  # a call's second tick goes to the next round
                held.append(job)
            else:
                ticks[job.payload[0]] = job
        if ticks:
            await self._tick(ticks)
        return held

    async def _resolve(self, job: _Job) -> None:
        try:
            result = await self._engine(job.payload)
        except Exception as e:  # noqa: BLE001 - the caller gets it
            self._fail(job, e)
        else:
            self._settle(job, result)
        finally:
            self._waiting.pop(job.id, None)

    async def _tick(self, ticks: dict[str, _Job]) -> None:
        live: dict[str, _Job] = {}
        for key, job in ticks.items():
            if job.future.done():  # cancelled while this round gathered: not computed
                self._waiting.pop(job.id, None)
            elif key not in self.engine.index:  # closed (its stream ended) before its tick ran
                self._fail(job, KeyError(f"call {key!r} is not open"))
            else:
                live[key] = job
        if not live:
            return
        start = time.perf_counter()
        try:
            outs = await self._engine(lambda: self.engine.tick({k: job.payload[1] for k, job in live.items()}))
        except Exception as e:  # noqa: BLE001 - every call of this forward gets the error
            for job in live.values():
                self._fail(job, e)
            return
        finally:
            for job in live.values():
                self._waiting.pop(job.id, None)
        TICK_SECONDS.labels("backbone").observe(time.perf_counter() - start)
        BATCH_SIZE.observe(len(live))
        for key, job in live.items():
            self._settle(job, outs[key])  # dropped if its caller went away meanwhile

    async def _engine(self, fn: Callable[[], Any]) -> Any:
        """One engine call on the model thread, timed for `stalled`."""
        self._running_since = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        finally:
            self._running_since = None

    @staticmethod
    def _settle(job: _Job, result: Any) -> None:
        if not job.future.done():
            job.future.set_result(result)

    def _fail(self, job: _Job, error: BaseException) -> None:
        self._waiting.pop(job.id, None)
        if not job.future.done():
            self.failed_jobs += 1
            job.future.set_exception(error)


def _pieces(history: Iterable[HistoryTick | Sequence[int]], size: int) -> list[list]:
    """Split a history (ticks, one position each; text insertions, one per token) into pieces of
    at most `size` positions, in order; a long text insertion is cut between pieces."""
    pieces: list[list] = [[]]
    room = size
    for item in history:
        if isinstance(item, HistoryTick):
            if room == 0:
                pieces.append([])
                room = size
            pieces[-1].append(item)
            room -= 1
            continue
        tokens = list(item)
        while tokens:
            if room == 0:
                pieces.append([])
                room = size
            pieces[-1].append(tokens[:room])
            tokens, room = tokens[room:], room - len(tokens[:room])
    return [piece for piece in pieces if piece]


def _log_unretrieved(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("backbone_job_failed", error=repr(future.exception()))
