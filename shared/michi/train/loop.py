"""The training loop every stage shares: devices, torchrun, resume, loss log, loss curve PNG.

A stage is an object with `modules` (what it trains and saves), `optimizers` and `step(step)`,
which does one optimisation step and returns its losses as floats. `run_stage` drives it until
its step count or time budget is reached, saving `state.pt` (modules, optimizers, step, loss
log) every `save_every` steps, so a killed run resumes where it stopped. Under torchrun each rank
draws its own batches and DDP averages the gradients; rank 0 alone writes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn

STATE_FILE = "state.pt"
LOG_FILE = "losses.jsonl"
PROGRESS_FILE = "progress.json"  # step and wall time of the last save, readable without torch


@dataclass
class StageBudget:
    steps: int
    minutes: float | None = None  # stop early when this much wall time is spent
    log_every: int = 20
    save_every: int = 500
    # Every snapshot_minutes of wall time (and at the end), snapshot(minutes, step) is called:
    # the recipe writes a checkpoint there, for a learning curve.
    snapshot_minutes: float | None = None
    snapshot: Callable[[float, int], None] | None = None


class Stage(Protocol):
    name: str
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    rng: torch.Generator  # draws the batches; saved with the state so a resumed run draws the same
    progress: float  # fraction of the stage done (steps or time budget, the larger), set by the loop

    def step(self, step: int) -> dict[str, float]: ...


# ---- devices and ranks ------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    """One process, or one rank of a torchrun job (WORLD_SIZE set): NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return Dist(rank, world, dev)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Dist(0, 1, torch.device(device))


def wrap(module: nn.Module, d: Dist) -> nn.Module:
    """DDP under torchrun (unused parameters allowed: a text batch leaves the speak head idle)."""
    if d.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ---- the loop ---------------------------------------------------------------------------------
