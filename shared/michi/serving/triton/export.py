"""The listen encoder and vocoder steps as stateless ONNX graphs, and a Triton model repository.

Each graph takes one 80 ms frame plus the stream's state tensors and returns the frame's outputs
plus the new state (`state_in_<i>` -> `state_out_<i>`). The server keeps nothing between requests:
the stage that owns the call holds the state, so any Triton replica can serve any frame, and
Triton's dynamic batcher can batch frames of different calls into one run.
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from ...api import Michi
from ...model.conv import StreamingConv1d
from ...model.state import load_state_tensors, state_tensors

MODELS = {"listen": "michi_listen", "vocoder": "michi_vocoder"}
PYTHON_MODEL = Path(__file__).with_name("python_model.py")
ONNX_FILE = "model.onnx"
TRITON_TYPES = {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16", torch.bool: "TYPE_BOOL", torch.int64: "TYPE_INT64"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # per item, without the batch dimension
    dtype: torch.dtype


@dataclass(frozen=True)
class StepSpec:
    """The I/O of one step graph; states pair up as state_in_<i> -> state_out_<i>."""

    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _carried(t: Tensor) -> bool:
    """A state tensor the graph passes in and out; empty ones (a 1x1 conv's buffer) stay inside."""
    return t.shape[1:].numel() > 0


class _Step(nn.Module):
    """One streaming step of `module` with its state as flat tensors."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def _state(self, x: Tensor, carried: tuple[Tensor, ...]):
        template = self.module.init_state(x.shape[0], x.device)
        it = iter(carried)
        return load_state_tensors(template, [next(it) if _carried(t) else t for t in state_tensors(template)])

    @staticmethod
    def _carry(state) -> list[Tensor]:
        return [t for t in state_tensors(state) if _carried(t)]


class VocoderStep(_Step):
    """latent [B, latent_dim] + state -> audio [B, frame_samples] + state."""

    def forward(self, latent: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        audio, s = self.module.step(latent[:, None], self._state(latent, state))
        return (audio, *self._carry(s))


class ListenStep(_Step):
    """audio [B, frame_samples] (24 kHz) + state -> latent [B, latent_dim], features [B, F] + state."""

    def forward(self, audio: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        (latents, features), s = self.module.step(audio, self._state(audio, state))
        return (latents[:, 0], features[:, 0], *self._carry(s))


def _module(michi: Michi, stage: str) -> nn.Module:
    return michi.model.listen if stage == "listen" else michi.model.vocoder


def step_module(michi: Michi, stage: str) -> nn.Module:
    return {"listen": ListenStep, "vocoder": VocoderStep}[stage](_module(michi, stage)).eval()


def initial_state(michi: Michi, stage: str, batch_size: int = 1) -> list[Tensor]:
    """The state tensors a fresh stream passes in (zeros)."""
    state = _module(michi, stage).init_state(batch_size, device=michi.device)
    return [t for t in state_tensors(state) if _carried(t)]


def example_inputs(michi: Michi, stage: str, batch_size: int = 2) -> tuple[Tensor, ...]:
    cfg = michi.cfg
    first = torch.zeros(batch_size, cfg.frame_samples if stage == "listen" else cfg.latent_dim,
                        device=michi.device)
    return (first, *initial_state(michi, stage, batch_size))


def step_spec(michi: Michi, stage: str) -> StepSpec:
    """Names, per-item dims and dtypes of a step graph's inputs and outputs."""
    cfg = michi.cfg
    state = initial_state(michi, stage)
    if stage == "listen":
        first_in = (TensorSpec("audio", (cfg.frame_samples,), torch.float32),)
        first_out = (TensorSpec("latent", (cfg.latent_dim,), torch.float32),
                     TensorSpec("features", (cfg.listen_feature_dim,), torch.float32))
    else:
        first_in = (TensorSpec("latent", (cfg.latent_dim,), torch.float32),)
        first_out = (TensorSpec("audio", (cfg.frame_samples,), torch.float32),)
    states = [(tuple(t.shape[1:]), t.dtype) for t in state]
    return StepSpec(MODELS[stage],
                    first_in + tuple(TensorSpec(f"state_in_{i}", d, t) for i, (d, t) in enumerate(states)),
                    first_out + tuple(TensorSpec(f"state_out_{i}", d, t) for i, (d, t) in enumerate(states)))


@contextlib.contextmanager
def _plain_convs(module: nn.Module) -> Iterator[None]:
    """Trace every conv as one conv op (the CPU im2col fast path uses as_strided)."""
    convs = [m for m in module.modules() if isinstance(m, StreamingConv1d)]
    saved = [m._im2col for m in convs]
    for m in convs:
        m._im2col = False
    try:
        yield
    finally:
        for m, s in zip(convs, saved):
            m._im2col = s


def export_onnx(michi: Michi, stage: str, path: str | Path, max_batch_size: int = 256) -> StepSpec:
    """Write the step graph of `stage` (listen or vocoder) to `path`, batch dimension dynamic."""
    spec = step_spec(michi, stage)
    module = step_module(michi, stage)
    args = example_inputs(michi, stage)
    batch = torch.export.Dim("batch", min=1, max=max_batch_size)
    with _plain_convs(module), torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs],
                          dynamic_shapes=({0: batch}, tuple({0: batch} for _ in args[1:])),
                          dynamo=True, external_data=False, optimize=True, verbose=False)
    return spec


def config_pbtxt(spec: StepSpec, backend: str, max_batch_size: int, queue_delay_us: int) -> str:
    """Triton model configuration. No instance_group: Triton puts one instance on each GPU, or on
    the CPU where there is none."""
    def tensors(specs: tuple[TensorSpec, ...]) -> str:
        return ",\n".join(f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} '
                          f'dims: [ {", ".join(map(str, t.dims))} ] }}' for t in specs)

    return (f'# Generated by `michi triton export`: one 80 ms frame per request, the stream state\n'
            f'# passed in and out explicitly (state_in_<i> -> state_out_<i>), so the server is stateless.\n'
            f'name: "{spec.model}"\nbackend: "{backend}"\nmax_batch_size: {max_batch_size}\n'
            f'input [\n{tensors(spec.inputs)}\n]\noutput [\n{tensors(spec.outputs)}\n]\n'
            f'dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n')


def write_repository(michi: Michi, out: str | Path, backend: str = "onnxruntime", max_batch_size: int = 64,
                     queue_delay_us: int = 500, with_models: bool = True) -> dict[str, StepSpec]:
    """A Triton model repository: <model>/config.pbtxt and <model>/1/model.onnx per stage.

    backend "onnxruntime" is Triton's own ONNX Runtime backend (the NGC images have it); "python"
    runs the same model.onnx through ONNX Runtime inside Triton's Python backend, for Triton
    builds that ship only that one (such as the one in the nvidia-pytriton wheel).
    """
    if backend not in ("onnxruntime", "python"):
        raise ValueError(f"backend must be onnxruntime or python, not {backend!r}")
    specs = {}
    for stage, model in MODELS.items():
        version = Path(out) / model / "1"
        version.mkdir(parents=True, exist_ok=True)
        if with_models:
            specs[stage] = export_onnx(michi, stage, version / ONNX_FILE, max_batch_size)
        else:
            specs[stage] = step_spec(michi, stage)
        if backend == "python":
            shutil.copyfile(PYTHON_MODEL, version / "model.py")
        (version.parent / "config.pbtxt").write_text(
            config_pbtxt(specs[stage], backend, max_batch_size, queue_delay_us))
    return specs
