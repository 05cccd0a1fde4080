"""`michi eval listen`: what the listen side hears, per transcript source, on the same audio.

Each item streams tick by tick through the listen encoder and a source (`michi.transcript`: the
learned head, and Whisper streaming when asked), as a call does; the final transcript is the
stable text plus what `finish` flushes. Per set and source: WER and CER. Sets: the held-out
synthetic voice, the held-out Asterisk prompts (`speech.asterisk_split("heldout")`, split by prompt
text from those the hearing stage trains on), and both through the 8 kHz mu-law telephone channel.

Lag: for every word of the transcript that matches a word of the reference (the longest matching
blocks of the two word lists), the time from the word's end in the audio to the arrival of its
last character: the end of the tick that emitted it, plus the source's compute time in that tick.
Word ends come from Whisper's word timestamps on the clean audio (tiny.en: about +-0.1 s). The
real-time factor is a source's compute time (the listen encoder's included) over the audio time.
"""
from __future__ import annotations

import difflib
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..audio.augment import telephone
from ..config import FRAME_SAMPLES, SAMPLE_RATE_HZ, TICK_S
from ..transcript import beam_settings, decodes_phonemes, transcriber, with_tail
from .speech import item_row
from .wer import normalize_text, summary


def stream(michi, source: str, pcm: np.ndarray, whisper_model=None,
           decoder: dict[str, float] | None = None, lead_s: float = 0.0) -> dict[str, Any]:
    """One item through the encoder and a fresh `source` stream, a tick at a time, after `lead_s`
    of silence (whole ticks): the transcript, each stable piece's arrival time from the item's
    start, and the compute time."""
    lead = round(lead_s / TICK_S) * FRAME_SAMPLES
    start_s = lead / SAMPLE_RATE_HZ  # the item's start in the stream: arrivals count from it
    pcm = np.concatenate([np.zeros(lead, np.float32), with_tail(pcm)])
    m = michi.model
    source_stream = transcriber(source, michi, whisper_model, decoder)
    with torch.inference_mode():
        state = m.listen.init_state(1, device=michi.device)
    pieces: list[tuple[str, float]] = []
    compute = 0.0
    for tick in range(len(pcm) // FRAME_SAMPLES):
        chunk = pcm[tick * FRAME_SAMPLES:(tick + 1) * FRAME_SAMPLES]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out, state = m.listen.step(torch.from_numpy(chunk).to(michi.device)[None], state)
        encode_s = time.perf_counter() - t0
        (heard,) = source_stream.push(chunk, out.features[0])
        compute += encode_s + heard.compute_s
        if heard.text:
            pieces.append((heard.text, (tick + 1) * TICK_S - start_s + encode_s + heard.compute_s))
    final = source_stream.finish()
    compute += final.compute_s
    if final.text:
        pieces.append((final.text, len(pcm) / SAMPLE_RATE_HZ - start_s + final.compute_s))
    return {"text": "".join(p for p, _ in pieces).strip(), "pieces": pieces, "compute_s": compute,
            "audio_s": len(pcm) / SAMPLE_RATE_HZ}


def word_arrivals(pieces: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Normalised words of the stable text with the arrival of each one's last character."""
    text, ends = "", []
    for piece, t in pieces:
        text += piece
        ends += [t] * len(piece)
    out, start = [], None
    for i, ch in enumerate(text + " "):
        if ch.isspace():
            if start is not None:
                for word in normalize_text(text[start:i]).split():
                    out.append((word, ends[i - 1]))
                start = None
        elif start is None:
            start = i
    return out


def lags(reference: Sequence[tuple[str, float]], arrivals: Sequence[tuple[str, float]]) -> list[float]:
    """Arrival minus reference end, for the words in the matching blocks of the two word lists.
    `reference`: (word, end_s) of the audio (any case; normalised here)."""
    ref = [(w, end) for word, end in reference for w in normalize_text(word).split()]
    matcher = difflib.SequenceMatcher(a=[w for w, _ in ref], b=[w for w, _ in arrivals], autojunk=False)
    return [arrivals[block.b + k][1] - ref[block.a + k][1]
            for block in matcher.get_matching_blocks() for k in range(block.size)]


def listen_sets(voice: Sequence, asterisk: Sequence, channel: bool = True) -> dict[str, list[tuple[Any, np.ndarray]]]:
    """Named sets of (item, 24 kHz audio): the voice and Asterisk items, and with `channel` both
    through the telephone line."""
    sets = {"heldout_voice": [(it, it.audio(SAMPLE_RATE_HZ)) for it in voice],
            "asterisk": [(it, it.audio(SAMPLE_RATE_HZ)) for it in asterisk]}
    if channel:
        for name in ("heldout_voice", "asterisk"):
            sets[f"{name}_telephone"] = [(it, telephone(pcm)) for it, pcm in sets[name]]
    return {k: v for k, v in sets.items() if v}


def eval_listen(michi, sets: Mapping[str, Sequence[tuple[Any, np.ndarray]]], sources: Sequence[str] = ("head",),
                judge=None, whisper_model=None, decoder: dict[str, float] | None = None, lead_s: float = 0.0,
                progress: Callable[[str, int, int], None] = lambda *_: None) -> dict[str, Any]:
    """WER/CER per set and source, lag p50/p95 (with a `judge`: `speech.WhisperJudge`, for the
    word times of the clean sets), real-time factor per source. `decoder`: beam search settings
    over the model's own (`HeadTranscriber`), e.g. from a sweep. `lead_s`: each item streams after
    this much silence, as a caller who speaks later in a call (0: from the stream's start)."""
    reference: dict[str, list[tuple[str, float]]] = {}
    if judge is not None:
        from ..data.whisper import transcribe

        for name, items in sets.items():
            if not name.endswith("_telephone"):
                for it, pcm in items:
                    reference[it.id] = [(w, end) for w, _s, end in transcribe(judge.model, pcm, SAMPLE_RATE_HZ).words]
    total = sum(len(v) for v in sets.values()) * len(sources)
    rows: list[dict[str, Any]] = []
    per_source: dict[str, Any] = {}
    for source in sources:
        compute = audio = 0.0
        source_lags: list[float] = []
        for name, items in sets.items():
            for it, pcm in items:
                heard = stream(michi, source, pcm, whisper_model, decoder, lead_s)
                compute, audio = compute + heard["compute_s"], audio + heard["audio_s"]
                if it.id in reference and not name.endswith("_telephone"):
                    source_lags += lags(reference[it.id], word_arrivals(heard["pieces"]))
                rows.append({"id": it.id, "set": name, "source": source, **item_row(it.text, heard["text"])})
                progress(f"listen:{source}", len(rows), total)
        mine = [r for r in rows if r["source"] == source]
        per_source[source] = {
            **summary(mine), "sets": {name: summary([r for r in mine if r["set"] == name]) for name in sets},
            "lag_s": _quantiles(source_lags), "lag_words": len(source_lags),
            "rtf": compute / max(audio, 1e-9), "compute_s": compute, "audio_s": audio}
    first = per_source[sources[0]]
    return {"task": "listen", "wer": first["wer"], "cer": first["cer"], "items": first["items"],
            "sets": first["sets"], "sources": per_source, "default_source": sources[0],
            "head_enabled": michi.model.listen_text.enabled,
            "decoder": beam_settings(michi, decoder, phones=decodes_phonemes(michi)),
            "decoder_kind": "phonemes" if decodes_phonemes(michi) else "bytes", "lead_s": lead_s,
            "lag_reference": "Whisper word ends, clean audio"
            if judge is not None else None, "rows": rows}


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}
