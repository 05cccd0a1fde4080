"""Turn management alone: VAD state and agent activity in, floor decisions and events out."""
import numpy as np

from services.gateway.events import BargeIn, TurnEnd, TurnStart
from services.gateway.jitter import JitterBuffer
from services.gateway.turns import TurnManager, TurnSettings


def _run(manager, ticks):
    """ticks: (user_in_speech, user_speech_ms, agent_audible[, interrupt]) per 80 ms tick."""
    out = []
    for t in ticks:
        out.append(manager.update(*t))
    return out


def test_barge_in_mutes_the_agent_until_the_users_turn_ends():
    m = TurnManager(TurnSettings(barge_in_min_speech_ms=600, end_of_turn_silence_ms=400))
    speech = [(True, 80.0 * (i + 1), True) for i in range(10)]  # 800 ms of user speech
    out = _run(m, [(False, 0, True)] * 3 + speech + [(False, 0, True)] * 8)
    assert out[0].events == [TurnStart("agent")]
    barge = next(i for i, u in enumerate(out) if BargeIn() in u.events)
    assert barge == 3 + 7  # the 8th tick of speech: 640 ms >= 600 ms
    assert out[barge].events == [TurnStart("user"), BargeIn(), TurnEnd("agent")]
    end = next(i for i, u in enumerate(out) if TurnEnd("user") in u.events)
    assert end == 3 + 10 + 4  # 400 ms of silence after the speech
    assert all(u.send_agent_audio for u in out[:barge]) and not any(u.send_agent_audio for u in out[barge:end])
    assert out[-1].send_agent_audio and TurnStart("agent") in out[end].events + out[end + 1].events


def test_a_backchannel_does_not_interrupt():
    m = TurnManager(TurnSettings(barge_in_min_speech_ms=600))
    mm_hm = [(True, 80.0 * (i + 1), True) for i in range(5)]  # 400 ms
    out = _run(m, [(False, 0, True)] * 2 + mm_hm + [(False, 0, True)] * 5)
    events = [e for u in out for e in u.events]
    assert events == [TurnStart("agent")]
    assert all(u.send_agent_audio for u in out)


def test_half_duplex_waits_for_the_user():
    m = TurnManager(TurnSettings(full_duplex=False, barge_in_min_speech_ms=600))
    out = _run(m, [(True, 80.0 * (i + 1), True) for i in range(3)] + [(False, 0, True)] * 2)
    assert [u.send_agent_audio for u in out] == [False, False, False, True, True]
    full = TurnManager(TurnSettings(full_duplex=True))
    assert all(u.send_agent_audio for u in _run(full, [(True, 80.0 * (i + 1), True) for i in range(3)]))


def test_interrupt_control_cuts_the_agent_like_a_barge_in():
    m = TurnManager(TurnSettings(end_of_turn_silence_ms=240))
    out = _run(m, [(False, 0, True), (False, 0, True, True)] + [(False, 0, True)] * 4)
    assert BargeIn() in out[1].events and not out[1].send_agent_audio
    assert [u.send_agent_audio for u in out[2:]] == [False, False, True, True]


def test_agent_turn_ends_after_quiet_ticks():
    m = TurnManager(TurnSettings(agent_silence_ticks=3))
    out = _run(m, [(False, 0, True)] + [(False, 0, False)] * 3)
    assert out[-1].events == [TurnEnd("agent")]


def test_jitter_buffer_plays_bursts_in_real_time_and_pads_late_audio():
    jb = JitterBuffer(8000, max_s=1.0)
    jb.extend([np.ones(1000, np.float32), np.ones(600, np.float32)])  # a burst of 200 ms
    frames = [jb.take(640) for _ in range(3)]
    assert [float(f.sum()) for f in frames] == [640.0, 640.0, 320.0]
    assert jb.underruns == 1 and jb.pending == 0
    assert float(jb.take(640).sum()) == 0.0 and not jb.had_audio  # nothing came: silence
    jb.extend([np.arange(9000, dtype=np.float32)])  # over the 1 s bound: the oldest is dropped, counted
    assert jb.pending == 8000 and jb.dropped_samples == 1000 and jb.take(1)[0] == 1000.0


def test_events_map_onto_the_wire():
    import grpc

    from services.gateway.events import Error, ReplyDone, to_proto
    assert to_proto(TurnStart("user"), 3).turn_start.speaker == "user"
    assert to_proto(TurnEnd("agent"), 4).turn_end.speaker == "agent" and to_proto(TurnEnd("agent"), 4).tick == 4
    cut = to_proto(BargeIn(agent_samples_played=10, agent_samples_cut=1920, heard_text="Hel", playback_confirmed=True,
                           cut_sample=99), 5)
    assert (cut.barge_in.agent_samples_played, cut.barge_in.heard_text, cut.barge_in.cut_sample) == (10, "Hel", 99)
    assert to_proto(ReplyDone("hi"), 6).reply_done.text == "hi"
    error = to_proto(Error(grpc.StatusCode.RESOURCE_EXHAUSTED, "too much"), 7).error
    assert (error.code, error.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "too much")
