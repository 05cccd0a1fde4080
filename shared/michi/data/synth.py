"""Synthetic multi-speaker corpus from offline TTS voices (`michi data synth`).

Plan (deterministic):
- the TTS voice (the voice the default model will speak with) reads `tts_sentences` training
  sentences; every other training voice reads `sentences_per_voice`; each voice takes the first
  N of its own seeded shuffle of the training sentences, so asking for more later keeps what
  exists (the same first N) and only adds;
- every training voice reads the same `heldout_sentences` held-out sentences (split
  "heldout_sentence"), and the held-out voice reads them too (split "heldout_voice"); the
  held-out voice shares no speaker with a training voice.

Work: one Luigi task per chunk of one voice's items (`SynthChunk`): synthesise, trim silence to
0.2 s, transcribe with Whisper and map its word times onto the known words (`wordtimes.py`),
pad the end with silence where the text needs more ticks than the audio has
(`corpus.text_fit_padding`, ~6 % of clips, ~0.2 s), write `audio/<id>.flac`. A piper clip's
record also carries the start of every phoneme it spoke (`phones`: [id, s], from piper's own
alignments), which the shards turn into one label per 10 ms frame. Several clips
are packed into one 30 s Whisper window (one encoder pass for ~5 clips, the dominant cost).
A chunk writes `work/synth/<voice>/<split>-<k>.jsonl` (segments and failures) last, atomically,
so a finished chunk is never redone. `SynthCorpus` then gathers the chunks of the current plan into `segments.jsonl` and `bad_files.jsonl`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import FRAME_SAMPLES, SAMPLE_RATE_HZ
from .corpus import (
    BAD_FILES_FILE,
    DEFAULT_HELDOUT_SENTENCES,
    DEFAULT_SENTENCES_PER_VOICE,
    DEFAULT_TTS_SENTENCES,
    SEGMENTS_FILE,
    format_stats,
    read_jsonl,
    stats,
    text_fit_padding,
)
from .pipeline import Progress, luigi, write_flac_atomic, write_json_atomic, write_jsonl_atomic
from .text import sentences
from .voices import (
    DEFAULT_HELDOUT_VOICE,
    DEFAULT_TRAIN_VOICES,
    DEFAULT_TTS_VOICE,
    VOICES,
    get_voice,
    synthesize_batch,
    trim_silence,
)
from .wordtimes import align_known_words

CHUNK = 40  # items per Luigi task (each loads Whisper and the voice: ~1.5 s)
KEEP_SILENCE_S = 0.2
PACK_S = 29.0  # Whisper window budget for a pack of clips (its window is 30 s)
PACK_GAP_S = 0.6  # silence between packed clips


@dataclass(frozen=True)
class SynthItem:
    id: str
    voice: str
    split: str
    text: str


def item_id(voice: str, text: str) -> str:
    return f"{voice}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:10]}"


def _voice_order(voice: str, texts: list[str]) -> list[str]:
    order = list(texts)
    random.Random(f"michi-synth-{voice}").shuffle(order)
    return order


def make_plan(tts_voice: str = DEFAULT_TTS_VOICE, voices: list[str] | None = None,
              heldout_voice: str | None = DEFAULT_HELDOUT_VOICE, tts_sentences: int = DEFAULT_TTS_SENTENCES,
              sentences_per_voice: int = DEFAULT_SENTENCES_PER_VOICE,
              heldout_sentences: int = DEFAULT_HELDOUT_SENTENCES) -> list[SynthItem]:
    """Every (voice, sentence, split) to synthesise, in a fixed order."""
    voices = list(voices) if voices else list(DEFAULT_TRAIN_VOICES)
    if tts_voice not in voices:
        voices.insert(0, tts_voice)
    for v in voices + ([heldout_voice] if heldout_voice else []):
        get_voice(v)
    if heldout_voice:
        if heldout_voice in voices:
            raise ValueError(f"held-out voice {heldout_voice} is also a training voice")
        shared = [v for v in voices if VOICES[v].speaker == VOICES[heldout_voice].speaker]
        if shared:
            raise ValueError(f"held-out voice {heldout_voice} has the same speaker "
                             f"({VOICES[heldout_voice].speaker}) as training voices {shared}")
    train, held = sentences("train"), sentences("heldout")
    held_pick = _voice_order("heldout", held)[:heldout_sentences]
    items: list[SynthItem] = []
    for v in voices:
        n = tts_sentences if v == tts_voice else sentences_per_voice
        items += [SynthItem(item_id(v, t), v, "train", t) for t in _voice_order(v, train)[:n]]
        items += [SynthItem(item_id(v, t), v, "heldout_sentence", t) for t in held_pick]
    if heldout_voice:
        items += [SynthItem(item_id(heldout_voice, t), heldout_voice, "heldout_voice", t) for t in held_pick]
    return items


def chunks(items: list[SynthItem], size: int = CHUNK) -> list[tuple[str, str, int, list[SynthItem]]]:
    """(voice, split, index, items) per Luigi task."""
    groups: dict[tuple[str, str], list[SynthItem]] = {}
    for it in items:
        groups.setdefault((it.voice, it.split), []).append(it)
    out = []
    for (voice, split), group in groups.items():
        for k in range(0, len(group), size):
            out.append((voice, split, k // size, group[k:k + size]))
    return out


def chunk_path(out_dir: str | Path, voice: str, split: str, index: int) -> Path:
    return Path(out_dir) / "work" / "synth" / voice / f"{split}-{index:04d}.jsonl"


def progress_file(out_dir: str | Path) -> Path:
    return Path(out_dir) / "work" / "synth" / "progress.json"


# ---- the work of one chunk ---------------------------------------------------------------------
def synth_items(items: list[SynthItem], out_dir: Path, whisper_model) -> list[dict]:
    """Synthesise, trim, write audio, transcribe (packed) and time the words of `items`.
    Returns one record per item: a segment, or {"bad": True, "input", "reason"}."""
    from .whisper import transcribe

    voice = items[0].voice
    records: dict[str, dict] = {}
    clips: list[tuple[SynthItem, np.ndarray, list | None]] = []  # item, trimmed audio, phone times
    for it, clip in zip(items, synthesize_batch(voice, [it.text for it in items])):
        if isinstance(clip, Exception):
            records[it.id] = {"bad": True, "input": f"synth:{it.voice}:{it.text}", "id": it.id,
                              "reason": f"synthesis failed: {clip}"}
            continue
        pcm, cut_s = trim_silence(clip.pcm, SAMPLE_RATE_HZ, KEEP_SILENCE_S)
        if len(pcm) < SAMPLE_RATE_HZ * 2 * KEEP_SILENCE_S + FRAME_SAMPLES:
            records[it.id] = {"bad": True, "input": f"synth:{it.voice}:{it.text}", "id": it.id,
                              "reason": "synthesis produced (almost) no speech"}
            continue
        clips.append((it, pcm, shift_times(clip.phone_times, cut_s)))

    for pack in _packs(clips):
        gap = np.zeros(int(PACK_GAP_S * SAMPLE_RATE_HZ), np.float32)
        audio, spans, pos = [], [], 0
        for _, pcm, _ in pack:
            spans.append((pos / SAMPLE_RATE_HZ, (pos + len(pcm)) / SAMPLE_RATE_HZ))
            audio += [pcm, gap]
            pos += len(pcm) + len(gap)
        tr = transcribe(whisper_model, np.concatenate(audio), SAMPLE_RATE_HZ)
        speech = [(KEEP_SILENCE_S, len(pcm) / SAMPLE_RATE_HZ - KEEP_SILENCE_S) for _, pcm, _ in pack]
        aligned = align_known_words([it.text for it, _, _ in pack], spans, speech, tr.words)
        for (it, pcm, times), res in zip(pack, aligned):
            pad = text_fit_padding(res.words, len(pcm))  # fast speech: room for every text byte
            if pad:
                pcm = np.concatenate([pcm, np.zeros(pad, np.float32)])
            write_flac_atomic(out_dir / "audio" / f"{it.id}.flac", pcm, SAMPLE_RATE_HZ)
            records[it.id] = {
                "id": it.id, "audio": f"audio/{it.id}.flac", "speaker": it.voice, "text": it.text,
                "words": [list(w) for w in res.words], "duration_s": round(len(pcm) / SAMPLE_RATE_HZ, 4),
                "split": it.split, "source": f"synth:{VOICES[it.voice].engine}:{VOICES[it.voice].name}",
                "asr": res.asr_text, "matched": round(res.matched, 3)}
            if times is not None:
                records[it.id]["phones"] = [list(t) for t in times]
    return [records[it.id] for it in items]


def shift_times(times: list[tuple[int, float]] | None, cut_s: float) -> list[tuple[int, float]] | None:
    """Phone times of a clip after `cut_s` seconds were cut from its start (negative: padded):
    what started before the cut starts at 0."""
    if times is None:
        return None
    shifted = [(p, round(max(0.0, float(t) - cut_s), 5)) for p, t in times]
    return [pt for i, pt in enumerate(shifted) if i + 1 == len(shifted) or shifted[i + 1][1] > 0]


def _packs(clips: list) -> list[list]:
    packs, cur, total = [], [], 0.0
    for c in clips:
        d = len(c[1]) / SAMPLE_RATE_HZ + PACK_GAP_S
        if cur and total + d > PACK_S:
            packs.append(cur)
            cur, total = [], 0.0
        cur.append(c)
        total += d
    if cur:
        packs.append(cur)
    return packs


# ---- Luigi -------------------------------------------------------------------------------------
class SynthChunk(luigi.Task):
    """One voice's chunk of items: audio files + a JSONL of segment (or failure) records."""

    out_dir = luigi.Parameter()
    voice = luigi.Parameter()
    split = luigi.Parameter()
    index = luigi.IntParameter()
    items = luigi.ListParameter(visibility=luigi.parameter.ParameterVisibility.PRIVATE)
    whisper_model = luigi.Parameter(default="")

    def output(self):
        return luigi.LocalTarget(str(chunk_path(self.out_dir, self.voice, self.split, self.index)))

    def complete(self):
        """Done when the chunk file holds exactly these items (a plan with other counts puts
        other items in a chunk of the same number: that chunk is redone)."""
        if not self.output().exists():
            return False
        try:
            done = [r.get("id") for r in read_jsonl(self.output().path)]
        except (OSError, ValueError):
            return False
        return done == [it["id"] for it in self.items]

    def run(self):
        from .whisper import load_whisper

        t0, c0 = time.perf_counter(), sum(os.times()[:4])
        items = [SynthItem(**dict(it)) for it in self.items]
        model = load_whisper(self.whisper_model or None, threads=1)
        records = synth_items(items, Path(self.out_dir), model)
        write_jsonl_atomic(self.output().path, records)
        Progress(progress_file(self.out_dir)).report(
            f"{self.voice} {self.split}-{self.index:04d}: {len(items)} in {time.perf_counter() - t0:.0f} s, "
            f"cpu {sum(os.times()[:4]) - c0:.0f} s")


