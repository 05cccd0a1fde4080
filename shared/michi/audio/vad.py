"""Streaming voice activity detection: Silero VAD (ONNX) probabilities, then hysteresis segments.

- `SileroModel`: one onnxruntime session over the ONNX model that the `silero-vad` package ships
  (none of that package's torch code is imported). Stateless, so one model serves every stream;
  `infer` takes a batch of windows from independent streams; `push_batch` feeds many streams
  through it at once.
- `SileroVAD`: one stream's state (recurrent state, 64-sample context, resampler, partial window).
  PCM in at any supported rate -> one speech probability per 32 ms window (512 samples at 16 kHz).
- `SpeechSegmenter`: probabilities -> `SpeechStart` / `SpeechEnd` events, with sample indices on the
  caller's own input clock, and `speech_ms`, the length of the speech so far, so a caller can tell
  a backchannel ("mm-hm", well under a second) from a barge-in.
- `StreamingVAD`: the two together, PCM in, events out.

Window k covers 16 kHz samples [512 k, 512 (k + 1)), i.e. input samples from
round(k * 0.032 * rate_hz); the resampler is delay-compensated, so the clocks agree exactly.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from michi.audio.io import SUPPORTED_RATES_HZ, AudioError
from michi.audio.resample import StreamingResampler

SILERO_RATE_HZ = 16_000
WINDOW_SAMPLES = 512  # one model call: 32 ms at 16 kHz
CONTEXT_SAMPLES = 64  # the model (v5+) also reads the last 64 samples of the previous window
WINDOW_MS = 1000 * WINDOW_SAMPLES // SILERO_RATE_HZ  # 32
_STATE_SHAPE = (2, 128)  # recurrent state per stream: (2, batch, 128) in the model's layout


def silero_model_path() -> Path:
    """The ONNX model inside the installed `silero-vad` package (found without importing it:
    its __init__ imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise AudioError("voice activity detection needs the silero-vad package: pip install silero-vad")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise AudioError(f"silero-vad is installed but its ONNX model is missing: {path}")
    return path


class SileroModel:
    """The Silero VAD network in onnxruntime. Holds no stream state; share one across streams
    (InferenceSession.run is thread-safe). One intra-op thread: a window is ~0.1 ms of work, and
    many concurrent streams scale across cores better than one stream across threads."""

    def __init__(self, path: str | Path | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.path = Path(path) if path is not None else silero_model_path()
        self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self._sr = np.array(SILERO_RATE_HZ, dtype=np.int64)

    @staticmethod
    @lru_cache(maxsize=1)
    def shared() -> "SileroModel":
        """The process-wide model (loaded once, on first use)."""
        return SileroModel()

    @staticmethod
    def initial_state(batch: int = 1) -> np.ndarray:
        return np.zeros((_STATE_SHAPE[0], batch, _STATE_SHAPE[1]), np.float32)

    def infer(self, windows: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step for a batch of independent streams.

        windows: (B, CONTEXT_SAMPLES + WINDOW_SAMPLES) float32 at 16 kHz, each row the previous
        window's last 64 samples followed by the new 512; state: (2, B, 128).
        Returns speech probabilities (B,) and the next state (2, B, 128).
        """
        prob, state = self.session.run(None, {"input": windows, "state": state, "sr": self._sr})
        return prob[:, 0], state


class SileroVAD:
    """One stream: PCM at `rate_hz` in, one speech probability per completed 32 ms window out."""

    def __init__(self, rate_hz: int = SILERO_RATE_HZ, model: SileroModel | None = None):
        if rate_hz not in SUPPORTED_RATES_HZ:
            raise AudioError(f"unsupported sample rate {rate_hz} Hz for VAD; supported: {SUPPORTED_RATES_HZ}")
        self.rate_hz = rate_hz
        self.model = model if model is not None else SileroModel.shared()
        self._resampler = StreamingResampler(rate_hz, SILERO_RATE_HZ)
        self.reset()

    def reset(self) -> None:
        """Start a new stream (sample 0, silent context, fresh recurrent state)."""
        self._resampler.reset()
        self._state = SileroModel.initial_state()
        self._pending = np.zeros(CONTEXT_SAMPLES, np.float32)  # context + samples not yet windowed
        self.windows = 0  # windows scored so far

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Feed audio (any chunk size); returns the probabilities of the windows it completes."""
        return self._score(self._resampler.push(pcm))

    def flush(self) -> np.ndarray:
        """End of stream: scores the last partial window (padded with silence), then resets."""
        audio16 = self._resampler.flush()
        partial = (len(self._pending) - CONTEXT_SAMPLES + len(audio16)) % WINDOW_SAMPLES
        pad = np.zeros((WINDOW_SAMPLES - partial) % WINDOW_SAMPLES, np.float32)
        probs = self._score(np.concatenate([audio16, pad]))
        self.reset()
        return probs

    def _score(self, audio16: np.ndarray) -> np.ndarray:
        return _score_streams([self], [audio16])[0]


def push_batch(vads: Sequence[SileroVAD], chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One chunk for each of many streams: the same as [v.push(c) for ...], but windows from
    different streams go through the model together (about 4x less CPU per window at 16 streams).
    The streams must share one SileroModel."""
    if len(vads) != len(chunks):
        raise ValueError(f"{len(vads)} streams but {len(chunks)} chunks")
    return _score_streams(vads, [v._resampler.push(c) for v, c in zip(vads, chunks)])


def _score_streams(vads: Sequence[SileroVAD], audio16s: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Append 16 kHz audio to each stream and score every completed window, batched across
    streams step by step (within a stream each window needs the state the previous one left)."""
    if len({id(v.model) for v in vads}) > 1:
        raise ValueError("streams scored together must share one SileroModel")
    bufs = [np.concatenate([v._pending, a]) if len(a) else v._pending for v, a in zip(vads, audio16s)]
    counts = [(len(b) - CONTEXT_SAMPLES) // WINDOW_SAMPLES for b in bufs]
    probs = [np.empty(n, np.float32) for n in counts]
    for k in range(max(counts, default=0)):
        rows = [i for i, n in enumerate(counts) if n > k]
        lo, hi = k * WINDOW_SAMPLES, (k + 1) * WINDOW_SAMPLES + CONTEXT_SAMPLES
        x = np.stack([bufs[i][lo:hi] for i in rows])
        state = np.concatenate([vads[i]._state for i in rows], axis=1)
        p, state = vads[rows[0]].model.infer(x, state)
        for j, i in enumerate(rows):
            probs[i][k] = p[j]
            vads[i]._state = state[:, j:j + 1]
    for v, b, n in zip(vads, bufs, counts):
        v._pending = b[n * WINDOW_SAMPLES:].copy() if n else b
        v.windows += n
    return probs


@dataclass(frozen=True)
class SpeechStart:
    """Speech began at `sample_index` (input clock), confirmed min_speech_ms later."""

    sample_index: int


@dataclass(frozen=True)
class SpeechEnd:
    """Speech ended at `sample_index` (input clock), reported min_silence_ms later.
    `speech_ms`: the segment's length (backchannels are short, barge-ins long)."""

    sample_index: int
    speech_ms: float


SpeechEvent = SpeechStart | SpeechEnd


class SpeechSegmenter:
    """Hysteresis over window probabilities: speech starts when a window reaches `onset` and no
    window drops below `offset` for min_speech_ms; it ends once windows have stayed below
    `offset` (none back at `onset`) for min_silence_ms. Windows in between extend what is going on.
    """

    def __init__(self, rate_hz: int = SILERO_RATE_HZ, *, onset: float = 0.5, offset: float = 0.35,
                 min_speech_ms: float = 96.0, min_silence_ms: float = 300.0):
        if not 0.0 < offset <= onset < 1.0:
            raise ValueError(f"need 0 < offset <= onset < 1, got onset={onset}, offset={offset}")
        self.rate_hz = rate_hz
        self.onset, self.offset = onset, offset
        self.min_speech_ms, self.min_silence_ms = min_speech_ms, min_silence_ms
        self.reset()

    def reset(self) -> None:
        self.windows = 0  # windows seen
        self.in_speech = False
        self._start: int | None = None  # window where the current (or candidate) speech began
        self._silence: int | None = None  # window where a candidate end of speech began

    def sample_index(self, window: int) -> int:
        """Input-clock sample index where `window` starts."""
        return (window * WINDOW_SAMPLES * self.rate_hz + SILERO_RATE_HZ // 2) // SILERO_RATE_HZ

    @property
    def speech_ms(self) -> float:
        """Length of the current speech segment so far (0 when not in speech)."""
        if not self.in_speech:
            return 0.0
        end = self._silence if self._silence is not None else self.windows
        return float((end - self._start) * WINDOW_MS)

    def push(self, probs: np.ndarray) -> list[SpeechEvent]:
        """Next windows' probabilities -> the events they decide, in order."""
        events: list[SpeechEvent] = []
        for p in np.asarray(probs, dtype=np.float32).reshape(-1):
            k = self.windows
            self.windows += 1
            if not self.in_speech:
                if self._start is None:
                    if p >= self.onset:
                        self._start = k
                elif p < self.offset:
                    self._start = None
                if self._start is not None and (k + 1 - self._start) * WINDOW_MS >= self.min_speech_ms:
                    self.in_speech = True
                    events.append(SpeechStart(self.sample_index(self._start)))
            else:
                if p >= self.onset:
                    self._silence = None
                elif p < self.offset and self._silence is None:
                    self._silence = k
                if self._silence is not None and (k + 1 - self._silence) * WINDOW_MS >= self.min_silence_ms:
                    events.append(self._end(self._silence))
        return events

    def flush(self) -> list[SpeechEvent]:
        """End of stream: ends open speech (at its pending silence, else after the last window)."""
        events = [self._end(self._silence if self._silence is not None else self.windows)] if self.in_speech else []
        self.reset()
        return events

    def _end(self, window: int) -> SpeechEnd:
        event = SpeechEnd(self.sample_index(window), float((window - self._start) * WINDOW_MS))
        self.in_speech, self._start, self._silence = False, None, None
        return event


class StreamingVAD:
    """PCM in, speech events out, for one stream: SileroVAD followed by SpeechSegmenter."""

    def __init__(self, rate_hz: int = SILERO_RATE_HZ, model: SileroModel | None = None, **segmenter):
        self.vad = SileroVAD(rate_hz, model)
        self.segmenter = SpeechSegmenter(rate_hz, **segmenter)

    @property
    def in_speech(self) -> bool:
        return self.segmenter.in_speech

    @property
    def speech_ms(self) -> float:
        return self.segmenter.speech_ms

    def push(self, pcm: np.ndarray) -> list[SpeechEvent]:
        return self.segmenter.push(self.vad.push(pcm))

    def flush(self) -> list[SpeechEvent]:
        """End of stream: score the last partial window, close open speech, reset."""
        return self.segmenter.push(self.vad.flush()) + self.segmenter.flush()

    def reset(self) -> None:
        self.vad.reset()
        self.segmenter.reset()
