"""Run a step graph on a Triton server through `tritonclient`; the caller keeps the stream state.

    step = TritonStep("triton:8001", "michi_vocoder")
    state = step.init_state()
    (audio,), state = step({"latent": latent[None]}, state)
"""
from __future__ import annotations

import numpy as np

NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_BOOL": np.bool_, "TYPE_INT64": np.int64}
WIRE_TYPES = {"TYPE_FP32": "FP32", "TYPE_FP16": "FP16", "TYPE_BOOL": "BOOL", "TYPE_INT64": "INT64"}


class TritonError(RuntimeError):
    """The Triton server could not be reached or refused a request."""


class TritonStep:
    """One model of the repository. Thread-safe: the gRPC channel is shared, state is the caller's."""

    def __init__(self, url: str, model: str, timeout_s: float = 10.0):
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException

        self._triton, self._error = triton, InferenceServerException
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.client = triton.InferenceServerClient(url)
        try:
            config = self.client.get_model_config(model, as_json=True, client_timeout=timeout_s)["config"]
        except InferenceServerException as e:
            raise TritonError(f"Triton at {url} has no ready model {model!r}: {e.message()}") from e
        inputs, outputs = config["input"], config["output"]
        self.state_in = [t for t in inputs if t["name"].startswith("state_in_")]
        self.data_in = [t for t in inputs if not t["name"].startswith("state_in_")]
        self.data_out = [t["name"] for t in outputs if not t["name"].startswith("state_out_")]
        self.state_out = [f"state_out_{t['name'][len('state_in_'):]}" for t in self.state_in]
        self.dims = {t["name"]: [int(d) for d in t["dims"]] for t in inputs}

    def init_state(self, batch_size: int = 1) -> list[np.ndarray]:
        """A fresh stream: every state tensor zero (a bool tensor False)."""
        return [np.zeros((batch_size, *self.dims[t["name"]]), NUMPY_TYPES[t["data_type"]]) for t in self.state_in]

    def _input(self, spec: dict, value: np.ndarray):
        value = np.ascontiguousarray(value, NUMPY_TYPES[spec["data_type"]])
        expected = self.dims[spec["name"]]
        if list(value.shape[1:]) != expected:
            raise ValueError(f"{self.model}.{spec['name']}: expected [batch, {expected}], got {list(value.shape)}")
        tensor = self._triton.InferInput(spec["name"], list(value.shape), WIRE_TYPES[spec["data_type"]])
        tensor.set_data_from_numpy(value)
        return tensor

    def __call__(self, inputs: dict[str, np.ndarray], state: list[np.ndarray]
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One step: the data outputs (in model order) and the new state."""
        tensors = [self._input(s, inputs[s["name"]]) for s in self.data_in]
        tensors += [self._input(s, v) for s, v in zip(self.state_in, state, strict=True)]
        outputs = [self._triton.InferRequestedOutput(n) for n in self.data_out + self.state_out]
        try:
            result = self.client.infer(self.model, tensors, outputs=outputs, client_timeout=self.timeout_s)
        except self._error as e:
            raise TritonError(f"Triton at {self.url}, model {self.model}: {e.message()}") from e
        return ([result.as_numpy(n) for n in self.data_out], [result.as_numpy(n) for n in self.state_out])

    def close(self) -> None:
        self.client.close()
