"""The backbone engine: batched calls equal calls alone; a call rebuilt by replay goes on unchanged."""
import pytest
import torch

from michi.config import tiny
from michi.engine import BackboneEngine, HistoryTick, TickInput
from michi.model.michi import MichiModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MichiModel(tiny()).eval()


def _inputs(gen, dim, n):
    return [TickInput(torch.randn(dim, generator=gen), [int(t) for t in torch.randint(0, 256, (i % 3,), generator=gen)])
            for i in range(n)]


def test_batched_calls_equal_each_call_alone(model):
    dim = model.cfg.latent_dim
    gen = torch.Generator().manual_seed(1)
    streams = {f"call{i}": _inputs(gen, dim, 6) for i in range(3)}
    batched = BackboneEngine(model, rows=2)  # grows to 4 rows when the third call opens
    for i, key in enumerate(streams):
        batched.open(key, seed=i)
    batched.insert_text("call1", [1, 2, 3, 4, 5])
    together = {key: [] for key in streams}
    for t in range(6):
        ticking = {k: v[t] for k, v in streams.items() if not (k == "call2" and t % 2)}  # call2 skips odd ticks
        for key, out in batched.tick(ticking).items():
            together[key].append(out)
    for i, key in enumerate(streams):
        alone = BackboneEngine(model, rows=1)
        alone.open(key, seed=i)
        if key == "call1":
            alone.insert_text(key, [1, 2, 3, 4, 5])
        ticks = [x for t, x in enumerate(streams[key]) if not (key == "call2" and t % 2)]
        outs = [alone.tick({key: x})[key] for x in ticks]
        assert [o.agent_token for o in outs] == [o.agent_token for o in together[key]]
        for a, b in zip(outs, together[key]):
            assert torch.allclose(a.agent_latent, b.agent_latent, atol=1e-4)
        assert alone.position(key) == batched.position(key)


def test_replayed_call_goes_on_as_the_original(model):
    dim = model.cfg.latent_dim
    gen = torch.Generator().manual_seed(2)
    inputs = _inputs(gen, dim, 8)
    greedy = dict(text_temperature=0.0, audio_temperature=0.0)  # no sampling: outputs are a function of state
    original = BackboneEngine(model)
    original.open("a", **greedy)
    history = [[7, 8, 9]]
    original.insert_text("a", [7, 8, 9])
    for x in inputs[:5]:
        out = original.tick({"a": x})["a"]
        history.append(HistoryTick(x.user_latent, x.user_tokens, out.agent_token, out.agent_latent))
    rebuilt = BackboneEngine(model, rows=3)
    rebuilt.open("other")
    rebuilt.open("a", **greedy)
    assert rebuilt.replay("a", history) == 5
    assert rebuilt.position("a") == original.position("a") == 3 + 5
    for x in inputs[5:]:
        want, got = original.tick({"a": x})["a"], rebuilt.tick({"a": x, "other": x})["a"]
        assert want.agent_token == got.agent_token
        assert torch.allclose(want.agent_latent, got.agent_latent, atol=1e-4)


def test_rows_are_reused_and_keys_unique(model):
    engine = BackboneEngine(model, rows=1)
    engine.open("x")
    with pytest.raises(KeyError, match="already open"):
        engine.open("x")
    engine.tick({"x": TickInput(torch.zeros(model.cfg.latent_dim))})
    engine.close("x")
    assert engine.live() == 0
    engine.open("y")
    assert engine.position("y") == 0 and len(engine.rows) == 1
