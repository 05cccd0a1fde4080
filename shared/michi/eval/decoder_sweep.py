"""`python -m michi.eval.decoder_sweep`: the listen head's beam search settings, chosen on a dev set.

The dev set is a corpus's `heldout_sentence` clips: the training voices reading held-out sentences
(the hearing stage trains on the `train` split only; the sentences `michi eval listen --limit 40`
reads are left out), clean and through the 8 kHz mu-law line. The head runs once per clip (its
log-probs kept: streaming equals offline, `tests/eval/test_hearing_eval.py`); each setting of the
grid then decodes every clip a tick at a time as a call does (`michi.model.textlm.BeamDecoder`,
over the settings shipped with the model's LM; with `--phones`, the phoneme slots through
`michi.model.lexicon.PhoneBeamDecoder` with the model's word LM, or its character LM with
`--char-lm`, over the settings shipped with its lexicon). Per setting: WER and CER, clean and on the line,
and the lag from each matched word's end (the corpus's word times: Whisper's, from the pipeline)
to the end of the tick whose stable text completed it; the decoder's compute is not counted
(`michi eval listen` measures it).

    python -m michi.eval.decoder_sweep --corpus data/small --grid "margin=4,6,8;settle=5,10,20"
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..audio.augment import telephone
from ..audio.io import read_wav
from ..config import SAMPLE_RATE_HZ, TICK_S
from ..model.lexicon import PhoneBeamDecoder, phone_decoder_settings
from ..model.textlm import BeamDecoder, decoder_settings
from ..transcript import beam_settings, decodes_phonemes, mute, phone_decoder, silent_ticks, with_tail
from .listen import _quantiles, lags, word_arrivals
from .speech import default_sentences, item_row, spread
from .wer import normalize_text, summary

EVAL_LIMIT = 40  # the card's `michi eval listen --limit 40`: its sentences stay out of the dev set


def dev_clips(corpus: str | Path, limit: int) -> list[dict[str, Any]]:
    """`limit` heldout_sentence clips spread over the corpus (a stable shuffle first, so that every
    voice is in), each {"id", "text", "audio" (24 kHz), "words": [(word, end s)]}."""
    corpus = Path(corpus)
    left_out = {normalize_text(t) for t in default_sentences(EVAL_LIMIT)}
    segments = [s for s in map(json.loads, (corpus / "segments.jsonl").read_text().splitlines())
                if s.get("split") == "heldout_sentence" and s.get("words")
                and normalize_text(s["text"]) not in left_out]
    segments.sort(key=lambda s: hashlib.sha1(s["id"].encode()).hexdigest())
    return [{"id": s["id"], "text": s["text"], "audio": read_wav(corpus / s["audio"], rate_out_hz=SAMPLE_RATE_HZ)[0],
             "words": [(w, end) for w, _start, end in s["words"]]} for s in spread(segments, limit)]


@torch.inference_mode()
def head_log_probs(michi, pcm: np.ndarray, phones: bool = False) -> torch.Tensor:
    """The text head's log-probs over a clip and its tail, silent ticks muted as in a call:
    [ticks, slots, vocab + 1] (`phones`: its phoneme slots, [ticks, slots, phonemes + 1])."""
    m, pcm = michi.model, with_tail(pcm)
    head = m.listen_text
    features = m.listen(torch.from_numpy(pcm).to(michi.device)[None]).features
    if phones:
        logits = head.phone_logits(head.hidden(features))
        logits = logits.view(1, features.shape[1], -1, logits.shape[-1])
    else:
        logits, _ = head.step(features, head.init_state(1, device=michi.device))
    return mute(logits[0].float().log_softmax(-1), silent_ticks(pcm)).cpu()


def decode(decoder: BeamDecoder | PhoneBeamDecoder, log_probs: torch.Tensor) -> list[tuple[str, float]]:
    """Stable pieces with the end time of the tick that gave each, then what `finish` flushes."""
    decoder.reset()
    pieces = [(text, (i + 1) * TICK_S) for i, tick in enumerate(log_probs) if (text := decoder.step(tick))]
    rest = decoder.finish()
    return pieces + ([(rest, len(log_probs) * TICK_S)] if rest else [])


def settings(spec: str) -> dict[str, float]:
    """"margin=4,settle=6" -> {"margin": 4, "settle": 6}: `BeamDecoder` settings (whole numbers as
    int); anything else is a ValueError that names the known settings."""
    out: dict[str, float] = {}
    for pair in filter(None, spec.split(",")):
        key, _, value = pair.partition("=")
        out[_known(key.strip())] = _number(value)
    return out


def grid(spec: str) -> list[dict[str, float]]:
    """"margin=4,6;settle=5,10" -> every combination: {"margin": 4, "settle": 5}, ..."""
    axes = []
    for axis in filter(None, spec.split(";")):
        key, _, values = axis.partition("=")
        axes.append([(_known(key.strip()), _number(v)) for v in values.split(",") if v.strip()])
    if not axes:
        raise ValueError(f"no settings in {spec!r}: e.g. 'margin=4,6;settle=5,10'")
    return [dict(combo) for combo in itertools.product(*axes)]


def _known(key: str) -> str:
    known = decoder_settings() | phone_decoder_settings()
    if key not in known:
        raise ValueError(f"{key!r} is not a beam search setting: one of {sorted(known)}")
    return key


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    return int(value) if value.is_integer() else value


def sweep(michi, clips: list[dict[str, Any]], combos: list[dict[str, float]],
          progress=lambda *_: None, phones: bool = False) -> list[dict[str, Any]]:
    """One row per setting: WER/CER clean and on the line, lag p50/p95 (clean). `phones`: the
    phoneme decoder (`PhoneBeamDecoder`, with the model's lexicon) instead of the byte one."""
    head = michi.model.listen_text
    cached = [(clip, head_log_probs(michi, clip["audio"], phones), head_log_probs(michi, telephone(clip["audio"]), phones))
              for clip in clips]
    out = []
    for n, setting in enumerate(combos, 1):
        if phones:
            decoder = phone_decoder(michi, setting)
        else:
            decoder = BeamDecoder(michi.text_lm, head.blank, **beam_settings(michi, setting))
        clean, line, setting_lags = [], [], []
        for clip, clean_lp, line_lp in cached:
            pieces = decode(decoder, clean_lp)
            clean.append(item_row(clip["text"], "".join(p for p, _ in pieces)))
            setting_lags += lags(clip["words"], word_arrivals(pieces))
            line.append(item_row(clip["text"], "".join(p for p, _ in decode(decoder, line_lp))))
        out.append({"settings": setting, "clean": summary(clean), "telephone": summary(line),
                    "lag_s": _quantiles(setting_lags), "lag_words": len(setting_lags)})
        progress(out[-1], n, len(combos))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m michi.eval.decoder_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--corpus", default="data/small", help="a synthetic corpus (`michi data synth`)")
    ap.add_argument("--limit", type=int, default=80, help="dev clips")
    ap.add_argument("--grid", default="margin=4,6,8;settle=5,10,20",
                    help="BeamDecoder settings: axes split by ';', values by ','")
    ap.add_argument("--phones", action="store_true",
                    help="sweep the phoneme decoder (PhoneBeamDecoder, the model's lexicon) instead of the byte one")
    ap.add_argument("--char-lm", action="store_true",
                    help="with --phones: score words by the character LM even where the model has a word LM")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/eval/decoder-sweep.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .. import api

    michi = api.load(args.model or "default")
    if getattr(michi, "text_lm", None) is None:
        raise SystemExit(f"{args.model or 'default'}: no character LM beside the weights (text_lm.json.gz)")
    if args.phones and not decodes_phonemes(michi):
        raise SystemExit(f"{args.model or 'default'}: no phoneme output or no lexicon beside the weights")
    if args.char_lm:
        michi.word_lm = None
    shipped = beam_settings(michi, phones=args.phones)
    try:
        combos = grid(args.grid)
    except ValueError as e:
        raise SystemExit(f"--grid: {e}") from None
    clips = dev_clips(args.corpus, args.limit)
    if not clips:
        raise SystemExit(f"{args.corpus}: no heldout_sentence clips with word times")
    print(f"{len(clips)} dev clips, {len(combos)} settings over {shipped}", flush=True)

    def show(row: dict[str, Any], n: int, total: int) -> None:
        lag = row["lag_s"]
        print(f"[{n}/{total}] {row['settings']}: WER {100 * row['clean']['wer']:.1f} % clean, "
              f"{100 * row['telephone']['wer']:.1f} % line; lag p50 {lag['p50']:.2f} s, p95 {lag['p95']:.2f} s",
              flush=True)

    rows = sweep(michi, clips, combos, show, phones=args.phones)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python -m michi.eval.decoder_sweep", *sys.argv[1:]]),
                               "dev": f"{len(clips)} heldout_sentence clips of {args.corpus}, clean and mu-law",
                               "decoder": "phonemes" if args.phones else "bytes",
                               "lm": "word" if args.phones and michi.word_lm is not None else "character",
                               "shipped": shipped, "rows": rows}, indent=1) + "\n")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
