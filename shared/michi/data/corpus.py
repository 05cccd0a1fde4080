"""The corpus directory layout (a contract with the training and evaluation code).

    DIR/audio/<id>.flac      one speech segment, mono 24 kHz 16-bit FLAC
    DIR/segments.jsonl       one object per segment:
        {"id", "audio": "audio/<id>.flac", "speaker", "text",
         "words": [[word, start_s, end_s], ...], "duration_s", "split", "source", ...}
        split: "train" | "heldout_sentence" | "heldout_voice"; " ".join(w[0] for w in words) == text;
        extra keys: "asr" (Whisper's text), "matched" (fraction of words Whisper got exactly).
    DIR/bad_files.jsonl      every input that failed: {"input", "reason", ...}
    DIR/shards/, DIR/manifest.json   written by `michi data latents`
    DIR/work/                intermediate per-task outputs (safe to delete once the corpus is done)
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from ..config import FRAME_SAMPLES

# `michi data synth`'s corpus size: TTS-voice sentences, sentences per other voice, held-out sentences
DEFAULT_TTS_SENTENCES = 1500
DEFAULT_SENTENCES_PER_VOICE = 150
DEFAULT_HELDOUT_SENTENCES = 60

SPLITS = ("train", "heldout_sentence", "heldout_voice")
SEGMENTS_FILE = "segments.jsonl"
BAD_FILES_FILE = "bad_files.jsonl"


def text_fit_padding(words: list, num_samples: int) -> int:
    """Silent samples to append so that every text byte of `words` fits on the utterance's ticks.

    `align.align_words` gives each word's tokens one tick each from the word's start tick; a word
    spoken faster than one byte per 80 ms pushes the text after it later, and text that ends up
    past the last tick is dropped from the training target. This returns the padding (whole ticks)
    that avoids any drop with byte tokens (the most tokens per word) and no audio delay (the fewest
    ticks), so it holds for every model config."""
    from ..model.tokenizer import ByteTokenizer, StreamVocab
    from .align import align_words, ticks_for_samples

    n = ticks_for_samples(num_samples, 0)
    st: dict = {}
    align_words([tuple(w) for w in words], n, ByteTokenizer(256), StreamVocab(256), st)
    return st["dropped"] * FRAME_SAMPLES + (-num_samples) % FRAME_SAMPLES if st["dropped"] else 0


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_segments(corpus_dir: str | Path, split: str | None = None) -> list[dict]:
    path = Path(corpus_dir) / SEGMENTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the corpus first (michi data synth / michi data audio)")
    segs = read_jsonl(path)
    return [s for s in segs if split is None or s["split"] == split]


def load_bad_files(corpus_dir: str | Path) -> list[dict]:
    path = Path(corpus_dir) / BAD_FILES_FILE
    return read_jsonl(path) if path.is_file() else []


def stats(segments: Iterable[dict]) -> dict:
    """Counts, hours and text bytes per second, per split and per speaker."""
    segs = list(segments)
    by_split: dict[str, list[dict]] = defaultdict(list)
    by_speaker: dict[str, list[dict]] = defaultdict(list)
    for s in segs:
        by_split[s["split"]].append(s)
        by_speaker[s["speaker"]].append(s)

    def summary(group: list[dict]) -> dict:
        secs = sum(s["duration_s"] for s in group)
        nbytes = sum(len(s["text"].encode("utf-8")) for s in group)
        bps = [len(s["text"].encode("utf-8")) / s["duration_s"] for s in group if s["duration_s"] > 0]
        matched = [s["matched"] for s in group if "matched" in s]
        return {"utterances": len(group), "hours": round(secs / 3600, 4),
                "text_bytes_per_s": round(nbytes / secs, 2) if secs else 0.0,
                "text_bytes_per_s_max": round(max(bps), 2) if bps else 0.0,
                "whisper_matched": round(sum(matched) / len(matched), 3) if matched else None}

    return {"all": summary(segs),
            "splits": {k: summary(v) for k, v in sorted(by_split.items())},
            "speakers": {k: {**summary(v), "splits": dict(Counter(s["split"] for s in v))}
                         for k, v in sorted(by_speaker.items())}}


def format_stats(st: dict, bad: int) -> str:
    lines = [f"{'':<28}{'utts':>7}{'hours':>8}{'bytes/s':>9}{'max b/s':>9}{'matched':>9}"]

    def row(name: str, s: dict) -> str:
        m = f"{s['whisper_matched']:.2f}" if s["whisper_matched"] is not None else "-"
        return (f"{name:<28}{s['utterances']:>7}{s['hours']:>8.3f}{s['text_bytes_per_s']:>9.2f}"
                f"{s['text_bytes_per_s_max']:>9.2f}{m:>9}")

    lines.append(row("all", st["all"]))
    for k, v in st["splits"].items():
        lines.append(row(f"split {k}", v))
    for k, v in st["speakers"].items():
        lines.append(row(f"speaker {k}", v))
    lines.append(f"bad inputs: {bad} (see {BAD_FILES_FILE})")
    return "\n".join(lines)
