"""Admission under a burst (`loadtest.admission`): the verdict's pure parts, and end to end a tiny
mesh whose gateway admits 2 calls while 12 are opened at once."""
import os

import pytest

from loadtest.admission import assess, fitting_speech, names_limit, outcome, run_admission
from loadtest.run import CallRecord
from loadtest.scenarios import Speech, load_speech

REFUSED_CODE = "RESOURCE_EXHAUSTED"
# The load test's objective is < 1 % missed ticks (loadtest.common.MAX_MISSED), measured by the
# benchmark. Two admitted calls run ~135 ticks here, beside the test's own client on a shared
# 2-core machine, where one descheduled stage misses a tick now and then; 5 % still fails when the
# burst (or a cold start on a live call) costs the admitted calls their real time.
MAX_MISSED_IN_TEST = 0.05
REFUSAL = "RESOURCE_EXHAUSTED: gateway is at capacity (2/2 calls; set --max-calls or MICHI_MAX_CALLS)"


def call(status="OK", opened=0.0, wall_s=5.0, first_audio_ms=40.0, retry=None, error=None):
    r = CallRecord("answer", "piper-joe", 6, first_audio_ms=first_audio_ms, wall_s=wall_s, status=status,
                   retry_after_ms=retry, opened=opened)
    r.error = error if error is not None else (None if status == "OK" else f"{status}: failed")
    return r


def refused(opened=0.0, wall_s=0.01, retry=1000, error=REFUSAL):
    return call(REFUSED_CODE, opened, wall_s, None, retry, error)


def test_outcome_of_a_call():
    assert outcome(call()) == "admitted"
    assert outcome(refused()) == "refused"
    # RESOURCE_EXHAUSTED after audio (e.g. too much text in the call) is not an admission refusal
    assert outcome(call(REFUSED_CODE, first_audio_ms=40.0)) == "admitted"
    assert outcome(call("UNAVAILABLE", first_audio_ms=None)) == "failed"
    assert outcome(call("UNAVAILABLE", first_audio_ms=40.0)) == "admitted"  # admitted, then failed


def test_names_limit():
    assert names_limit(REFUSAL, 2)
    assert names_limit("at capacity: 4 calls", 4)
    assert not names_limit("at capacity (12/12 calls)", 2) and not names_limit("at capacity", 2)
    assert not names_limit(None, 2) and not names_limit("2.5 s", 2)


def test_assess_a_clean_burst():
    records = [call(opened=0.001), call(opened=0.002)] + [refused(0.003 + i / 1e3) for i in range(10)]
    v = assess(records, 2, 1000.0)
    assert (v["admitted"], v["refused"], v["failed"], v["expected_admitted"]) == (2, 10, 0, [2, 2])
    assert v["status_codes"] == {"OK": 2, REFUSED_CODE: 10} and v["refusals_with_retry_after"] == 10
    assert v["retry_after_values"] == [1000] and v["refusals_naming_limit"] == 10
    assert v["refusal_ms"]["max"] == pytest.approx(10.0) and all(v["checks"].values()), v["checks"]


def test_assess_counts_a_slot_freed_by_a_call_that_ended_early():
    # the first admitted call ended at 0.5 s, before the last refusal (1.0 s): a third call may
    # have taken its slot
    records = [call(opened=0.0, wall_s=0.5), call(opened=0.0), call(opened=0.6), refused(0.9, 0.1)]
    v = assess(records, 2, 1000.0)
    assert v["expected_admitted"] == [2, 3] and v["admitted_after_early_end"] == 1
    assert v["checks"]["admitted in [2, 3]"]
    records = [call(), call(), call(), refused()]  # three at once with no slot freed: over the limit
    assert not assess(records, 2, 1000.0)["checks"]["admitted in [2, 2]"]
    assert not assess([call(), refused()], 2, 1000.0)["checks"]["admitted in [2, 2]"]  # under it


