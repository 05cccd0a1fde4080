"""Settings every stage reads the same way: flags, with MICHI_* environment variables as defaults."""
from __future__ import annotations

import argparse
import os

import torch

from .liveness import DEFAULT_STALL_S

DEFAULT_MAX_CALLS = 64  # a model stage's capacity when --max-calls / MICHI_MAX_CALLS is 0


def env(key: str, default: str) -> str:
    """A setting's default: the MICHI_<key> environment variable, else `default`."""
    return os.environ.get(f"MICHI_{key}", default)


def stage_parser(name: str, default_port: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"michi-{name}", description=f"Michi {name} stage (gRPC)")
    p.add_argument("--host", default=env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env(f"{name.upper()}_PORT", default_port)))
    p.add_argument("--model", default=env("MODEL", "default"), help="default (the shipped model), a preset or "
                   "a checkpoint directory")
    p.add_argument("--device", default=env("DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
    p.add_argument("--threads", type=int, default=int(env("THREADS", "0")), help="torch threads (0: all cores)")
    p.add_argument("--metrics-port", type=int, default=int(env(f"{name.upper()}_METRICS_PORT", "0")))
    p.add_argument("--drain-s", type=float, default=float(env("DRAIN_S", "5")))
    p.add_argument("--max-calls", type=int, default=int(env("MAX_CALLS", "0")),
                   help="admission control: calls taken at once, beyond: RESOURCE_EXHAUSTED (0: the stage's default)")
    p.add_argument("--stall-s", type=float, default=float(env("STALL_S", DEFAULT_STALL_S)),
                   help="watchdog: a model call running (or waiting) longer than this makes the stage's "
                        "health NOT_SERVING until it moves again")
    return p


def load_model(args: argparse.Namespace):
    from ..api import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, device=args.device)


def serve_model_stage(name: str, default_port: int, service: str, add_to_server, make_servicer,
                      extra_args=None, default_max_calls: int = DEFAULT_MAX_CALLS) -> None:
    """The whole `main` of a model stage: flags, logs, model, servicer, metrics, serve until SIGTERM.
    `make_servicer(michi, executor, args)`; `extra_args(parser)` adds the stage's own flags.

    The servicer takes part in two stage-wide mechanisms: its `admission` attribute is replaced by
    an `Admission` of `--max-calls` calls (default `default_max_calls`) whose fullness drives the
    `michi.capacity` health service, and its `liveness(stall_s)` (None, or why its work loop is
    stuck) is the stage's watchdog probe."""
    import asyncio

    from .admission import Admission
    from .server import Stage, configure_logging, model_executor, start_metrics

    parser = stage_parser(name, default_port)
    if extra_args:
        extra_args(parser)
    args = parser.parse_args()
    configure_logging(name)
    servicer = make_servicer(load_model(args), model_executor(), args)
    start_metrics(args.metrics_port)

    async def main() -> None:  # the grpc.aio server must be made inside the running loop
        stage = Stage(name, [service], lambda server: add_to_server(servicer, server), args.port, args.host,
                      drain_s=args.drain_s)
        servicer.admission = Admission(name, args.max_calls or default_max_calls, stage.set_full)
        stage.add_liveness_probe(lambda: servicer.liveness(args.stall_s))
        await stage.serve_forever()

    asyncio.run(main())
