"""The events of a call, typed: what turns.py decides (TurnStart, TurnEnd, BargeIn) and what the
gateway adds (ReplyDone, Error), and the one mapping of an event onto the wire (`to_proto`).
Plain data: turns.py stays pure, and these compare by value in its tests."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from michi.proto.gateway.v1 import gateway_pb2 as pb


@dataclass(frozen=True)
class TurnStart:
    speaker: str  # "user" | "agent"


@dataclass(frozen=True)
class TurnEnd:
    speaker: str  # "user" | "agent"


@dataclass(frozen=True)
class BargeIn:
    """The agent was cut off. turns.py says that it happened; the gateway fills in, from the agent
    timeline, how much of the cut turn was played and the agent text heard up to there."""

    agent_samples_played: int = 0  # of the cut turn
    agent_samples_cut: int = 0  # this tick's agent samples, muted
    heard_text: str = ""  # the cut turn's agent text that went with the played samples
    playback_confirmed: bool = False  # from the client's PlaybackMark, not just what was sent
    cut_sample: int = 0  # on the agent timeline


@dataclass(frozen=True)
class ReplyDone:
    text: str


@dataclass(frozen=True)
class Error:
    """A problem the call survives."""

    code: grpc.StatusCode
    message: str


Event = TurnStart | TurnEnd | BargeIn | ReplyDone | Error


def to_proto(event: Event, tick: int) -> pb.Event:
    """An event as the client receives it."""
    if isinstance(event, TurnStart):
        return pb.Event(tick=tick, turn_start=pb.Event.TurnStart(speaker=event.speaker))
    if isinstance(event, TurnEnd):
        return pb.Event(tick=tick, turn_end=pb.Event.TurnEnd(speaker=event.speaker))
    if isinstance(event, BargeIn):
        return pb.Event(tick=tick, barge_in=pb.Event.BargeIn(
            agent_samples_played=event.agent_samples_played, agent_samples_cut=event.agent_samples_cut,
            heard_text=event.heard_text, playback_confirmed=event.playback_confirmed,
            cut_sample=event.cut_sample))
    if isinstance(event, ReplyDone):
        return pb.Event(tick=tick, reply_done=pb.Event.ReplyDone(text=event.text))
    if isinstance(event, Error):
        return pb.Event(tick=tick, error=pb.Event.Error(code=event.code.value[0], message=event.message))
    raise TypeError(f"not a gateway event: {event!r}")


def response(event: Event, tick: int) -> pb.ConverseResponse:
    return pb.ConverseResponse(event=to_proto(event, tick))
