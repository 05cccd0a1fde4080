"""The load test's pure parts: percentiles, the objective, scenario timelines and scheduling,
Prometheus deltas, CPU accounting, and the per-call analysis of a response timeline."""
import math

import numpy as np
import pytest

from loadtest.common import backbone_deltas, cpu_use, delta, gateway_deltas, objective, percentiles, process_cpu_s
from loadtest.run import CallRecord, Marks, Msg, aggregate, analyse, level_row, playout, sample_played_at
from loadtest.scenarios import SCENARIOS, Speech, plan_call, schedule, speech_bounds


def test_percentiles():
    p = percentiles(range(1, 101))
    assert p["p50"] == pytest.approx(50.5) and p["p95"] == pytest.approx(95.05) and p["p99"] == pytest.approx(99.01)
    assert p["max"] == 100 and p["n"] == 100 and p["mean"] == pytest.approx(50.5)
    assert percentiles([None, float("nan"), 3.0])["n"] == 1  # missing and non-finite values are left out
    assert percentiles([]) is None and percentiles([None]) is None


def test_objective():
    assert objective(150.0, 0.5)
    assert not objective(200.0, 0.5)  # p95 first audio must be under 200 ms
    assert not objective(150.0, 1.0)  # and missed ticks under 1 %
    assert not objective(150.0, 0.0, failed_calls=1)
    assert not objective(None, 0.0)  # no audio at all


def test_metric_deltas():
    before = {"michi_tick_seconds_count{stage=gateway}": 100, "michi_tick_seconds_sum{stage=gateway}": 2.0,
              "michi_missed_tick_deadlines_total{}": 1, "michi_backbone_batch_size_count{}": 10,
              "michi_backbone_batch_size_sum{}": 20, "michi_tick_seconds_sum{stage=backbone}": 0.1}
    after = {"michi_tick_seconds_count{stage=gateway}": 300, "michi_tick_seconds_sum{stage=gateway}": 6.0,
             "michi_missed_tick_deadlines_total{}": 3, "michi_backbone_batch_size_count{}": 60,
             "michi_backbone_batch_size_sum{}": 170, "michi_tick_seconds_sum{stage=backbone}": 1.1}
    assert delta(before, after, "absent{}") == 0.0
    g = gateway_deltas(before, after)
    assert g["ticks"] == 200 and g["missed_ticks"] == 2 and g["missed_pct"] == pytest.approx(1.0)
    assert g["gateway_tick_mean_ms"] == pytest.approx(20.0) and g["rtf"] == pytest.approx(0.25)
    b = backbone_deltas(before, after)
    assert b["backbone_mean_batch"] == pytest.approx(3.0) and b["backbone_forward_mean_ms"] == pytest.approx(20.0)
    empty = gateway_deltas({}, {})  # a gateway without metrics: no ticks, nothing missed
    assert empty["ticks"] == 0 and empty["missed_pct"] == 0.0


def test_cpu_use():
    use = cpu_use({"t": 0.0, "cpu_s": {"a": 1.0, "b": 2.0, "gone": 1.0}},
                  {"t": 2.0, "cpu_s": {"a": 2.0, "b": 2.5, "gone": None}})
    assert use == {"a": 50.0, "b": 25.0, "total": 75.0}
    import os
    assert process_cpu_s(os.getpid()) > 0 and process_cpu_s(2 ** 22 + 7) is None


def test_schedule_mixes_every_scenario():
    plan = schedule([1, 2, 3, 4, 6])
    assert [len(p) for p in plan] == [1, 2, 3, 4, 6]
    flat = [s for p in plan for s in p]
    assert {flat.count(s) for s in SCENARIOS} == {4}  # 16 calls, 4 of each
    assert set(plan[3]) == set(SCENARIOS)  # a level of 4 has all of them


def _speech(seconds=2.0, rate=8000):
    pcm = np.zeros(int((seconds + 0.5) * rate), np.float32)
    pcm[int(0.25 * rate):int((0.25 + seconds) * rate)] = 0.3 * np.sin(np.arange(int(seconds * rate)) * 0.3)
    onset, end = speech_bounds(pcm, rate)
    return Speech(pcm, rate, "test", "MULAW", onset, end)


def test_speech_bounds():
    s = _speech()
    assert s.onset_s == pytest.approx(0.24, abs=0.021) and s.end_s == pytest.approx(2.26, abs=0.021)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_plan_call(scenario):
    plan = plan_call(scenario, _speech(), 12.0)
    if scenario == "text_only":
        assert plan.pcm is None and plan.segments == []
        assert [a[1] for a in plan.actions] == ["text:USER"] * 4 and plan.actions[-1][0] < 11.0
        return
    assert len(plan.pcm) == 12 * 8000
    assert plan.segments and all(b - a == pytest.approx(2.02, abs=0.05) for a, b in plan.segments)
    for a, b in plan.segments:  # the speech is where the plan says, silence elsewhere
        assert np.abs(plan.pcm[int(a * 8000) + 10:int(b * 8000) - 10]).max() > 0.1
    gaps = [b2 - a1 for (_, a1), (b2, _) in zip(plan.segments, plan.segments[1:])]
    assert all(g >= 1.5 for g in gaps)  # room for an end of turn and the agent between turns
    if scenario == "barge_in":
        assert plan.segments[0][0] >= 2.0  # the agent talks first
    if scenario == "text_inject":
        kinds = [a[1] for a in plan.actions]
        assert kinds == ["text:CONTEXT", "interrupt", "text:USER"]
        assert plan.actions[0][0] > plan.segments[0][1] + 1.0  # the agent is talking again by then
        assert all(not (a - 0.5 < plan.actions[1][0] < b + 1.0) for a, b in plan.segments)


