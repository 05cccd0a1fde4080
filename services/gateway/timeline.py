"""The agent timeline of a call: one sample clock at the output rate from the call's first tick,
across resumes, counting muted time (audio cut or held back is never sent, but its samples pass).
It answers what barge-in must report: how much of the cut turn the client played (by its
PlaybackMarks when it sends them, else what was sent) and the agent text heard up to there."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Cut:
    played_samples: int  # of the cut turn
    heard_text: str
    confirmed: bool  # from the client's PlaybackMark, not just what was sent
    cut_sample: int  # on the timeline


@dataclass
class AgentTimeline:
    position: int = 0  # samples produced so far (sent or muted)
    sent_until: int = 0  # end of the last chunk sent
    played_until: int = -1  # the client's last PlaybackMark, -1 before any
    turn_start: int = 0
    spans: list[tuple[int, str]] = field(default_factory=list)  # this turn: (timeline start, agent text)

    @classmethod
    def resumed_at(cls, tick: int, samples_per_tick: int) -> "AgentTimeline":
        start = tick * samples_per_tick
        return cls(position=start, sent_until=start, turn_start=start)

    def produce(self, samples: int, text: str, sent: bool) -> int:
        """A tick's audio (and the text chosen with it); returns its start on the timeline."""
        start = self.position
        self.position += samples
        if sent:
            self.sent_until = self.position
        if text:
            self.spans.append((start, text))
        return start

    def start_turn(self) -> None:
        self.turn_start, self.spans = self.position, []

    def mark_played(self, played_samples: int) -> None:
        """The client's PlaybackMark; a mark past what was sent is held to what was sent."""
        if played_samples < 0:
            raise ValueError(f"played_samples must be >= 0, got {played_samples}")
        self.played_until = max(self.played_until, min(played_samples, self.sent_until))

    def cut(self) -> Cut:
        """Barge-in: what of the current turn was heard; the turn's record starts again."""
        confirmed = self.played_until >= self.turn_start
        heard_to = self.played_until if confirmed else self.sent_until
        heard_to = max(heard_to, self.turn_start)
        text = "".join(t for start, t in self.spans if start < heard_to)
        cut = Cut(heard_to - self.turn_start, text, confirmed, heard_to)
        self.start_turn()
        return cut
