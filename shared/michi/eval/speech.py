"""Speech evaluations of a Michi model (any checkpoint or preset), judged by Whisper.

- `eval_tts`: the model speaks held-out sentences in causal TTS mode; the Whisper judge transcribes
  them; WER. Beside it, the judge's WER on the same sentences spoken by the reference (training)
  voice itself: the floor a perfect imitation of that voice would reach.
- `eval_codec`: encode-decode resynthesis (listen encoder -> vocoder) of held-out audio; judge WER
  on the resynthesis beside the judge WER on the original; log-mel L1 distance between the two,
  raw and at the codec's fixed delay (measured, see `eval_codec`).
- what the listen side hears (`michi eval listen`) lives in `michi.eval.listen`.

Each returns a JSON-ready dict with the corpus figures and one row per item. Items come from a
corpus directory (`segments.jsonl`, see `load_segments`), from the Asterisk prompts
(`asterisk_prompts`) or from the held-out sentence list (`default_sentences`).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..audio.io import as_mono_float32, read_wav, resample, write_wav
from ..config import SAMPLE_RATE_HZ
from ..generate import TTS_TAIL_TICKS
from .voicing import voicing_counts, voicing_figures
from .wer import char_errors, normalize_text, summary, word_errors

ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en")
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
HELDOUT_SPLITS = ("heldout_sentence", "heldout_voice")

# (task, items done, items total): called after each item.
Progress = Callable[[str, int, int], None]


def _no_progress(task: str, done: int, total: int) -> None:
    pass


# ---- items ------------------------------------------------------------------------------------
@dataclass
class SpeechItem:
    """One utterance with its transcript: audio from a file or in memory."""

    id: str
    text: str
    path: Path | None = None
    split: str = ""
    speaker: str = ""
    source: str = ""
    pcm: np.ndarray | None = None
    rate_hz: int = SAMPLE_RATE_HZ

    def audio(self, rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
        """Mono float32 at `rate_hz`."""
        if self.pcm is not None:
            return resample(as_mono_float32(self.pcm), self.rate_hz, rate_hz)
        if self.path is None:
            raise ValueError(f"item {self.id} has neither audio nor a file")
        pcm, _ = read_wav(self.path, rate_out_hz=rate_hz)
        return pcm

    def describe(self) -> dict[str, Any]:
        out = {"id": self.id, "split": self.split, "speaker": self.speaker, "source": self.source}
        if self.path is not None:
            out["path"] = str(self.path)
        return {k: v for k, v in out.items() if v}


def spread(items: Sequence, limit: int | None) -> list:
    """`limit` items evenly spaced over the list (all of them when limit is None): a deterministic
    sample that is not just the first few ids (e.g. every Asterisk prompt starting with "agent-")."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def load_segments(corpus: str | Path, splits: Iterable[str] = HELDOUT_SPLITS,
                  limit: int | None = None) -> dict[str, list[SpeechItem]]:
    """Segments of a corpus directory (`segments.jsonl`: one JSON object per line with "id",
    "audio" (path relative to the corpus), "text", "speaker", "split", "source"), grouped by the
    requested splits, each spread down to `limit` items."""
    corpus = Path(corpus)
    index = corpus / "segments.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{corpus}: no segments.jsonl (a corpus directory from `michi data`)")
    wanted = tuple(splits)
    sets: dict[str, list[SpeechItem]] = {s: [] for s in wanted}
    with index.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                seg = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{index}:{number}: not JSON ({e})") from None
            if seg.get("split") not in sets or not normalize_text(seg.get("text", "")):
                continue
            sets[seg["split"]].append(SpeechItem(
                id=str(seg["id"]), text=seg["text"], path=corpus / seg["audio"], split=seg["split"],
                speaker=str(seg.get("speaker", "")), source=str(seg.get("source", ""))))
    # A stable shuffle before spreading: sorted ids group a voice's sentences together, and every
    # voice reads the same held-out sentences, so an even spread over them would keep few texts.
    shuffled = lambda items: sorted(items, key=lambda it: hashlib.sha1(it.id.encode()).hexdigest())
    return {s: spread(shuffled(items), limit) for s, items in sets.items()}