def test_assess_finds_bad_refusals():
    records = [call(), call(), refused(retry=None), refused(wall_s=1.5),
               refused(error="RESOURCE_EXHAUSTED: busy"), call("UNAVAILABLE", first_audio_ms=None)]
    c = assess(records, 2, 1000.0)["checks"]
    assert not c["every refusal has retry-after-ms"] and not c["every refusal within 1000 ms"]
    assert not c["every refusal names the limit"] and not c["every call admitted or refused"]
    assert c["admitted in [2, 2]"]


def test_fitting_speech():
    import numpy as np
    short = Speech(np.zeros(24_000 * 3, np.float32), 24_000, "short", onset_s=0.2, end_s=2.2)
    long = Speech(np.zeros(24_000 * 5, np.float32), 24_000, "long", onset_s=0.0, end_s=4.5)
    assert fitting_speech([short, long], 4.0) == [short]  # 0.3 s lead + 2 s + 1 s end of turn
    with pytest.raises(ValueError, match="no utterance fits"):
        fitting_speech([long], 4.0)


@pytest.mark.slow
def test_a_burst_beyond_max_calls_is_refused_at_once(tmp_path, monkeypatch):
    """12 calls at once (4 s each) against --max-calls 1, on a mesh of the shipped default model
    (what a backend runs; the random `tiny` preset costs twice its tick): 1 admitted, and it keeps real time
    (MAX_MISSED_IN_TEST); 11 refused with RESOURCE_EXHAUSTED, retry-after-ms and the limit named, each within
    1 s; the gateway's refusal counter agrees; a call after the burst is admitted again. One call, not two:
    the listen stage serves one call at a time (issue 17), and on a CPU without AVX-512 (its Whisper front
    at a real-time factor of 0.4) two calls on one-thread stages missed 6 % of their ticks."""
    from michi.serving.launcher import Mesh, free_port

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("MICHI_MAX_CALLS", raising=False)
    ports = {s: free_port() for s in ("gateway", "listen", "backbone", "vocoder")}
    metrics = {"gateway": free_port(), "backbone": free_port()}
    mesh = Mesh(model="default", ports=ports, threads=1, log_dir=str(tmp_path), gateway_args=["--max-calls", "1"],
                stage_args={s: ["--metrics-port", str(p)] for s, p in metrics.items()})
    with mesh:
        pids = {name: p.pid for name, p in mesh.processes.items()}
        report = run_admission(mesh.gateway, metrics, pids, calls=12, max_calls=1, call_s=4.0,
                               refusal_bound_ms=1000.0, speech=load_speech())
    b, row = report["burst"], report["admitted_calls"]
    detail = {k: b[k] for k in ("status_codes", "refusal_ms", "failures", "refusal_messages", "checks")}
    assert b["failed"] == 0 and b["admitted"] + b["refused"] == 12, detail
    lo, hi = b["expected_admitted"]
    assert lo == 1 and lo <= b["admitted"] <= hi, detail  # 4 s calls: hi is 1 unless a call ended early
    assert b["status_codes"].get("RESOURCE_EXHAUSTED") == b["refused"] >= 11 - (hi - lo), detail
    assert b["refusals_with_retry_after"] == b["refused"] and all(v > 0 for v in b["retry_after_values"]), detail
    assert b["refusals_naming_limit"] == b["refused"], detail
    assert b["refusal_ms"]["max"] < 1000.0, detail
    assert b["gateway_metrics"]["capacity_calls"] == 1 and b["gateway_metrics"]["refused_calls"] == b["refused"]
    assert row["failed_calls"] == 0 and row["ticks"] > 45, row  # a 4 s call: 50 ticks and more
    assert row["missed_pct"] < 100 * MAX_MISSED_IN_TEST, (row["missed_ticks"], row["ticks"], row["loadavg_1min_before"])
    assert report["after_burst"]["status"] == "OK" and report["after_burst"]["first_audio_ms"] is not None
    assert os.path.exists(tmp_path / "gateway.log")
