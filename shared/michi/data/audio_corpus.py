"""A corpus from a folder of recordings (`michi data audio`).

Per input file (one Luigi task each, output `work/audio/<key>.jsonl`, written last and atomically):
1. decode: soundfile, else PyAV (any container/codec ffmpeg knows); mono; resampled to 24 kHz;
2. segment: Silero VAD (`michi.audio.vad`, ONNX) speech regions; neighbours closer than
   `MERGE_GAP_S` are merged while the result stays under `MAX_SEGMENT_S`; a region longer than
   that is cut at its quietest pause (lowest speech probability) until every piece fits; pieces
   under `MIN_SEGMENT_S` are dropped (counted); each segment keeps up to 0.2 s of context;
3. transcribe: faster-whisper with word timestamps (times relative to the segment);
4. pad the end with silence where the text needs more ticks (`corpus.text_fit_padding`);
   write `audio/<id>.flac` (24 kHz 16-bit) and the segment records.
A file that cannot be decoded, is empty, or has no transcribable speech becomes one record in
`bad_files.jsonl` with the reason; the summary prints how many.

`AudioCorpus` gathers the per-file outputs of the current file list into `segments.jsonl`,
`bad_files.jsonl` and `audio.json` (parameters, inputs, stats). Split: a file is held out
(split "heldout_sentence": same speakers, unseen recordings) when the hash of its path relative
to the input folder falls under `heldout_fraction`.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np

from ..audio.io import resample
from ..config import SAMPLE_RATE_HZ
from .corpus import BAD_FILES_FILE, SEGMENTS_FILE, format_stats, read_jsonl, stats, text_fit_padding
from .pipeline import Progress, luigi, write_flac_atomic, write_json_atomic, write_jsonl_atomic

VAD_RATE_HZ = 16_000
MIN_SEGMENT_S = 0.6
MAX_SEGMENT_S = 15.0
MERGE_GAP_S = 0.5
CONTEXT_S = 0.2
MIN_FILE_S = 0.1
MAX_WORDS_PER_S = 6.0  # faster than anyone speaks: Whisper looping on noise (dropped, counted)


class DecodeError(ValueError):
    pass


# ---- decoding ----------------------------------------------------------------------------------
def decode_audio(path: str | Path, rate_out: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Any common audio file -> mono float32 at `rate_out`. Raises DecodeError with the reason."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    errors = []
    try:
        import soundfile as sf

        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        pcm = data.mean(axis=1)
    except Exception as e:  # noqa: BLE001 - libsndfile's errors vary by format
        errors.append(f"soundfile: {e}")
        try:
            pcm, rate = _decode_av(path)
        except Exception as e2:  # noqa: BLE001
            errors.append(f"pyav: {str(e2)[:200]}")
            raise DecodeError("cannot decode audio (" + "; ".join(errors) + ")") from None
    if len(pcm) < MIN_FILE_S * rate:
        raise DecodeError(f"no audio: {len(pcm)} samples decoded")
    if not np.all(np.isfinite(pcm)):
        raise DecodeError("audio contains NaN or infinite samples")
    return resample(pcm, int(rate), rate_out, any_rate=True)


def _decode_av(path: Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise DecodeError("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE_HZ)
        parts = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(-1))
    if not parts:
        raise DecodeError("no audio frames")
    return np.concatenate(parts).astype(np.float32), SAMPLE_RATE_HZ


# ---- segmentation ------------------------------------------------------------------------------
def speech_probabilities(pcm16k: np.ndarray) -> np.ndarray:
    """Silero speech probability per 32 ms window (512 samples at 16 kHz)."""
    from ..audio.vad import SileroVAD

    vad = SileroVAD(VAD_RATE_HZ)
    return np.concatenate([vad.push(pcm16k), vad.flush()])


def segment_speech(probs: np.ndarray, window_s: float = 0.032, min_s: float = MIN_SEGMENT_S,
                   max_s: float = MAX_SEGMENT_S, merge_gap_s: float = MERGE_GAP_S
                   ) -> tuple[list[tuple[float, float]], int]:
    """Window probabilities -> speech segments (start_s, end_s) of min_s..max_s seconds, and the
    number of speech fragments dropped as too short."""
    from ..audio.vad import SpeechEnd, SpeechSegmenter, SpeechStart

    seg = SpeechSegmenter(VAD_RATE_HZ, min_silence_ms=200.0)
    regions: list[list[int]] = []  # window indices [start, end)
    for ev in seg.push(probs) + seg.flush():
        w = ev.sample_index / (window_s * VAD_RATE_HZ)
        if isinstance(ev, SpeechStart):
            regions.append([int(round(w)), len(probs)])
        elif isinstance(ev, SpeechEnd) and regions:
            regions[-1][1] = int(round(w))
    max_w, gap_w = int(max_s / window_s), int(merge_gap_s / window_s)
    # Split regions longer than max_s at the quietest window (lowest speech probability) where
    # the first piece is 1 s to max_s long; among equally quiet windows the latest (fewer pieces).
    pieces: list[tuple[int, int]] = []
    edge = int(1.0 / window_s)
    a_b = [tuple(r) for r in regions]
    for a, b in a_b:
        while b - a > max_w:
            lo, hi = a + edge, min(b - edge, a + max_w)
            if hi <= lo:
                cut = (a + b) // 2
            else:
                cand = probs[lo:hi] - 1e-6 * np.arange(hi - lo)
                cut = lo + int(np.argmin(cand))
            pieces.append((a, cut))
            a = cut
        pieces.append((a, b))
    # Merge close neighbours while they fit.
    merged: list[list[int]] = []
    for a, b in pieces:
        if merged and a - merged[-1][1] <= gap_w and b - merged[-1][0] <= max_w:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    out = [(a * window_s, b * window_s) for a, b in merged if (b - a) * window_s >= min_s]
    return out, len(merged) - len(out)


_CONTINUATION = re.compile(r"^(?:[-'\u2019.,;:?!%)\]]|n't\b)")


def merge_continuations(words: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """Whisper splits "non-administrator" into "non" + "-administrator" (and "re" + "-record");
    glue such continuations to the previous word so that " ".join(words) reads as Whisper's text."""
    out: list[tuple[str, float, float]] = []
    for w, s, e in words:
        if out and _CONTINUATION.match(w):
            pw, ps, pe = out[-1]
            out[-1] = (pw + w, ps, max(pe, e))
        else:
            out.append((w, s, e))
    return out


