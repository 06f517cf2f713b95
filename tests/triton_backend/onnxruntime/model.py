"""TEST SUPPORT ONLY: a Python-based Triton backend named ``onnxruntime`` that stands in for Triton's C++ one.

The ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel has the python backend only, so a repository whose
``config.pbtxt`` says ``platform: "onnxruntime_onnx"`` parses but has no backend to load it. Triton loads a
"Python-based backend" from ``<backend-directory>/<backend name>/model.py`` through the python backend, so this file,
copied to ``<backend-directory>/onnxruntime/model.py``, lets the repository DefectOps publishes load *unchanged*.

What it does is what the C++ backend does for these models, and no more: it opens
``<model dir>/<version>/<default_model_filename or model.onnx>`` with onnxruntime on the CPU, and in ``execute``
concatenates the requests of one dynamic batch along the batch axis, runs the session once and splits the outputs
back per request. Inputs and outputs are the ones the model config declares. It is never part of a deployment: in
production Triton's own onnxruntime backend serves the same repository (see deploy/helm).

It runs inside the python backend's stub, in the Triton venv (numpy<2: numpy 2 corrupts tensors there).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # provided by the python backend at run time


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        filename = cfg.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("DEFECTOPS_TRITON_ORT_THREADS", "1"))
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in cfg["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in cfg["output"]]
        self.batched = int(cfg.get("max_batch_size", 0)) > 0

    def execute(self, requests: list) -> list:
        try:
            feeds_per_request = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy().astype(dtype, copy=False)
                                  for name, dtype in self.inputs} for r in requests]
        except Exception as e:  # noqa: BLE001 - a malformed request fails alone
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad input: {e}")) for _ in requests]
        if self.batched and len(requests) > 1:
            sizes = [len(f[self.inputs[0][0]]) for f in feeds_per_request]
            feeds = {name: np.concatenate([f[name] for f in feeds_per_request]) for name, _ in self.inputs}
            outs = self.session.run([n for n, _ in self.outputs], feeds)
            bounds = np.cumsum(sizes)[:-1]
            per_request = [list(parts) for parts in zip(*[np.split(o, bounds) for o in outs], strict=True)]
        else:
            per_request = [self.session.run([n for n, _ in self.outputs], f) for f in feeds_per_request]
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(arr, dtype=dtype))
            for (name, dtype), arr in zip(self.outputs, outs_r, strict=True)]) for outs_r in per_request]

    def finalize(self) -> None:
        self.session = None
