"""Helpers of the mesh tests (a module of its own, not conftest.py, so tests can import it):
running a coroutine, a request stream, the status a call ends with, a session's record."""
import asyncio

import grpc
import pytest

from michi.session.store import open_store


def run(coro):
    return asyncio.run(coro)


async def requests(*items, delay_s=0.0, hold_s=0.0):
    """`items` as a client stream, `delay_s` before each; the stream stays open `hold_s` after."""
    for item in items:
        if delay_s:
            await asyncio.sleep(delay_s)
        yield item
    if hold_s:
        await asyncio.sleep(hold_s)


def status(call) -> grpc.aio.AioRpcError:
    """The error a call (a coroutine) must end with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(call)
    return info.value


async def load_session(url: str, session_id: str):
    """(record, history) of a session in the store at `url`."""
    store = open_store(url)
    try:
        return await store.load(session_id), await store.history(session_id)
    finally:
        await store.close()
