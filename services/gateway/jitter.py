"""Jitter buffer for the caller's audio: bursty or late chunks in, exactly one frame per tick out.

Late audio leaves the tick with silence (counted as an underrun); a burst is played out at real
time; more than `max_s` buffered means the client runs ahead of real time, and the oldest audio
is dropped (counted, never silently)."""
from __future__ import annotations

import numpy as np
import structlog

log = structlog.get_logger()


class JitterBuffer:
    def __init__(self, rate_hz: int, max_s: float = 5.0):
        self.rate_hz = rate_hz
        self.max_samples = int(max_s * rate_hz)
        self.buffer = np.zeros(0, dtype=np.float32)
        self.underruns = 0
        self.dropped_samples = 0
        self.had_audio = False  # the last frame taken held real audio

    @property
    def pending(self) -> int:
        return len(self.buffer)

    def extend(self, chunks: list[np.ndarray]) -> int:
        """Add the caller's audio; returns how many of the oldest samples were dropped (0 unless the
        client ran more than `max_s` ahead of real time)."""
        if chunks:
            self.buffer = np.concatenate([self.buffer, *chunks])
        drop = max(0, len(self.buffer) - self.max_samples)
        if drop:
            self.buffer = self.buffer[drop:]
            self.dropped_samples += drop
            log.warning("jitter_buffer_overflow", dropped_samples=drop)
        return drop

    def take(self, n: int) -> np.ndarray:
        frame, self.buffer = self.buffer[:n], self.buffer[n:]
        self.had_audio = len(frame) > 0
        if len(frame) < n:
            if len(frame):
                self.underruns += 1
            frame = np.pad(frame, (0, n - len(frame)))
        return frame