def asterisk_prompts(limit: int | None = None, root: Path = ASTERISK_DIR,
                     transcripts: Path = ASTERISK_TRANSCRIPTS) -> list[SpeechItem]:
    """The Asterisk core prompts (one human speaker, 8 kHz telephone audio) whose transcript has
    words once normalised (tones, beeps and silences are dropped): 551 of the 568."""
    if not transcripts.is_file():
        raise FileNotFoundError(f"{transcripts} not found: install the Debian package asterisk-core-sounds-en")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: install the Debian package asterisk-core-sounds-en-wav")
    items = []
    with gzip.open(transcripts, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(";") or ":" not in line:
                continue
            name, _, text = line.partition(":")
            name, text = name.strip(), text.strip()
            path = root / f"{name}.wav"
            if path.is_file() and normalize_text(text):
                items.append(SpeechItem(id=name, text=text, path=path, split="asterisk",
                                        speaker="asterisk", source="asterisk-core-sounds-en"))
    return spread(sorted(items, key=lambda it: it.id), limit)


ASTERISK_PARTS = ("train", "heldout")


def asterisk_part(text: str) -> str:
    """Which part of the Asterisk prompts a transcript falls in: "heldout" for a third of them
    (by a hash of the normalised text, so prompts that say the same words stay on one side),
    "train" for the rest."""
    return "heldout" if zlib.crc32(normalize_text(text).encode()) % 3 == 0 else "train"


def asterisk_split(part: str, limit: int | None = None) -> list[SpeechItem]:
    """The Asterisk prompts of one part (`asterisk_part`): "train" is what the hearing stage may
    learn from, "heldout" what `michi eval listen` measures; split by prompt text."""
    if part not in ASTERISK_PARTS:
        raise ValueError(f"asterisk part must be one of {ASTERISK_PARTS}, not {part!r}")
    return spread([it for it in asterisk_prompts() if asterisk_part(it.text) == part], limit)


def default_sentences(limit: int | None = None) -> list[str]:
    """Held-out sentences of the synthetic corpus's text source (`michi.data.text`)."""
    from ..data.text import sentences

    return spread(sentences("heldout"), limit)


def synthetic_items(sentences: Sequence[str], voice: str | None = None,
                    split: str = "heldout_voice") -> list[SpeechItem]:
    """The sentences spoken by a `michi.data.voices` voice (default: the held-out voice, which no
    training corpus uses): a held-out-voice set when no corpus directory is at hand."""
    from ..data import voices

    voice_id = voice or voices.DEFAULT_HELDOUT_VOICE
    return [SpeechItem(id=f"{voice_id}-{i:03d}", text=text, pcm=voices.synthesize(voice_id, text),
                       split=split, speaker=voices.get_voice(voice_id).speaker, source=f"synthesized:{voice_id}")
            for i, text in enumerate(sentences)]


# ---- judge and reference voice ----------------------------------------------------------------
class WhisperJudge:
    """The Whisper model (CTranslate2, CPU, greedy) used as the judge: `judge(pcm, rate) -> text`."""

    def __init__(self, path: str | Path | None = None, threads: int = 1):
        from ..data.whisper import default_whisper_dir, load_whisper

        self.path = Path(path) if path else default_whisper_dir()
        self.model = load_whisper(self.path, threads=threads)

    def __call__(self, pcm: np.ndarray, rate_hz: int) -> str:
        from ..data.whisper import transcribe

        if len(pcm) == 0:
            return ""
        return transcribe(self.model, pcm, rate_hz).text

    def describe(self) -> dict[str, Any]:
        return {"kind": "faster-whisper", "path": str(self.path)}


Judge = Callable[[np.ndarray, int], str]
Synthesizer = Callable[[str], np.ndarray]  # text -> float32 at 24 kHz


def reference_synthesizer(voice: str | Synthesizer | None = None, seed: int = 0) -> tuple[str, Synthesizer]:
    """(name, text -> 24 kHz audio) for a voice id of `michi.data.voices`, a callable, or None
    (the default TTS voice, the one the default model is trained to speak with). A voice id
    speaks with `seed`: the same text always gives the same audio, so reference WERs repeat."""
    if callable(voice):
        return getattr(voice, "__name__", "custom"), voice
    from ..data import voices

    voice_id = voice or voices.DEFAULT_TTS_VOICE
    voices.get_voice(voice_id)  # unknown id: ValueError now, not at the first sentence

    def speak(text: str) -> np.ndarray:
        return voices.synthesize(voice_id, text, seed=seed)

    return voice_id, speak


def _describe_judge(judge: Judge) -> dict[str, Any]:
    describe = getattr(judge, "describe", None)
    return describe() if callable(describe) else {"kind": type(judge).__name__}


def item_row(ref: str, hyp: str) -> dict[str, Any]:
    words = word_errors(ref, hyp)
    return {"ref": ref, "hyp": hyp, "wer": words.wer, "cer": char_errors(ref, hyp).wer,
            "errors": {"sub": words.substitutions, "del": words.deletions, "ins": words.insertions,
                       "ref_words": words.ref_words}}


def _save(wav_dir: Path | None, name: str, pcm: np.ndarray, rate_hz: int = SAMPLE_RATE_HZ) -> str | None:
    if wav_dir is None:
        return None
    return str(write_wav(Path(wav_dir) / name, pcm, rate_hz))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]


