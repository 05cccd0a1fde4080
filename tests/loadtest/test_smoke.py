"""End to end: a tiny mesh, one call per scenario at once (6 s each, real time, real speech), and
every metric the load test reports is there and finite."""
import asyncio
import math
import os

import pytest

from loadtest import run
from loadtest.common import cpu_snapshot, cpu_use, gateway_deltas, scrape
from loadtest.scenarios import SCENARIOS, load_speech, plan_call


def _finite(value):
    return value is not None and math.isfinite(value)


@pytest.mark.slow
def test_one_call_per_scenario(tmp_path, monkeypatch):
    from michi.serving.launcher import Mesh, free_port

    monkeypatch.delenv("REDIS_URL", raising=False)
    speech = load_speech(synthetic=1, human=1, voices=("flite-slt",))
    flite = next(s for s in speech if s.source.startswith("flite"))
    human = next((s for s in speech if s.encoding == "MULAW"), flite)
    ports = {s: free_port() for s in ("gateway", "listen", "backbone", "vocoder")}
    metrics = {"gateway": free_port(), "backbone": free_port()}
    mesh = Mesh(model="tiny", ports=ports, threads=1, log_dir=str(tmp_path),
                stage_args={s: ["--metrics-port", str(p)] for s, p in metrics.items()})
    with mesh:
        plans = [plan_call("answer", human if human.end_s - human.onset_s < 4.0 else flite, 6.0),
                 plan_call("barge_in", flite, 6.0), plan_call("text_inject", flite, 6.0),
                 plan_call("text_only", None, 6.0)]
        pids = {name: p.pid for name, p in mesh.processes.items()}
        g0, c0 = scrape(metrics["gateway"]), cpu_snapshot(pids)
        records = asyncio.run(run.level(mesh.gateway, plans, 4, 0.2, 0))
        gw, cpu = gateway_deltas(g0, scrape(metrics["gateway"])), cpu_use(c0, cpu_snapshot(pids))
    by = {r.scenario: r for r in records}
    assert set(by) == set(SCENARIOS) and not [r.error for r in records if r.error]
    for s in ("answer", "barge_in", "text_inject"):
        assert _finite(by[s].first_audio_ms) and 0 < by[s].first_audio_ms < 5000, s
        assert _finite(by[s].realtime_ratio) and by[s].agent_audio_s > 1.0, s
    assert by["answer"].response_ms and all(map(_finite, by["answer"].response_ms)), by["answer"]
    assert by["answer"].eot_ms and all(e >= 500 for e in by["answer"].eot_ms)  # the 700 ms end-of-turn silence
    assert by["barge_in"].barge_in_stop_ms and all(map(_finite, by["barge_in"].barge_in_stop_ms)), by["barge_in"]
    assert by["barge_in"].barge_in_event_ms[0] >= 500 and by["barge_in"].barge_in_played[0] > 0
    assert by["text_inject"].insert_stall_ms and all(map(_finite, by["text_inject"].insert_stall_ms))
    assert by["text_inject"].interrupt_stop_ms and all(map(_finite, by["text_inject"].interrupt_stop_ms))
    assert by["text_only"].text_reply_ms and all(map(_finite, by["text_only"].text_reply_ms))
    assert _finite(by["text_only"].first_text_ms) and by["text_only"].first_audio_ms is None
    assert gw["ticks"] > 100 and 0 <= gw["missed_pct"] <= 100 and _finite(gw["rtf"])
    assert set(pids) <= set(cpu) and all(_finite(v) and v >= 0 for v in cpu.values())
    row = run.level_row(4, records, gw, None, cpu, None, 8.0)
    assert row["first_audio_p95_ms"] is not None and isinstance(row["passed"], bool)
    assert os.path.exists(os.path.join(tmp_path, "gateway.log"))
