"""Where the listen encoder and vocoder steps run: in this process (torch) or on an NVIDIA Triton
server (`tritonclient`, explicit state tensors in and out). Chosen per stage by `--execution`
(MICHI_EXECUTION) and `--triton-url` (MICHI_TRITON_URL). Either way one stream per call, and the
same numbers out: chunked streaming equals whole-input decoding on both.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from ..api import Michi

EXECUTIONS = ("torch", "triton")


def add_execution_args(parser) -> None:
    """The stage flags that choose where the encoder or vocoder steps run."""
    import os

    parser.add_argument("--execution", choices=EXECUTIONS, default=os.environ.get("MICHI_EXECUTION", "torch"),
                        help="torch: in this process; triton: on a Triton server (michi triton export)")
    parser.add_argument("--triton-url", default=os.environ.get("MICHI_TRITON_URL"),
                        help="Triton gRPC address, host:port")


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


class TritonEncoderStream:
    """Buffers audio to whole 80 ms frames and sends one frame per request."""

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
            return torch.zeros(0, cfg.latent_dim), torch.zeros(0, cfg.listen.transformer_dim)
        return (torch.from_numpy(np.stack(latents)).to(self.michi.device),
                torch.from_numpy(np.stack(features)).to(self.michi.device))


class TritonVocoderStream:
    def __init__(self, step):
        self.step = step
        self.state = step.init_state()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        out = []
        for latent in np.asarray(latents, np.float32):
            (audio,), self.state = self.step({"latent": latent[None]}, self.state)
            out.append(audio[0])
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def _triton_step(stage: str, execution: str, triton_url: str | None):
    """The Triton model of `stage`, or None for in-process execution."""
    if execution == "torch":
        return None
    if execution != "triton":
        raise ValueError(f"execution must be one of {EXECUTIONS}, not {execution!r}")
    if not triton_url:
        raise ValueError("execution triton needs a Triton server address (--triton-url or MICHI_TRITON_URL)")
    from .triton.client import TritonStep
    from .triton.export import MODELS

    return TritonStep(triton_url, MODELS[stage])


def encoder_streams(michi: Michi, execution: str = "torch", triton_url: str | None = None
                    ) -> Callable[[], EncoderStream]:
    """A factory of listen encoder streams, one per call."""
    step = _triton_step("listen", execution, triton_url)
    return (lambda: TorchEncoderStream(michi)) if step is None else (lambda: TritonEncoderStream(michi, step))


def vocoder_streams(michi: Michi, execution: str = "torch", triton_url: str | None = None
                    ) -> Callable[[], VocoderStream]:
    """A factory of vocoder streams, one per call."""
    step = _triton_step("vocoder", execution, triton_url)
    return (lambda: TorchVocoderStream(michi)) if step is None else (lambda: TritonVocoderStream(step))
