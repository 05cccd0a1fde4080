"""The backbone stage's scheduler: live calls' ticks run as one forward; a long text insertion is
prefilled in chunks, and another call's tick runs between them instead of waiting for all of it;
no caller (gone, cancelled, failing) can stop the loop for the others."""
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from michi.config import tiny
from michi.engine import BackboneEngine, HistoryTick, TickInput
from michi.model.michi import MichiModel
from services.backbone.batcher import Batcher, _pieces


def test_rounds_batch_calls_and_prefill_never_stalls_them():
    torch.manual_seed(0)
    engine = BackboneEngine(MichiModel(tiny()).eval(), rows=2)
    order = []
    tick, insert = engine.tick, engine.insert_text
    engine.tick = lambda inputs, **kw: order.append(("tick", sorted(inputs))) or tick(inputs, **kw)
    engine.insert_text = lambda key, tokens: order.append(("text", len(tokens))) or insert(key, tokens)
    x = TickInput(torch.zeros(engine.model.cfg.latent_dim))

    async def main():
        batcher = Batcher(engine, ThreadPoolExecutor(1), window_s=0.5, prefill_chunk=16)
        batcher.start()
        await batcher.call(lambda: engine.open("a"))
        await batcher.call(lambda: engine.open("b"))
        first = await asyncio.gather(batcher.tick("a", x), batcher.tick("b", x))
        document = asyncio.create_task(batcher.insert_text("a", list(range(100))))
        await asyncio.sleep(0.01)  # the first chunk is queued
        other = await batcher.tick("b", x)
        await document
        batcher.task.cancel()
        return first, other

    first, other = asyncio.run(main())
    assert order[0] == ("tick", ["a", "b"])  # one forward for both calls
    texts = [i for i, (kind, _) in enumerate(order) if kind == "text"]
    assert [order[i][1] for i in texts] == [16] * 6 + [4]
    b_tick = order.index(("tick", ["b"]))
    assert texts[0] < b_tick < texts[-1]  # b did not wait for the whole document
    assert engine.position("a") == 1 + 100 and engine.position("b") == 2


def test_a_text_only_reply_never_stalls_other_calls():
    """A text reply is generated a few tokens per job: another call's tick runs in between, and the
    reply is the same as generating it in one go."""
    torch.manual_seed(0)
    model = MichiModel(tiny()).eval()
    engine = BackboneEngine(model, rows=2)
    order = []
    tick, insert = engine.tick, engine.insert_text
    engine.tick = lambda inputs, **kw: order.append("tick") or tick(inputs, **kw)
    engine.insert_text = lambda key, tokens: order.append("token") or insert(key, tokens)
    x = TickInput(torch.zeros(model.cfg.latent_dim))

    async def main():
        batcher = Batcher(engine, ThreadPoolExecutor(1), window_s=0.5, text_chunk=4)
        batcher.start()
        await batcher.call(lambda: engine.open("a", seed=3))
        await batcher.call(lambda: engine.open("b"))
        reply = asyncio.create_task(batcher.generate_text("a", 24))
        await asyncio.sleep(0.01)  # the first chunk is queued
        await batcher.tick("b", x)
        tokens = await reply
        batcher.task.cancel()
        return tokens

    tokens = asyncio.run(main())
    assert 0 < order.index("tick") < len(order) - 1  # b's tick ran while the reply was being made
    alone = BackboneEngine(model, rows=1)
    alone.open("a", seed=3)
    assert tokens == alone.generate_text("a", [], 24)


# ---- no caller can stop the loop ------------------------------------------------------------------

def _engine(rows=4):
    torch.manual_seed(0)
    return BackboneEngine(MichiModel(tiny()).eval(), rows=rows)


async def _blocked(batcher):
    """Occupy the model thread with a job that waits for the returned gate: the jobs queued
    meanwhile all land in the next round."""
    gate = threading.Event()
    blocker = asyncio.create_task(batcher.call(gate.wait))
    await asyncio.sleep(0.05)  # the blocker's round has started
    return gate, blocker


def test_a_cancelled_tick_of_a_closed_call_does_not_stop_the_loop():
    """The wedge seen in production: a stream cancelled while its tick waited (client gone, gateway
    timeout) queues the close of its row. Calls run before the round's ticks, so the tick of the
    closed row made `engine.tick` raise, and the error was set on the cancelled future:
    InvalidStateError ended the loop, and every later job of every call waited for ever."""
    engine = _engine()
    x = TickInput(torch.zeros(engine.model.cfg.latent_dim))

    async def main():
        batcher = Batcher(engine, ThreadPoolExecutor(1), window_s=0.001)
        batcher.start()
        for key in "abc":  # c is open and idle: the round keeps gathering until its window ends
            await batcher.call(lambda key=key: engine.open(key))
        gate, blocker = await _blocked(batcher)
        gone = asyncio.create_task(batcher.tick("a", x))
        other = asyncio.create_task(batcher.tick("b", x))
        await asyncio.sleep(0.01)
        gone.cancel()  # the stream of call a ends while its tick waits...
        closed = batcher.submit(lambda: engine.close("a"))  # ...and its clean-up closes the row
        await asyncio.sleep(0.01)
        gate.set()
        await blocker
        out = await asyncio.wait_for(other, 5)  # b's tick of the same round
        await closed
        later = await asyncio.wait_for(asyncio.gather(batcher.tick("b", x), batcher.tick("c", x)), 5)
        alive = not batcher.task.done()
        batcher.task.cancel()
        return out, later, alive

    out, later, alive = asyncio.run(main())
    assert alive and out.agent_latent.shape == (engine.model.cfg.latent_dim,) and len(later) == 2
    assert engine.live() == 2 and engine.position("b") == 2 and engine.position("c") == 1


