"""Settings every stage reads the same way: flags, with MICHI_* environment variables as defaults."""
from __future__ import annotations

import argparse
import os

import torch


def stage_parser(name: str, default_port: int) -> argparse.ArgumentParser:
    env = lambda key, default: os.environ.get(f"MICHI_{key}", default)  # noqa: E731
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
    return p


def load_model(args: argparse.Namespace):
    from ..api import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, device=args.device)


def serve_model_stage(name: str, default_port: int, service: str, add_to_server, make_servicer,
                      extra_args=None) -> None:
    """The whole `main` of a model stage: flags, logs, model, servicer, metrics, serve until SIGTERM.
    `make_servicer(michi, executor, args)`; `extra_args(parser)` adds the stage's own flags."""
    import asyncio

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
        await stage.serve_forever()

    asyncio.run(main())