class SynthCorpus(luigi.Task):
    """Gathers the plan's chunks into segments.jsonl + bad_files.jsonl (+ synth.json: plan, stats)."""

    out_dir = luigi.Parameter()
    plan_json = luigi.Parameter()  # the arguments of make_plan, as JSON (identifies the plan)
    whisper_model = luigi.Parameter(default="")

    def _plan(self):
        return make_plan(**json.loads(self.plan_json))

    def requires(self):
        return [SynthChunk(out_dir=self.out_dir, voice=v, split=s, index=k,
                           items=[asdict(it) for it in group], whisper_model=self.whisper_model)
                for v, s, k, group in chunks(self._plan())]

    def output(self):
        return luigi.LocalTarget(str(Path(self.out_dir) / SEGMENTS_FILE))

    def complete(self):
        info = Path(self.out_dir) / "synth.json"
        if not (self.output().exists() and info.exists()):
            return False
        try:
            return json.loads(info.read_text()).get("plan") == json.loads(self.plan_json)
        except (OSError, json.JSONDecodeError):
            return False

    def run(self):
        segs, bad = [], []
        for target in self.input():
            for r in read_jsonl(target.path):
                (bad if r.get("bad") else segs).append(r)
        for b in bad:
            b.pop("bad", None)
        out = Path(self.out_dir)
        write_jsonl_atomic(out / BAD_FILES_FILE, bad)
        st = stats(segs)
        write_json_atomic(out / "synth.json", {"plan": json.loads(self.plan_json), "stats": st,
                                               "bad_files": len(bad)})
        write_jsonl_atomic(self.output().path, segs)  # last: its presence marks the corpus done


def run_synth(out_dir: str | Path, workers: int = 2, whisper_model: str | None = None,
              verbose: bool = False, **plan_args) -> bool:
    """Build (or finish, or leave as is) a synthetic corpus; prints progress and a summary."""
    from .pipeline import build

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_json = json.dumps(plan_args, sort_keys=True)
    plan = make_plan(**plan_args)
    units = {str(chunk_path(out_dir, v, s, k)): len(g) for v, s, k, g in chunks(plan)}
    task = SynthCorpus(out_dir=str(out_dir), plan_json=plan_json, whisper_model=str(whisper_model or ""))
    if not task.complete():
        for chunk in task.requires():  # a chunk file from another plan is redone: not "done"
            if chunk.output().exists() and not chunk.complete():
                Path(chunk.output().path).unlink()
    Progress(progress_file(out_dir)).start("synth", units)
    t0 = time.time()
    ok = build([task], workers=workers, verbose=verbose)
    if ok:
        info = json.loads((out_dir / "synth.json").read_text())
        print(format_stats(info["stats"], info["bad_files"]))
        print(f"corpus: {out_dir} ({time.time() - t0:.0f} s)")
    return ok