def _audio(t0, n, start_tick=0, samples=1920, dt=0.08):
    return [Msg(t0 + i * dt, "audio", start_tick + i, (start_tick + i) * samples, samples) for i in range(n)]


def test_playout_and_played_at():
    audio = [Msg(1.0, "audio", 0, 0, 2400), Msg(1.05, "audio", 1, 2400, 2400), Msg(1.5, "audio", 2, 4800, 2400)]
    assert playout(audio, 24_000) == pytest.approx([1.0, 1.1, 1.5])  # queued behind, then an underrun
    starts = playout(audio, 24_000)
    assert sample_played_at(audio, starts, 2399, 24_000) == pytest.approx(1.1)
    assert sample_played_at(audio, starts, 2400, 24_000) == pytest.approx(1.1 + 1 / 24_000)
    assert sample_played_at(audio, starts, 10 ** 6, 24_000) is None


def test_analyse_answer():
    # audio from t=10.0 (opened at 9.9); the user speaks 10.3-12.3; turn end at 13.0; agent back at 13.0
    msgs = [Msg(9.95, "started"), Msg(10.0, "turn_start", 0, speaker="agent"), *_audio(10.0, 4),
            Msg(10.5, "turn_start", 6, speaker="user"), Msg(13.0, "turn_end", 37, speaker="user"),
            *_audio(13.0, 5, start_tick=37)]
    rec = analyse(CallRecord("answer", "t", 1), Marks(9.9, [(10.3, 12.3)], []), msgs)
    assert rec.first_audio_ms == pytest.approx(100.0)
    assert rec.eot_ms == pytest.approx([700.0]) and rec.response_ms == pytest.approx([700.0])
    assert rec.turns == 1 and rec.turns_without_end == 0
    rec2 = analyse(CallRecord("answer", "t", 1), Marks(9.9, [(10.3, 12.3)], []), _audio(10.0, 4))
    assert rec2.response_ms == [] and rec2.turns_without_end == 1


def test_analyse_barge_in():
    # the agent talks from 10.0 (1920 samples a tick); the user starts at 11.0; the barge-in comes at
    # 11.7 and says 17 ticks were played in the turn: the last one arrived at 11.28, plays until 11.36
    msgs = [Msg(10.0, "turn_start", 0, speaker="agent"), *_audio(10.0, 17),
            Msg(11.7, "barge_in", 17, played=17 * 1920, cut=1920), Msg(11.7, "turn_end", 17, speaker="agent")]
    rec = analyse(CallRecord("barge_in", "t", 1), Marks(9.9, [(11.0, 12.5)], []), msgs)
    assert rec.barge_in_event_ms == pytest.approx([700.0])
    assert rec.barge_in_stop_ms == pytest.approx([1e3 * (10.0 + 17 * 0.08 - 11.0)])
    assert rec.barge_in_played == [17 * 1920] and rec.barge_in_cut == [1920]
    none = analyse(CallRecord("barge_in", "t", 1), Marks(9.9, [(11.0, 12.5)], []), _audio(10.0, 30))
    assert none.barge_ins_missed == 1 and none.barge_in_stop_ms == []


def test_analyse_text_actions():
    audio = _audio(10.0, 20)
    audio[8].t += 0.3  # a stall right after the document went in
    for a in audio[9:]:
        a.t += 0.3
    msgs = [Msg(10.0, "turn_start", 0, speaker="agent"), *audio,
            Msg(12.0, "barge_in", 20, played=20 * 1920), Msg(13.0, "agent_text", 21)]
    marks = Marks(9.9, [], [(10.5, "text:CONTEXT"), (11.5, "interrupt"), (11.5, "text:USER")])
    rec = analyse(CallRecord("text_inject", "t", 1), marks, msgs)
    assert rec.insert_stall_ms == pytest.approx([380.0]) and rec.insert_baseline_ms == pytest.approx([80.0])
    assert rec.interrupt_stop_ms == pytest.approx([1e3 * (10.3 + 20 * 0.08 - 11.5)])
    assert rec.text_reply_ms == []  # only text_only calls wait for a text reply
    text = analyse(CallRecord("text_only", "text", 1), Marks(9.9, [], [(10.0, "text:USER")]),
                   [Msg(10.25, "agent_text", 0)])
    assert text.text_reply_ms == pytest.approx([250.0]) and text.first_text_ms == pytest.approx(350.0)
    assert text.first_audio_ms is None


def test_level_row_and_aggregate():
    recs = [CallRecord("answer", "a", 2, first_audio_ms=100.0, response_ms=[700.0, 800.0]),
            CallRecord("text_only", "t", 2, first_text_ms=50.0, text_reply_ms=[300.0])]
    gw = {"ticks": 100, "missed_ticks": 0, "missed_pct": 0.0, "gateway_tick_mean_ms": 10.0, "rtf": 0.125}
    row = level_row(2, recs, gw, None, {"total": 50.0}, None, 12.0)
    assert row["passed"] and row["failed_calls"] == 0 and row["first_audio_p95_ms"] == pytest.approx(100.0)
    assert row["latency"]["scenarios"]["answer"]["response_ms"]["n"] == 2
    assert row["latency"]["all"]["first_audio_ms"]["n"] == 1  # the text-only call has no audio
    recs.append(CallRecord("barge_in", "b", 2, error="UNAVAILABLE: x"))
    assert not level_row(3, recs, gw, None, None, None, 12.0)["passed"]
    agg = aggregate(recs)
    assert set(agg["scenarios"]) == {"answer", "text_only", "barge_in"}
    assert all(v is None or all(math.isfinite(x) for x in v.values()) for v in agg["all"].values())