def run_stage(stage: Stage, out_dir: str | Path, budget: StageBudget, d: Dist,
              progress: Callable[[str], None] = print) -> Path:
    """Train `stage` into `out_dir`; resumes from `out_dir/state.pt`. Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step, elapsed = _resume(stage, out, d)
    timed_out = budget.minutes is not None and elapsed >= 60 * budget.minutes
    if step >= budget.steps or timed_out:
        progress(f"[{stage.name}] already finished at step {step} ({out}); skipping")
        return out
    if step:
        progress(f"[{stage.name}] resuming at step {step}")
    start = time.perf_counter() - elapsed
    window: dict[str, list[float]] = {}
    if budget.snapshot_minutes:
        next_snapshot = (elapsed / 60 // budget.snapshot_minutes + 1) * budget.snapshot_minutes
    while step < budget.steps:
        if budget.minutes is not None and time.perf_counter() - start > 60 * budget.minutes:
            progress(f"[{stage.name}] time budget of {budget.minutes} min reached at step {step}")
            break
        wall = time.perf_counter() - start
        stage.progress = max(step / budget.steps, wall / (60 * budget.minutes) if budget.minutes else 0.0)
        losses = stage.step(step)
        step += 1
        for key, value in losses.items():
            window.setdefault(key, []).append(value)
        if step % budget.log_every == 0 or step == budget.steps:
            means = {k: sum(v) / len(v) for k, v in window.items()}
            window.clear()
            wall = time.perf_counter() - start
            if d.main:
                with (out / LOG_FILE).open("a") as f:
                    f.write(json.dumps({"step": step, "wall_s": round(wall, 2), **means}) + "\n")
                rate = step / max(wall, 1e-9)
                eta = (budget.steps - step) / max(rate, 1e-9)
                if budget.minutes is not None:
                    eta = min(eta, max(0.0, 60 * budget.minutes - wall))
                shown = " ".join(f"{k} {v:.4f}" for k, v in means.items())
                progress(f"[{stage.name}] step {step}/{budget.steps} {shown} | {rate:.1f} steps/s, "
                         f"ETA {eta / 60:.1f} min")
        if step % budget.save_every == 0:
            _save(stage, out, step, time.perf_counter() - start, False, d)
        if budget.snapshot and budget.snapshot_minutes:
            wall_min = (time.perf_counter() - start) / 60
            if wall_min >= next_snapshot:
                budget.snapshot(wall_min, step)
                next_snapshot = (wall_min // budget.snapshot_minutes + 1) * budget.snapshot_minutes
    _save(stage, out, step, time.perf_counter() - start, True, d)
    if budget.snapshot:
        budget.snapshot((time.perf_counter() - start) / 60, step)
    if d.main:
        plot_losses(out / LOG_FILE, out / "losses.png", title=f"{stage.name} stage")
    barrier(d)
    return out


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def _save(stage: Stage, out: Path, step: int, elapsed: float, done: bool, d: Dist) -> None:
    if not d.main:
        return
    state = {
        "step": step, "elapsed_s": elapsed, "done": done,
        "modules": {k: _unwrap(m).state_dict() for k, m in stage.modules.items()},
        "optimizers": {k: o.state_dict() for k, o in stage.optimizers.items()},
        "rng": {"batches": stage.rng.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)
    (out / PROGRESS_FILE).write_text(json.dumps({"step": step, "wall_s": round(elapsed, 1), "done": done}))


def _resume(stage: Stage, out: Path, d: Dist) -> tuple[int, float]:
    path = out / STATE_FILE
    if not path.is_file():
        return 0, 0.0
    state = torch.load(path, map_location=d.device, weights_only=True)
    for key, module in stage.modules.items():
        _unwrap(module).load_state_dict(state["modules"][key])
    for key, optimizer in stage.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][key])
    rng = state.get("rng", {})
    if "batches" in rng:  # noise draws (flow, latents) and batch draws continue where they were
        stage.rng.set_state(rng["batches"].cpu())
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    return int(state["step"]), float(state["elapsed_s"])


def stage_info(out_dir: str | Path) -> dict[str, Any]:
    """Steps, wall time and last logged losses of a stage, for model cards."""
    out = Path(out_dir)
    saved = json.loads((out / PROGRESS_FILE).read_text()) if (out / PROGRESS_FILE).is_file() else {}
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()] if (out / LOG_FILE).is_file() else []
    last = rows[-1] if rows else {}
    return {"steps": saved.get("step", 0), "wall_s": saved.get("wall_s", 0.0),
            "final_losses": {k: round(v, 4) for k, v in last.items() if k not in {"step", "wall_s"}}}


def _rows(log_file: Path) -> tuple[list[dict], list[str]]:
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    return rows, list(dict.fromkeys(k for r in rows for k in r if k not in {"step", "wall_s"}))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(log_files: dict[str, Path] | str | Path, png: str | Path, title: str = "") -> Path | None:
    """Loss curves against steps, one row per stage (a dict of stage -> losses.jsonl) and one
    panel per loss term; None (and a note) where matplotlib or the logs are missing."""
    if not isinstance(log_files, dict):
        log_files = {"": Path(log_files)}
    stages = {name: _rows(Path(f)) for name, f in log_files.items() if Path(f).is_file()}
    stages = {name: (rows, keys) for name, (rows, keys) in stages.items() if keys}
    if not stages:
        return None
    plt = _pyplot()
    if plt is None:
        print(f"(matplotlib is not installed: no {Path(png).name}; `michi train plot RUN` later)")
        return None
    cols = max(len(keys) for _, keys in stages.values())
    fig, axes = plt.subplots(len(stages), cols, figsize=(3.2 * cols, 2.6 * len(stages)), squeeze=False)
    for row, (name, (rows, keys)) in enumerate(stages.items()):
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(keys):
                ax.axis("off")
                continue
            points = [(r["step"], r[keys[col]]) for r in rows if keys[col] in r]
            ax.plot([s for s, _ in points], [v for _, v in points], lw=1,
                    marker="." if len(points) < 30 else None)
            ax.set_title(f"{name} {keys[col]}".strip(), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
