"""Triton Python-backend model: runs the version directory's model.onnx with ONNX Runtime.

For Triton builds without the ONNX Runtime backend (the one in the nvidia-pytriton wheel ships
only the Python backend). `michi triton export --backend python` copies this file beside each
model.onnx. The requests of one batch (frames of different calls) are concatenated into one run.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("MICHI_TRITON_THREADS", "1"))
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        arrays = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs]
                  for r in requests]
        sizes = [a[0].shape[0] for a in arrays]
        feed = {name: np.concatenate([a[i] for a in arrays]) for i, name in enumerate(self.inputs)}
        results = self.session.run(self.outputs, feed)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + size]))
                       for name, out in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