# ---- one file ----------------------------------------------------------------------------------
def file_key(rel: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", str(Path(rel).with_suffix(""))).strip("_")[:60] or "file"
    return f"{stem}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:8]}"


def file_split(rel: str, heldout_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return "heldout_sentence" if h < heldout_fraction else "train"


def process_file(path: Path, rel: str, out_dir: Path, speaker: str, split: str, whisper_model) -> list[dict]:
    """Segment records for one input file, or a single {"bad": True, ...} record."""
    from .whisper import transcribe

    def bad(reason: str) -> list[dict]:
        return [{"bad": True, "input": str(path), "reason": reason}]

    try:
        pcm = decode_audio(path)
    except DecodeError as e:
        return bad(str(e))
    except OSError as e:
        return bad(f"cannot read file ({e})")
    duration = len(pcm) / SAMPLE_RATE_HZ
    pcm16 = resample(pcm, SAMPLE_RATE_HZ, VAD_RATE_HZ)
    spans, short = segment_speech(speech_probabilities(pcm16))
    if not spans:
        return bad(f"no speech segment of at least {MIN_SEGMENT_S} s found by the VAD in {duration:.2f} s "
                   f"of audio" + (f" ({short} shorter fragment(s))" if short else ""))
    key = file_key(rel)
    records, empty, looped = [], 0, 0
    for k, (s, e) in enumerate(spans):
        prev_end = spans[k - 1][1] if k else 0.0
        next_start = spans[k + 1][0] if k + 1 < len(spans) else duration
        a = max(0.0, s - CONTEXT_S, (prev_end + s) / 2)
        b = min(duration, e + CONTEXT_S, (e + next_start) / 2)
        seg = pcm[int(a * SAMPLE_RATE_HZ):int(b * SAMPLE_RATE_HZ)]
        tr = transcribe(whisper_model, seg, SAMPLE_RATE_HZ)
        words = merge_continuations([(w, round(max(0.0, ws), 3), round(max(ws, we), 3))
                                     for w, ws, we in tr.words if w.strip()])
        if not words:
            empty += 1
            continue
        if len(words) > MAX_WORDS_PER_S * len(seg) / SAMPLE_RATE_HZ + 2:
            looped += 1
            continue
        seg_id = f"{key}-{k:03d}"
        pad = text_fit_padding(words, len(seg))
        if pad:
            seg = np.concatenate([seg, np.zeros(pad, np.float32)])
        write_flac_atomic(out_dir / "audio" / f"{seg_id}.flac", seg, SAMPLE_RATE_HZ)
        records.append({"id": seg_id, "audio": f"audio/{seg_id}.flac", "speaker": speaker,
                        "text": " ".join(w for w, _, _ in words), "words": [list(w) for w in words],
                        "duration_s": round(len(seg) / SAMPLE_RATE_HZ, 4), "split": split,
                        "source": f"audio:{rel}", "start_s": round(a, 3), "end_s": round(b, 3)})
    if not records:
        return bad(f"Whisper heard no words in {len(spans)} speech segment(s)" if not looped else
                   f"no usable transcript: {looped} of {len(spans)} segment(s) had more than "
                   f"{MAX_WORDS_PER_S:g} words/s (Whisper hallucinating)")
    if empty or short or looped:
        records[0]["file_notes"] = {"segments_without_words": empty, "short_fragments_dropped": short,
                                    "hallucinated_segments_dropped": looped}
    return records


# ---- Luigi -------------------------------------------------------------------------------------
def list_inputs(in_dir: Path) -> list[str]:
    """Every regular, non-hidden file under in_dir (relative paths, sorted): all of them are
    inputs, so anything that is not usable audio is reported, never silently skipped."""
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir}: no such input folder")
    return sorted(str(p.relative_to(in_dir)) for p in in_dir.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(in_dir).parts))


