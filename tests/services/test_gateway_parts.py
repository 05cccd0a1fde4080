"""The gateway's pure parts on their own: the config contract, resume tokens, the agent timeline
and the inbox (partial samples, text limits)."""
import asyncio

import grpc
import numpy as np
import pytest

from michi.audio.pcm import Encoding, encode
from michi.proto.gateway.v1 import gateway_pb2 as pb
from services.gateway.call import cut_turn
from services.gateway.contract import BadRequest, Limits, parse_config, parse_token, public_token
from services.gateway.events import BargeIn, TurnEnd, TurnStart, to_proto
from services.gateway.inbox import CallInbox, Corrupt, parse_request
from services.gateway.timeline import AgentTimeline
from services.gateway.turns import TurnManager, TurnSettings

LIMITS = Limits(max_text_bytes=100, max_call_text_bytes=150)


def test_defaults_apply_only_to_unset_formats():
    cc = parse_config(pb.ConverseConfig(), LIMITS)
    assert (cc.in_encoding, cc.in_rate, cc.out_encoding, cc.out_rate) == (Encoding.LINEAR16, 16000, Encoding.LINEAR16, 16000)
    cc = parse_config(pb.ConverseConfig(input_audio=pb.AudioFormat(encoding=pb.ALAW, sample_rate_hz=8000)), LIMITS)
    assert (cc.out_encoding, cc.out_rate) == (Encoding.ALAW, 8000)  # output follows input
    with pytest.raises(BadRequest, match="sample_rate_hz must be set"):
        parse_config(pb.ConverseConfig(input_audio=pb.AudioFormat(encoding=pb.MULAW)), LIMITS)
    with pytest.raises(BadRequest, match="encoding = 0"):
        parse_config(pb.ConverseConfig(output_audio=pb.AudioFormat()), LIMITS)  # given, but empty


def test_text_limits_and_tts_text():
    parse_config(pb.ConverseConfig(mode=pb.TTS, text="x" * 100), LIMITS)
    with pytest.raises(BadRequest, match="101 bytes; the limit is 100"):
        parse_config(pb.ConverseConfig(mode=pb.TTS, text="x" * 101), LIMITS)
    with pytest.raises(BadRequest, match="needs config.text"):
        parse_config(pb.ConverseConfig(mode=pb.TTS, text="   "), LIMITS)


def test_resume_tokens_name_their_session():
    token = public_token("call/42.é", "s3cr3t-_")
    assert parse_token(token) == ("call/42.é", "s3cr3t-_")
    assert parse_token(token, "call/42.é") == ("call/42.é", "s3cr3t-_")
    with pytest.raises(BadRequest, match="another session"):
        parse_token(token, "other")
    assert parse_token("legacytoken", "sid") == ("sid", "legacytoken")  # made before tokens named sessions
    with pytest.raises(BadRequest, match="give session_id too"):
        parse_token("legacytoken")
    with pytest.raises(BadRequest, match="malformed"):
        parse_token("%%%.secret")


def test_timeline_counts_muted_time_and_heard_text():
    t = AgentTimeline()
    t.start_turn()
    for i, (text, sent) in enumerate([("He", True), ("llo", True), (" th", True), ("ere", False)]):
        assert t.produce(1280, text, sent) == i * 1280  # muted samples still pass
    assert t.sent_until == 3 * 1280 and t.position == 4 * 1280
    cut = t.cut()  # no marks: what was sent counts as played
    assert (cut.played_samples, cut.heard_text, cut.confirmed) == (3 * 1280, "Hello th", False)
    t.start_turn()
    t.produce(1280, "Ok", True)
    t.produce(1280, "ay", True)
    t.mark_played(4 * 1280 + 10)  # the client played 10 samples of this turn
    cut = t.cut()
    assert (cut.played_samples, cut.heard_text, cut.confirmed, cut.cut_sample) == (10, "Ok", True, 4 * 1280 + 10)
    t.mark_played(10 ** 9)  # a mark past what was sent is held to what was sent
    assert t.played_until == t.sent_until
    resumed = AgentTimeline.resumed_at(tick=50, samples_per_tick=640)
    assert resumed.produce(640, "", True) == 50 * 640


def test_a_barge_in_carries_the_agent_text_that_was_played():
    """The gateway's gate: the turn manager cuts the agent, and the timeline fills the barge-in with
    what of the cut turn the client played (its PlaybackMark) and the agent text that went with it."""
    timeline, turns = AgentTimeline(), TurnManager(TurnSettings())
    events = []
    for text in ["Hel", "lo ", "there"]:
        update = turns.update(False, 0, True)
        events += [cut_turn(timeline, e, 1920) for e in update.events]
        timeline.produce(1920, text, update.send_agent_audio)
    timeline.mark_played(1920 + 100)  # the client played "Hel", "lo " and 100 samples more
    update = turns.update(False, 0, True, interrupt=True)
    events += [cut_turn(timeline, e, 1920) for e in update.events]
    assert events == [TurnStart("agent"), BargeIn(agent_samples_played=2020, agent_samples_cut=1920,
                                                  heard_text="Hello ", playback_confirmed=True, cut_sample=2020),
                      TurnEnd("agent")]
    assert to_proto(events[1], 3).barge_in.heard_text == "Hello "
    update = turns.update(False, 0, True, interrupt=True)  # no agent turn left to cut: nothing heard
    assert not any(isinstance(e, BargeIn) for e in update.events)


def test_inbox_keeps_partial_samples_and_refuses_text_over_the_limits():
    async def scenario():
        inbox = CallInbox(Encoding.LINEAR16, LIMITS)
        pcm = (np.arange(5) / 10).astype(np.float32)
        data = encode(pcm, Encoding.LINEAR16)
        for chunk in (data[:3], data[3:4], data[4:]):  # 3 bytes, 1 byte, 6 bytes
            inbox.take(pb.ConverseRequest(audio=chunk))
        audio = np.concatenate(inbox.take_audio())
        np.testing.assert_allclose(audio, pcm, atol=1 / 32768)
        assert inbox.partial == b""
        for text in ("a" * 101, "b" * 100, "c" * 60, "d" * 50):
            inbox.take(pb.ConverseRequest(text=pb.TextInput(text=text)))
        inbox.take(pb.ConverseRequest(control=pb.Control(action=9)))
        inbox.take(pb.ConverseRequest(playback=pb.PlaybackMark(played_samples=-1)))
        codes = [code for code, _ in inbox.take_errors()]
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT]
        assert [t for _, t in inbox.take_text()] == ["b" * 100, "d" * 50]
        with pytest.raises(BadRequest, match="second `config`"):
            inbox.take(pb.ConverseRequest(config=pb.ConverseConfig()))
        with pytest.raises(BadRequest, match="corrupt"):
            inbox.take(parse_request(b"\xff\xff"))

    asyncio.run(scenario())


def test_corrupt_bytes_parse_to_a_value_not_an_exception():
    assert isinstance(parse_request(b"\x12\xff\xff\xff"), Corrupt)
    assert parse_request(pb.ConverseRequest(audio=b"ab").SerializeToString()).audio == b"ab"