def test_jobs_of_callers_gone_are_skipped_and_errors_reach_only_their_callers():
    engine = _engine()
    x = TickInput(torch.zeros(engine.model.cfg.latent_dim))
    ran = []

    async def main():
        batcher = Batcher(engine, ThreadPoolExecutor(1), window_s=0.001)
        batcher.start()
        for key in "ab":
            await batcher.call(lambda key=key: engine.open(key))
        gate, blocker = await _blocked(batcher)
        skipped = asyncio.create_task(batcher.call(lambda: ran.append("skipped")))
        cancelled_tick = asyncio.create_task(batcher.tick("a", x))
        await asyncio.sleep(0.01)
        skipped.cancel()
        cancelled_tick.cancel()
        gate.set()
        await blocker
        errors = []
        with pytest.raises(ZeroDivisionError):  # an engine operation's error goes to its caller
            await batcher.call(lambda: 1 / 0)
        with pytest.raises(KeyError):  # a tick of a call never opened fails alone...
            await asyncio.wait_for(batcher.tick("nobody", x), 5)
        tick = engine.tick
        engine.tick = lambda inputs, **kw: (_ for _ in ()).throw(RuntimeError("device lost"))
        try:  # an engine error in a forward goes to every call of that forward
            results = await asyncio.wait_for(asyncio.gather(batcher.tick("a", x), batcher.tick("b", x),
                                                            return_exceptions=True), 5)
            errors += [type(r).__name__ for r in results]
        finally:
            engine.tick = tick
        after = await asyncio.wait_for(asyncio.gather(batcher.tick("a", x), batcher.tick("b", x)), 5)
        alive = not batcher.task.done()
        batcher.task.cancel()
        return errors, after, alive

    errors, after, alive = asyncio.run(main())
    assert ran == []  # cancelled before it ran: never run
    assert errors == ["RuntimeError", "RuntimeError"] and len(after) == 2 and alive
    assert engine.position("a") == 1 and engine.position("b") == 1  # the cancelled tick was not computed


def test_stalled_names_a_stuck_loop_and_clears_when_it_moves():
    engine = _engine()

    async def main():
        batcher = Batcher(engine, ThreadPoolExecutor(1), window_s=0.001)
        assert batcher.stalled(0.1) is None  # not started: nothing waits
        batcher.start()
        gate, blocker = await _blocked(batcher)
        queued = asyncio.create_task(batcher.call(lambda: engine.open("a")))
        await asyncio.sleep(0.3)
        stuck = batcher.stalled(0.2)
        gate.set()
        await blocker
        await queued
        moving = batcher.stalled(0.2)
        batcher.task.cancel()
        await asyncio.sleep(0)
        return stuck, moving, batcher.stalled(0.2)

    stuck, moving, ended = asyncio.run(main())
    assert stuck is not None and "running" in stuck
    assert moving is None
    assert ended is not None and "ended" in ended


def test_a_replay_in_pieces_equals_one_prefill():
    """A rebuilt call's history is replayed a few positions per job (other calls tick in between):
    the call goes on exactly as after a replay in one prefill."""
    engine = _engine(rows=2)
    dim = engine.model.cfg.latent_dim
    gen = torch.Generator().manual_seed(5)
    history = []
    for i in range(9):
        history.append(HistoryTick(torch.randn(dim, generator=gen), [i], 3 + i, torch.randn(dim, generator=gen)))
        if i % 3 == 1:
            history.append(list(range(10 + i, 30 + i)))  # text longer than a piece
    assert [sum(1 if isinstance(h, HistoryTick) else len(h) for h in p) for p in _pieces(history, 7)] == \
        [7] * 9 + [6]
    x = TickInput(torch.randn(dim, generator=gen), [7])

    async def main():
        batcher = Batcher(engine, ThreadPoolExecutor(1), window_s=0.001, replay_chunk=7)
        batcher.start()
        await batcher.call(lambda: engine.open("pieces", seed=1))
        ticks = await batcher.replay("pieces", history)
        position = engine.position("pieces")
        out = await batcher.tick("pieces", x)
        batcher.task.cancel()
        return ticks, position, out

    ticks, position, out = asyncio.run(main())
    alone = BackboneEngine(engine.model, rows=1)
    alone.open("whole", seed=1)
    assert ticks == alone.replay("whole", history) == 9
    assert position == alone.position("whole") == 9 + 3 * 20
    ref = alone.tick({"whole": x})["whole"]
    assert out.agent_token == ref.agent_token
    torch.testing.assert_close(out.agent_latent, ref.agent_latent, atol=1e-4, rtol=1e-4)