def _speaker_for(rel: str, in_dir: Path, speaker: str | None) -> str:
    if speaker:
        return speaker
    parent = Path(rel).parent
    return parent.name if str(parent) not in ("", ".") else in_dir.resolve().name


def file_output(out_dir: str | Path, rel: str) -> Path:
    return Path(out_dir) / "work" / "audio" / f"{file_key(rel)}.jsonl"


class AudioFile(luigi.Task):
    in_dir = luigi.Parameter()
    rel = luigi.Parameter()
    out_dir = luigi.Parameter()
    speaker = luigi.Parameter()
    split = luigi.Parameter()
    whisper_model = luigi.Parameter(default="")

    def output(self):
        return luigi.LocalTarget(str(file_output(self.out_dir, self.rel)))

    def run(self):
        from .whisper import load_whisper

        model = load_whisper(self.whisper_model or None, threads=1)
        try:
            records = process_file(Path(self.in_dir) / self.rel, self.rel, Path(self.out_dir), self.speaker,
                                   self.split, model)
        except Exception as e:  # noqa: BLE001 - one odd file must not stop the corpus
            records = [{"bad": True, "input": str(Path(self.in_dir) / self.rel),
                        "reason": f"{type(e).__name__}: {e}"}]
        write_jsonl_atomic(self.output().path, records)
        Progress(Path(self.out_dir) / "work" / "audio" / "progress.json").report()


class AudioCorpus(luigi.Task):
    in_dir = luigi.Parameter()
    out_dir = luigi.Parameter()
    params_json = luigi.Parameter()  # speaker, heldout_fraction, whisper_model, inputs

    def _params(self) -> dict:
        return json.loads(self.params_json)

    def requires(self):
        p = self._params()
        in_dir = Path(self.in_dir)
        return [AudioFile(in_dir=self.in_dir, rel=rel, out_dir=self.out_dir,
                          speaker=_speaker_for(rel, in_dir, p["speaker"]),
                          split=file_split(rel, p["heldout_fraction"]), whisper_model=p["whisper_model"])
                for rel in p["inputs"]]

    def output(self):
        return luigi.LocalTarget(str(Path(self.out_dir) / SEGMENTS_FILE))

    def complete(self):
        info = Path(self.out_dir) / "audio.json"
        if not (self.output().exists() and info.exists()):
            return False
        try:
            return json.loads(info.read_text()).get("params") == self._params()
        except (OSError, json.JSONDecodeError):
            return False

    def run(self):
        segs, bad = [], []
        notes = {"segments_without_words": 0, "short_fragments_dropped": 0, "hallucinated_segments_dropped": 0}
        for target in self.input():
            for r in read_jsonl(target.path):
                if r.pop("bad", False):
                    bad.append(r)
                    continue
                for k, v in r.pop("file_notes", {}).items():
                    notes[k] += v
                segs.append(r)
        out = Path(self.out_dir)
        write_jsonl_atomic(out / BAD_FILES_FILE, bad)
        write_json_atomic(out / "audio.json", {"params": self._params(), "stats": stats(segs),
                                               "bad_files": len(bad), "notes": notes})
        write_jsonl_atomic(self.output().path, segs)


def run_audio(in_dir: str | Path, out_dir: str | Path, whisper_model: str | None = None,
              speaker: str | None = None, heldout_fraction: float = 0.05, workers: int = 2,
              verbose: bool = False) -> bool:
    from .pipeline import build

    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir).resolve()
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    inputs = list_inputs(in_dir)
    if not inputs:
        raise FileNotFoundError(f"{in_dir}: no input files")
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"speaker": speaker, "heldout_fraction": heldout_fraction,
              "whisper_model": str(whisper_model or ""), "inputs": inputs}
    Progress(out_dir / "work" / "audio" / "progress.json").start(
        "audio", {str(file_output(out_dir, rel)): 1 for rel in inputs})
    t0 = time.time()
    ok = build([AudioCorpus(in_dir=str(in_dir), out_dir=str(out_dir), params_json=json.dumps(params))],
               workers=workers, verbose=verbose)
    if ok:
        info = json.loads((out_dir / "audio.json").read_text())
        print(format_stats(info["stats"], info["bad_files"]))
        n = info["notes"]
        print(f"dropped: {n['short_fragments_dropped']} speech fragments under {MIN_SEGMENT_S} s, "
              f"{n['segments_without_words']} segments where Whisper heard no words, "
              f"{n['hallucinated_segments_dropped']} with an implausible transcript (> {MAX_WORDS_PER_S:g} words/s)")
        print(f"corpus: {out_dir} ({time.time() - t0:.0f} s)")
    return ok
