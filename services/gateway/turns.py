"""Turn management: who holds the floor, tick by tick. Pure logic, no I/O, tested alone.

- The user's turn starts when the VAD has heard `barge_in_min_speech_ms` of continuous speech;
  shorter speech ("mm-hm", a cough) is a backchannel and changes nothing.
- If the agent was speaking then, that is a barge-in: the agent's audio stops being sent at once
  and stays muted until the user's turn ends (a client's INTERRUPT control does the same).
- The user's turn ends after `end_of_turn_silence_ms` of silence.
- Full duplex: the agent may speak whenever it is not muted. Half duplex: only while the user
  does not hold the floor.
- The agent's turn starts at the first tick it produces audible audio or text, and ends after
  `agent_silence_ticks` quiet ticks, or at a barge-in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from michi.config import TICK_MS

from .events import BargeIn, Event, TurnEnd, TurnStart


@dataclass
class TurnSettings:
    full_duplex: bool = True
    barge_in_min_speech_ms: int = 600
    end_of_turn_silence_ms: int = 700
    agent_silence_ticks: int = 8
    tick_ms: int = TICK_MS


@dataclass
class TurnUpdate:
    send_agent_audio: bool
    events: list[Event] = field(default_factory=list)  # TurnStart, TurnEnd, BargeIn (events.py)


class TurnManager:
    def __init__(self, settings: TurnSettings):
        self.s = settings
        self.user_turn = False
        self.agent_turn = False
        self.muted = False
        self.silence_ms = 0
        self.agent_quiet_ticks = 0

    def update(self, user_in_speech: bool, user_speech_ms: float, agent_audible: bool,
               interrupt: bool = False) -> TurnUpdate:
        """One tick: the VAD's view of the user, whether the agent produced something audible,
        and whether the client asked to interrupt the agent."""
        events: list[Event] = []
        if user_in_speech or interrupt:
            self.silence_ms = 0
        else:
            self.silence_ms += self.s.tick_ms
        confirmed = user_in_speech and user_speech_ms >= self.s.barge_in_min_speech_ms
        if (confirmed or interrupt) and not self.user_turn:
            if confirmed:
                self.user_turn = True
                events.append(TurnStart("user"))
            if self.agent_turn:
                events += [BargeIn(), TurnEnd("agent")]
                self.agent_turn = False
            self.muted = True
        if self.user_turn and self.silence_ms >= self.s.end_of_turn_silence_ms:
            self.user_turn = False
            events.append(TurnEnd("user"))
        if self.muted and not self.user_turn and self.silence_ms >= self.s.end_of_turn_silence_ms:
            self.muted = False  # the floor is free again
        may_speak = not self.muted and (self.s.full_duplex or not (self.user_turn or user_in_speech))
        if may_speak and agent_audible:
            self.agent_quiet_ticks = 0
            if not self.agent_turn:
                self.agent_turn = True
                events.append(TurnStart("agent"))
        elif self.agent_turn:
            self.agent_quiet_ticks += 1
            if self.agent_quiet_ticks >= self.s.agent_silence_ticks or not may_speak:
                self.agent_turn = False
                events.append(TurnEnd("agent"))
        return TurnUpdate(send_agent_audio=may_speak, events=events)
