"""The backbone stage's scheduler: live calls' ticks run as one forward; a long text insertion is
prefilled in chunks, and another call's tick runs between them instead of waiting for all of it."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from michi.config import tiny
from michi.engine import BackboneEngine, TickInput
from michi.model.michi import MichiModel
from michi.services.backbone.batcher import Batcher


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