# ---- TTS --------------------------------------------------------------------------------------
def eval_tts(michi, sentences: Sequence[str | SpeechItem], judge: Judge,
             reference_voice: str | Synthesizer | None | bool = None, seed: int = 0,
             continue_ticks: int = TTS_TAIL_TICKS, wav_dir: str | Path | None = None, save_wavs: int = 3,
             progress: Progress = _no_progress) -> dict[str, Any]:
    """The model speaks each sentence (causal TTS: the text forced into its text stream, then
    `continue_ticks` free ticks); the judge transcribes; corpus WER. `reference_voice` (a voice id,
    a callable, None for the default TTS voice, False for none) speaks the same sentences for the
    reference WER. The first `save_wavs` sentences are written to `wav_dir` (if given)."""
    from ..generate import tts

    texts = [s.text if isinstance(s, SpeechItem) else str(s) for s in sentences]
    ids = [s.id if isinstance(s, SpeechItem) else f"s{i:03d}" for i, s in enumerate(sentences)]
    wav_dir = Path(wav_dir) if wav_dir else None
    ref_name, speak = (None, None) if reference_voice is False else reference_synthesizer(
        reference_voice if reference_voice is not True else None, seed=seed)
    rows: list[dict[str, Any]] = []
    ref_rows: list[dict[str, Any]] = []
    gen_s = audio_s = 0.0
    for i, (item_id, text) in enumerate(zip(ids, texts)):
        t0 = time.perf_counter()
        gen = tts(michi, text, continue_ticks=continue_ticks, seed=seed + i)
        gen_s += time.perf_counter() - t0
        audio_s += len(gen.audio) / SAMPLE_RATE_HZ
        row = {"id": item_id, **item_row(text, judge(gen.audio, SAMPLE_RATE_HZ)),
               "agent_text": gen.text, "audio_s": len(gen.audio) / SAMPLE_RATE_HZ}
        keep = wav_dir is not None and i < save_wavs
        if keep:
            row["wav"] = _save(wav_dir, f"tts_{i:02d}_{_safe(item_id)}_model.wav", gen.audio)
        if speak is not None:
            ref_audio = speak(text)
            ref_row = {"id": item_id, **item_row(text, judge(ref_audio, SAMPLE_RATE_HZ)), "audio_s": len(ref_audio) / SAMPLE_RATE_HZ}
            if keep:
                ref_row["wav"] = _save(wav_dir, f"tts_{i:02d}_{_safe(item_id)}_reference.wav", ref_audio)
            row["reference_hyp"], row["reference_wer"] = ref_row["hyp"], ref_row["wer"]
            if keep:
                row["reference_wav"] = ref_row["wav"]
            ref_rows.append(ref_row)
        rows.append(row)
        progress("tts", i + 1, len(texts))
    result: dict[str, Any] = {
        "task": "tts", **summary(rows), "seed": seed, "continue_ticks": continue_ticks,
        "generated_audio_s": audio_s, "generate_s": gen_s,
        "real_time_factor": gen_s / audio_s if audio_s else None,
        "judge": _describe_judge(judge), "rows": rows,
    }
    if speak is not None:
        result["reference_voice"] = {"voice": ref_name, **summary(ref_rows),
                                     "wavs": [r["wav"] for r in ref_rows if "wav" in r]}
    return result


