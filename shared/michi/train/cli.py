"""`michi train ...` subcommands: the recipe (all stages or some), speaker fine-tuning, loss plots.

Under torchrun every command runs one rank per process:
    torchrun --nproc_per_node 8 -m michi.train recipe --preset full --corpus data/synth --out runs/full
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _pairs(text: str, kind=float) -> dict:
    """"text=2000,codec=3000" -> {"text": 2000, "codec": 3000}; "leads=0/5/10" -> a tuple."""
    out: dict = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"expected stage=value, got {item!r}")
        out[key.strip()] = tuple(kind(v) for v in value.split("/")) if "/" in value else kind(value)
    return out


def cmd_recipe(args: argparse.Namespace) -> int:
    from .recipe import STAGES, RecipeConfig, train_recipe

    rc = RecipeConfig(corpus=args.corpus, out=args.out, preset=args.preset, init=args.init,
                      new_vocoder=args.new_vocoder, device=args.device,
                      seed=args.seed, tts_speakers=args.tts_speakers.split(",") if args.tts_speakers else None,
                      text_file=args.text, snapshot_minutes=args.snapshot_minutes)
    rc.steps.update(_pairs(args.steps, int))
    rc.minutes.update(_pairs(args.minutes, float))
    rc.lr.update(_pairs(args.lr, float))
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; the recipe's stages are {', '.join(STAGES)}")
    rc.stages = stages
    for key, value in _pairs(args.codec, float).items():
        _set(rc.codec, key, value)
    for key, value in _pairs(args.basis, float).items():
        _set(rc.basis, key, value)
    for key, value in _pairs(args.voicing, float).items():
        _set(rc.voicing, key, value)
    for key, value in _pairs(args.durations, float).items():
        _set(rc.durations, key, value)
    for key, value in _pairs(args.hearing, float).items():
        _set(rc.hearing, key, value)
    for key, value in _pairs(args.sequence, float).items():
        _set(rc.sequence, key, value)
    train_recipe(rc)
    return 0


def _set(obj, key: str, value) -> None:
    if not hasattr(obj, key):
        raise ValueError(f"{type(obj).__name__} has no setting {key!r}")
    current = getattr(obj, key)
    if isinstance(current, tuple):  # a/b/c on the command line
        kind = type(current[0]) if current else float
        setattr(obj, key, tuple(kind(v) for v in (value if isinstance(value, tuple) else (value,))))
    elif isinstance(value, tuple):
        raise ValueError(f"{type(obj).__name__}.{key} takes one value, not {value}")
    else:
        setattr(obj, key, type(current)(value))


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    finetune(args.model, args.audio, args.out, steps=args.steps, minutes=args.minutes, device=args.device,
             speaker=args.speaker, whisper_model=args.whisper_model, lr=args.lr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .loop import LOG_FILE, plot_losses

    run = Path(args.run)
    from .recipe import STAGES

    order = {name: i for i, name in enumerate(STAGES)}
    found = sorted(run.glob(f"*/{LOG_FILE}"), key=lambda p: (order.get(p.parent.name, len(order)), p.parent.name))
    logs = {log.parent.name: log for log in found}
    if not logs:
        raise FileNotFoundError(f"{run}: no stage folders with a {LOG_FILE}")
    for name, log in logs.items():
        print(plot_losses(log, log.parent / "losses.png", title=f"{name} stage"))
    print(plot_losses(logs, Path(args.out or run / "losses.png"), title=f"training run {run.name}"))
    return 0


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    """Register `michi train ...` on the top-level subparsers."""
    p = sub.add_parser("train", help="train: the staged recipe, speaker fine-tuning, loss plots")
    tsub = p.add_subparsers(dest="train_command", required=True)

    sp = tsub.add_parser("recipe", help="text -> codec (or basis) -> speak -> joint, and the text-only baseline")
    sp.add_argument("--corpus", required=True, help="corpus directory (michi data synth / audio)")
    sp.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    sp.add_argument("--preset", default="tiny", help="model size: tiny (CPU) or full (GPU); tiny-melpca: tiny on "
                    "the mel-PCA latent (a fitted basis instead of a trained codec); tiny-whisper: tiny-melpca "
                    "hearing through Whisper tiny.en's encoder; tiny-mel-whisper: through both, side by side")
    sp.add_argument("--init", default=None, help="start from this Michi checkpoint instead of random init (with "
                    "a mel-PCA preset and a learned-codec checkpoint: from its backbone)")
    sp.add_argument("--new-vocoder", action="store_true", help="with --init: replace its vocoder by a new "
                    "one of the preset's design (train it with --stages vocoder)")
    sp.add_argument("--stages", default=None, help="comma list, default: text,basis,codec,vocoder,voicing,"
                    "durations,hearing,speak,joint,baseline (basis and voicing run for a mel-PCA model only, "
                    "voicing with the voiced decoder, durations with a duration predictor; codec and vocoder "
                    "for a learned one; hearing trains the listen text head alone)")
    sp.add_argument("--steps", default="", help="per stage, e.g. text=2000,codec=3000,vocoder=1000,speak=1000,joint=3000")
    sp.add_argument("--minutes", default="", help="wall-time cap per stage, e.g. codec=10,joint=10")
    sp.add_argument("--lr", default="", help="per stage learning rate, e.g. joint=3e-4")
    sp.add_argument("--codec", default="", help="codec settings, e.g. batch_size=32,adversarial_after=0.3")
    sp.add_argument("--basis", default="", help="mel-PCA basis fit, e.g. max_minutes=30")
    sp.add_argument("--voicing", default="", help="voicing stage settings, e.g. batch_size=16,telephone=0.5")
    sp.add_argument("--durations", default="", help="durations stage settings, e.g. batch_size=32")
    sp.add_argument("--hearing", default="", help="hearing stage settings, e.g. batch_size=24,asterisk=0.25")
    sp.add_argument("--sequence", default="", help="speak/joint settings, e.g. batch_size=32,text_ratio=0.3")
    sp.add_argument("--tts-speakers", default=None, help="voices the speak/joint stages learn (default: all)")
    sp.add_argument("--text", default=None, help="pure text: JSONL, a .txt of blank-line separated "
                    "documents, or a folder of .txt (default: the offline Debian text corpus)")
    sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--snapshot-minutes", type=float, default=None,
                    help="a checkpoint every N minutes of the speak/joint stages in RUN/snapshots/ (for "
                         "the learning curve: python -m michi.eval.curve RUN)")
    sp.set_defaults(func=cmd_recipe)

    sp = tsub.add_parser("finetune", help="fine-tune a model on one speaker from a folder of recordings")
    sp.add_argument("--audio", required=True, help="folder of recordings (any common format and rate)")
    sp.add_argument("--out", required=True, help="run directory; the model lands in OUT/model")
    sp.add_argument("--model", default=None, help="model to start from (default: the shipped model)")
    sp.add_argument("--speaker", default="target")
    sp.add_argument("--steps", type=int, default=500)
    sp.add_argument("--minutes", type=float, default=None)
    sp.add_argument("--lr", type=float, default=2e-4)
    sp.add_argument("--whisper-model", default=None, help="local CTranslate2 Whisper directory")
    sp.add_argument("--device", default=None)
    sp.set_defaults(func=cmd_finetune)

    sp = tsub.add_parser("plot", help="(re)draw the loss curves of a run as PNG: per stage and all stages")
    sp.add_argument("run")
    sp.add_argument("--out", default=None, help="the all-stages figure (default: RUN/losses.png)")
    sp.set_defaults(func=cmd_plot)


def main(argv: list[str] | None = None) -> int:
    """`python -m michi.train ...` (e.g. under torchrun): the train commands alone, without the
    serving and data-pipeline imports of the full CLI."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m michi.train")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
