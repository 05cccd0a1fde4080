"""Luigi plumbing shared by the data pipelines: atomic outputs, progress, running a build.

Every unit of work is a `luigi.Task` whose output is a `luigi.LocalTarget` written atomically
(a temporary file in the same directory, then `os.replace`), so an interrupted run leaves no
half-written output and a second run finds every finished unit complete and does nothing for it.
`build()` runs tasks with the local scheduler (no daemon) and `workers` processes, prints
Luigi's detailed summary and returns False when anything failed (the CLI then exits non-zero).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

with warnings.catch_warnings():  # luigi warns at import about range-task autoloading
    warnings.simplefilter("ignore", DeprecationWarning)
    import luigi
    import luigi.execution_summary


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on error
    removed. `suffix` keeps the extension that some writers (soundfile) need to pick a format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
    return n


def write_flac_atomic(path: str | Path, pcm, rate_hz: int) -> None:
    """16-bit mono FLAC, atomically."""
    import numpy as np
    import soundfile as sf

    with atomic_path(path, suffix=".flac") as tmp:
        sf.write(str(tmp), np.clip(pcm, -1.0, 1.0), rate_hz, subtype="PCM_16", format="FLAC")


class Progress:
    """done/total, rate and ETA across worker processes. The parent writes a plan file listing
    every unit's output path and size; a unit that finishes counts the finished outputs on disk
    (cheap: stat calls only) and prints one line."""

    def __init__(self, plan_file: str | Path):
        self.plan_file = Path(plan_file)

    def start(self, name: str, units: dict[str, int]) -> None:
        done = sum(n for p, n in units.items() if Path(p).exists())
        total = sum(units.values())
        if done < total:  # nothing to do: write nothing (a rerun must not touch the corpus)
            write_json_atomic(self.plan_file, {"name": name, "start": time.time(), "done_at_start": done,
                                               "units": units})
        print(f"[{name}] {done}/{total} already done; {total - done} to do", flush=True)

    def report(self, note: str = "") -> None:
        try:
            plan = json.loads(self.plan_file.read_text())
        except (OSError, json.JSONDecodeError):
            return
        units = plan["units"]
        total = sum(units.values())
        done = sum(n for p, n in units.items() if os.path.exists(p))
        elapsed = max(1e-6, time.time() - plan["start"])
        new = done - plan["done_at_start"]
        rate = new / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_s = f"{eta / 60:.1f} min" if eta != float("inf") else "?"
        print(f"[{plan['name']}] {done}/{total} ({100 * done / max(1, total):.1f}%), "
              f"{rate:.2f}/s, elapsed {elapsed / 60:.1f} min, ETA {eta_s}" + (f"  [{note}]" if note else ""),
              flush=True)


def quiet_luigi() -> None:
    """Keep Luigi's per-task INFO chatter out of the console (warnings and the summary stay)."""
    logging.getLogger("luigi-interface").setLevel(logging.WARNING)
    logging.getLogger("luigi").setLevel(logging.WARNING)


def build(tasks: list[luigi.Task], workers: int = 1, verbose: bool = False) -> bool:
    """Run `tasks` (and what they require) with the local scheduler; True when all succeeded."""
    if not verbose:
        quiet_luigi()
    result = luigi.build(tasks, workers=max(1, workers), local_scheduler=True, detailed_summary=True,
                         log_level="WARNING" if not verbose else "INFO")
    print(result.summary_text, flush=True)
    ok = result.status in (luigi.execution_summary.LuigiStatusCode.SUCCESS,
                           luigi.execution_summary.LuigiStatusCode.SUCCESS_WITH_RETRY)
    if not ok:
        print(f"data pipeline FAILED: {result.status.name}", file=sys.stderr, flush=True)
    return ok