# ---- codec ------------------------------------------------------------------------------------
@torch.inference_mode()
def resynthesize(michi, pcm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(original padded with zeros to whole 80 ms frames, vocoder(listen(original).latents)), both
    24 kHz and of the same length."""
    frame = michi.cfg.frame_samples
    pcm = as_mono_float32(pcm)
    padded = np.pad(pcm, (0, -len(pcm) % frame))
    x = torch.from_numpy(padded).to(michi.device)[None]
    latents = michi.model.listen(x).latents
    y = michi.model.vocoder(latents)[0].float().cpu().numpy()
    return padded, y[: len(padded)]


def _log_mel(pcm: np.ndarray) -> torch.Tensor:
    from ..audio.mel import log_mel_spectrogram

    return log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32)))


def _mel_l1_by_lag(original: torch.Tensor, resynth: torch.Tensor, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of |mel difference| and number of compared values for each lag 0..max_lag in mel frames,
    the resynthesis shifted earlier by `lag` frames (i.e. compensating a delay of `lag` frames)."""
    n = min(original.shape[-1], resynth.shape[-1])
    sums, counts = np.zeros(max_lag + 1), np.zeros(max_lag + 1)
    for lag in range(min(max_lag, n - 1) + 1):
        diff = (original[:, : n - lag] - resynth[:, lag:n]).abs()
        sums[lag], counts[lag] = float(diff.sum()), diff.numel()
    return sums, counts


def _xcorr_delay(original: np.ndarray, resynth: np.ndarray, max_lag: int) -> int:
    """Lag in samples (0..max_lag) at which |cross-correlation| of resynth against original peaks."""
    from scipy.signal import correlate

    n = min(len(original), len(resynth))
    if n == 0:
        return 0
    c = correlate(resynth[:n].astype(np.float64), original[:n].astype(np.float64), mode="full", method="fft")
    zero = n - 1  # index of lag 0: resynth[k] ~ original[k - lag]
    window = np.abs(c[zero: zero + max_lag + 1])
    return int(np.argmax(window))


def _codec_item(michi, item: SpeechItem, set_name: str, judge: Judge, max_lag: int, max_lag_samples: int,
                delay: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Resynthesise and judge one item: (row, mel-L1 sums by lag, counts by lag, original audio,
    resynthesised audio, codec seconds)."""
    pcm = item.audio(SAMPLE_RATE_HZ)
    t0 = time.perf_counter()
    original, resynth = resynthesize(michi, pcm)
    codec_s = time.perf_counter() - t0
    mo, mr = _log_mel(original), _log_mel(resynth)
    s, c = _mel_l1_by_lag(mo, mr, max_lag)
    row = {"id": item.id, "set": set_name, "ref": item.text, "duration_s": len(original) / SAMPLE_RATE_HZ}
    orig, res = item_row(item.text, judge(original, SAMPLE_RATE_HZ)), item_row(item.text, judge(resynth, SAMPLE_RATE_HZ))
    row.update({"hyp_original": orig["hyp"], "wer_original": orig["wer"], "errors_original": orig["errors"],
                "hyp_resynth": res["hyp"], "wer_resynth": res["wer"], "errors_resynth": res["errors"],
                "mel_l1": float(s[0] / c[0]) if c[0] else None,
                "xcorr_delay_ms": 1000 * _xcorr_delay(original, resynth, max_lag_samples) / SAMPLE_RATE_HZ,
                "voicing": voicing_counts(original, resynth[delay:])})
    return row, s, c, original, resynth, codec_s


def _codec_figures(set_rows: list[dict], sums: np.ndarray, counts: np.ndarray, best: int) -> dict[str, Any]:
    """WER/CER of original and resynthesis, mel L1 raw and at lag `best`, xcorr delay, voicing."""
    orig = summary(set_rows, "ref", "hyp_original")
    res = summary(set_rows, "ref", "hyp_resynth")
    xc = [r["xcorr_delay_ms"] for r in set_rows]
    return {"items": len(set_rows),
            "wer_original": orig["wer"], "wer_resynth": res["wer"],
            "cer_original": orig["cer"], "cer_resynth": res["cer"],
            "counts_original": orig["counts"], "counts_resynth": res["counts"],
            "mel_l1": float(sums[0] / counts[0]) if counts[0] else None,
            "mel_l1_delay_compensated": float(sums[best] / counts[best]) if counts[best] else None,
            "xcorr_delay_ms_median": float(np.median(xc)) if xc else None,
            **voicing_figures({k: sum(r["voicing"][k] for r in set_rows) for k in set_rows[0]["voicing"]})}


def eval_codec(michi, segments: Sequence[SpeechItem] | Mapping[str, Sequence[SpeechItem]], judge: Judge,
               max_delay_ms: float = 240.0, wav_dir: str | Path | None = None, save_wavs: int = 3,
               progress: Progress = _no_progress) -> dict[str, Any]:
    """Resynthesis of each segment through listen encoder -> vocoder.

    Per set (a dict of name -> items, or one list) and overall: judge WER on the original and on
    the resynthesis, and the log-mel L1 distance (log_mel_spectrogram: 100 mels, hop 256 =
    10.7 ms) between them. The codec is causal, so it may have learned a fixed delay: the L1 is
    reported raw (lag 0) and at the one lag (0..max_delay_ms, in mel frames) that minimises the L1
    over the whole evaluation (`delay_ms`). The per-item waveform cross-correlation peak is also
    reported (median over items, `xcorr_delay_ms`); it is meaningless for an untrained codec.
    Voicing (`michi.eval.voicing`, the decoder's own delay removed): how many of the original's
    frames keep their voiced/unvoiced decision, the voiced recall and the f0 agreement.
    """
    sets = dict(segments) if isinstance(segments, Mapping) else {"segments": list(segments)}
    sets = {name: list(items) for name, items in sets.items() if len(items)}
    hop = 256
    max_lag = max(0, int(max_delay_ms / 1000 * SAMPLE_RATE_HZ / hop))
    max_lag_samples = int(max_delay_ms / 1000 * SAMPLE_RATE_HZ)
    wav_dir = Path(wav_dir) if wav_dir else None
    total = sum(len(v) for v in sets.values())
    rows: list[dict[str, Any]] = []
    lag_stats: dict[str, list[np.ndarray]] = {}
    done = 0
    codec_s = audio_s = 0.0
    delay = int(getattr(michi.model.vocoder, "delay", 0))  # the decoder's own (the mel-PCA decoders')
    for set_name, items in sets.items():
        sums, counts = np.zeros(max_lag + 1), np.zeros(max_lag + 1)
        for item in items:
            row, s, c, original, resynth, item_codec_s = _codec_item(michi, item, set_name, judge, max_lag,
                                                                     max_lag_samples, delay)
            codec_s += item_codec_s
            audio_s += len(original) / SAMPLE_RATE_HZ
            sums, counts = sums + s, counts + c
            if wav_dir is not None and done < save_wavs:
                stem = f"codec_{done:02d}_{_safe(item.id)}"
                row["wav_original"] = _save(wav_dir, f"{stem}_original.wav", original)
                row["wav_resynth"] = _save(wav_dir, f"{stem}_resynth.wav", resynth)
            rows.append(row)
            done += 1
            progress("codec", done, total)
        lag_stats[set_name] = [sums, counts]
    all_sums = sum((v[0] for v in lag_stats.values()), np.zeros(max_lag + 1))
    all_counts = sum((v[1] for v in lag_stats.values()), np.zeros(max_lag + 1))
    valid = all_counts > 0
    best = int(np.argmin(np.where(valid, all_sums / np.maximum(all_counts, 1), np.inf))) if valid.any() else 0
    per_set = {name: _codec_figures([r for r in rows if r["set"] == name], *lag_stats[name], best) for name in sets}
    return {"task": "codec", **_codec_figures(rows, all_sums, all_counts, best),
            "delay_ms": 1000 * best * hop / SAMPLE_RATE_HZ, "delay_mel_frames": best, "max_delay_ms": max_delay_ms,
            "mel": {"n_mels": 100, "n_fft": 1024, "hop": hop, "log": "natural, clamp 1e-5"},
            "mel_l1_by_delay_ms": {f"{1000 * lag * hop / SAMPLE_RATE_HZ:.1f}": float(all_sums[lag] / all_counts[lag])
                                   for lag in range(max_lag + 1) if all_counts[lag]},
            "codec_s": codec_s, "audio_s": audio_s,
            "sets": per_set, "judge": _describe_judge(judge), "rows": rows}


# ---- listen text head -------------------------------------------------------------------------
@torch.inference_mode()
def finite(x: Any) -> bool:
    """True for a finite number (used by tests and the report's sanity checks)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
