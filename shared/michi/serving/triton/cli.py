"""`michi triton export` (a model repository) and `michi triton serve` (a local Triton server)."""
from __future__ import annotations

import argparse

DEFAULT_REPOSITORY = "deploy/triton-models"


def cmd_export(args: argparse.Namespace) -> int:
    from ...api import load
    from .export import write_repository

    michi = load(args.model, device="cpu")
    specs = write_repository(michi, args.out, backend=args.backend, max_batch_size=args.max_batch_size,
                             queue_delay_us=args.queue_delay_us, with_models=not args.config_only)
    for spec in specs.values():
        states = [t for t in spec.inputs if t.name.startswith("state_in_")]
        state_bytes = sum(t.dtype.itemsize * _numel(t.dims) for t in states)
        print(f"{spec.model}: {len(states)} state tensors, {state_bytes / 1024:.1f} KiB of state per call and frame")
    print(f"wrote the Triton model repository {args.out} (backend {args.backend})")
    return 0


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(args.repository, args.port, args.env)


def add_triton_commands(sub) -> None:
    p = sub.add_parser("triton", help="NVIDIA Triton: export the model repository, serve it locally")
    tsub = p.add_subparsers(dest="triton_command", required=True)

    sp = tsub.add_parser("export", help="listen encoder and vocoder steps as ONNX + config.pbtxt")
    sp.add_argument("--model", default="default", help="default (the shipped model), a preset or a checkpoint directory")
    sp.add_argument("--out", default=DEFAULT_REPOSITORY)
    sp.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "python"],
                    help="onnxruntime: Triton's ONNX Runtime backend (NGC images); python: ONNX Runtime inside "
                         "the Python backend (the nvidia-pytriton server)")
    sp.add_argument("--max-batch-size", type=int, default=64, help="frames of different calls in one run")
    sp.add_argument("--queue-delay-us", type=int, default=500, help="dynamic batcher's wait for more frames")
    sp.add_argument("--config-only", action="store_true", help="write config.pbtxt files only, no ONNX")
    sp.set_defaults(func=cmd_export)

    sp = tsub.add_parser("serve", help="run the nvidia-pytriton Triton server on a repository (python backend)")
    sp.add_argument("--repository", required=True)
    sp.add_argument("--port", type=int, default=8001, help="gRPC port")
    sp.add_argument("--env", default=".venv-triton", help="the Python environment with nvidia-pytriton and onnxruntime")
    sp.set_defaults(func=cmd_serve)
