"""Batching scheduler of the backbone stage: every engine operation goes through one queue and
one model thread; the ticks of all live calls that arrive together run as ONE forward pass.

A round waits until every live call has sent its tick or `window_s` has passed since the first,
whichever is first, so a slow call never holds the others past the window. Text insertions are
prefilled in chunks of at most `prefill_chunk` tokens between rounds, and text-only replies are
generated `text_chunk` tokens at a time: a long document or a long reply delays the other calls
by one chunk at most, not by the whole of it."""
from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Callable

from michi.engine import BackboneEngine, TickInput, TickOutput
from michi.serving.metrics import BATCH_SIZE, TICK_SECONDS


class Batcher:
    def __init__(self, engine: BackboneEngine, executor, window_s: float = 0.004, prefill_chunk: int = 64,
                 text_chunk: int = 4):
        self.engine, self.executor = engine, executor
        self.window_s, self.prefill_chunk, self.text_chunk = window_s, prefill_chunk, text_chunk
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run an engine operation (open, close, replay...) in order with the ticks."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(("call", fn, future))
        return await future

    async def insert_text(self, key: str, tokens: list[int]) -> None:
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i:i + self.prefill_chunk]
            await self.call(lambda chunk=chunk: self.engine.insert_text(key, chunk))

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
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(("tick", (key, x), future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        held: list = []  # jobs carried over to the next round
        while True:
            jobs = held or [await self.queue.get()]
            held = []
            deadline = loop.time() + self.window_s
            while sum(kind == "tick" for kind, _, _ in jobs) < self.engine.live():
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            ticks: dict[str, tuple[TickInput, asyncio.Future]] = {}
            for kind, payload, future in jobs:
                if kind == "call":  # in arrival order, before this round's ticks
                    await self._resolve(future, payload)
                elif payload[0] in ticks:  # a call's second tick goes to the next round
                    held.append((kind, payload, future))
                else:
                    ticks[payload[0]] = (payload[1], future)
            if ticks:
                start = time.perf_counter()
                try:
                    outs = await loop.run_in_executor(
                        self.executor, self.engine.tick, {k: x for k, (x, _) in ticks.items()})
                except Exception as e:  # noqa: BLE001 - every waiting call gets the error
                    for _, future in ticks.values():
                        future.set_exception(e)
                    continue
                TICK_SECONDS.labels("backbone").observe(time.perf_counter() - start)
                BATCH_SIZE.observe(len(ticks))
                for key, (_, future) in ticks.items():
                    if not future.done():
                        future.set_result(outs[key])

    async def _resolve(self, future: asyncio.Future, fn: Callable[[], Any]) -> None:
        try:
            future.set_result(await asyncio.get_running_loop().run_in_executor(self.executor, fn))
        except Exception as e:  # noqa: BLE001
            if not future.done():
                future.set_exception(e)
