"""Where the listen encoder and vocoder steps run, chosen per stage by `--execution`
(MICHI_EXECUTION):
- torch: the PyTorch modules in this process;
- onnxruntime: the exported step graphs (`michi triton export`) through ONNX Runtime in this
  process; on CPU 2-3x faster per frame than torch (loadtest/results/triton-bench-cpu.json);
  `--onnx-dir` (MICHI_ONNX_DIR) names an exported repository, else the stage exports at start;
- triton: the same graphs on an NVIDIA Triton server (`--triton-url`, MICHI_TRITON_URL).
The graph executions pass the stream state in and out explicitly. Every execution keeps one
stream per call and gives the same numbers up to float rounding: chunked streaming equals
whole-input decoding on each.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..api import Michi

EXECUTIONS = ("torch", "onnxruntime", "triton")


def add_execution_args(parser) -> None:
    """The stage flags that choose where the encoder or vocoder steps run."""
    import os

    parser.add_argument("--execution", choices=EXECUTIONS, default=os.environ.get("MICHI_EXECUTION", "torch"),
                        help="torch or onnxruntime: in this process; triton: on a Triton server")
    parser.add_argument("--triton-url", default=os.environ.get("MICHI_TRITON_URL"),
                        help="Triton gRPC address, host:port")
    parser.add_argument("--onnx-dir", default=os.environ.get("MICHI_ONNX_DIR"),
                        help="onnxruntime: a `michi triton export` repository (default: export at start)")


class EncoderStream(Protocol):
    def encode(self, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """24 kHz audio, any length -> the frames it completed: latents [n, D], features [n, F]."""


class VocoderStream(Protocol):
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [m, D] -> their audio [m * frame_samples], float32."""


class TorchEncoderStream:
    def __init__(self, michi: Michi):
        self.michi = michi
        self.state = michi.model.listen.init_state(1, device=michi.device)

    @torch.inference_mode()
    def encode(self, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(audio, np.float32)).to(self.michi.device)[None]
        (latents, features), self.state = self.michi.model.listen.step(x, self.state)
        return latents[0], features[0]


class TorchVocoderStream:
    def __init__(self, michi: Michi):
        self.michi = michi
        self.state = michi.model.vocoder.init_state(1, device=michi.device)

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(latents, np.float32), device=self.michi.device)[None]
        audio, self.state = self.michi.model.vocoder.step(x, self.state)
        return audio[0].float().cpu().numpy()


class GraphEncoderStream:
    """Runs a listen step graph (ONNX Runtime or Triton): buffers audio to whole 80 ms frames, one
    frame per step, the state carried from step to step."""

    def __init__(self, michi: Michi, step):
        self.michi, self.step = michi, step
        self.state = step.init_state()
        self.pending = np.zeros(0, np.float32)

    def encode(self, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        frame = self.michi.cfg.frame_samples
        self.pending = np.concatenate([self.pending, np.asarray(audio, np.float32)])
        latents, features = [], []
        while len(self.pending) >= frame:
            (latent, feature), self.state = self.step({"audio": self.pending[None, :frame]}, self.state)
            self.pending = self.pending[frame:]
            latents.append(latent[0])
            features.append(feature[0])
        cfg = self.michi.cfg
        if not latents:
            return torch.zeros(0, cfg.latent_dim), torch.zeros(0, cfg.listen_feature_dim)
        return (torch.from_numpy(np.stack(latents)).to(self.michi.device),
                torch.from_numpy(np.stack(features)).to(self.michi.device))


class GraphVocoderStream:
    """Runs a vocoder step graph (ONNX Runtime or Triton), one latent per step."""

    def __init__(self, step):
        self.step = step
        self.state = step.init_state()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        out = []
        for latent in np.asarray(latents, np.float32):
            (audio,), self.state = self.step({"latent": latent[None]}, self.state)
            out.append(audio[0])
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class OnnxStep:
    """A step graph in this process through ONNX Runtime; called like `TritonStep`."""

    def __init__(self, path: str | Path, spec, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.first = spec.inputs[0].name
        self.state_specs = [t for t in spec.inputs if t.name.startswith("state_in_")]
        self.n_data = len(spec.outputs) - len(self.state_specs)

    def init_state(self, batch_size: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch_size, *t.dims), torch.empty(0, dtype=t.dtype).numpy().dtype) for t in self.state_specs]

    def __call__(self, inputs: dict[str, np.ndarray], state: list[np.ndarray]
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        feed = {self.first: np.ascontiguousarray(inputs[self.first], np.float32)}
        feed.update((t.name, s) for t, s in zip(self.state_specs, state, strict=True))
        out = self.session.run(None, feed)
        return out[:self.n_data], out[self.n_data:]


def _graph_step(stage: str, michi: Michi, execution: str, triton_url: str | None, onnx_dir: str | None,
                threads: int):
    """The step graph of `stage` for a graph execution, or None for torch."""
    if execution == "torch":
        return None
    if execution == "onnxruntime":
        from .triton.export import MODELS, ONNX_FILE, export_onnx, step_spec

        if onnx_dir:
            path = Path(onnx_dir) / MODELS[stage] / "1" / ONNX_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} missing: write it with `michi triton export --out {onnx_dir}`")
        else:  # export this model's graph now, into a folder removed at exit
            folder = tempfile.mkdtemp(prefix="michi-onnx-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            path = Path(folder) / ONNX_FILE
            export_onnx(michi, stage, path)
        return OnnxStep(path, step_spec(michi, stage), threads)
    if execution != "triton":
        raise ValueError(f"execution must be one of {EXECUTIONS}, not {execution!r}")
    if not triton_url:
        raise ValueError("execution triton needs a Triton server address (--triton-url or MICHI_TRITON_URL)")
    from .triton.client import TritonStep
    from .triton.export import MODELS

    return TritonStep(triton_url, MODELS[stage])


def encoder_streams(michi: Michi, execution: str = "torch", triton_url: str | None = None,
                    onnx_dir: str | None = None, threads: int = 1) -> Callable[[], EncoderStream]:
    """A factory of listen encoder streams, one per call."""
    step = _graph_step("listen", michi, execution, triton_url, onnx_dir, threads)
    return (lambda: TorchEncoderStream(michi)) if step is None else (lambda: GraphEncoderStream(michi, step))


def vocoder_streams(michi: Michi, execution: str = "torch", triton_url: str | None = None,
                    onnx_dir: str | None = None, threads: int = 1) -> Callable[[], VocoderStream]:
    """A factory of vocoder streams, one per call."""
    step = _graph_step("vocoder", michi, execution, triton_url, onnx_dir, threads)
    return (lambda: TorchVocoderStream(michi)) if step is None else (lambda: GraphVocoderStream(step))
