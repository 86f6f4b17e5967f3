"""Triton Python-backend model that runs the exported ONNX graph with ONNX Runtime.

Used by ``indexer-serve`` on machines without the Triton container: the same
``model.onnx``, the same batcher and instance settings, served by the Triton
binary bundled in the ``nvidia-pytriton`` wheel (which only carries the Python
backend). Triton checks each request's dtype and shape against the config
before it reaches ``execute``; this model adds the check Triton cannot do
(finite samples) and answers a bad request with an error for that request
alone.

This file is copied into the derived model repository as ``1/model.py`` and
imported by Triton's stub, so it depends only on numpy, onnxruntime and the
backend's own ``triton_python_backend_utils``.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend stub

# Parameter keys written by server/local_repo.py into the derived config.
P_ONNX_PATH = "local.onnx_path"
P_INTRA_OP_THREADS = "local.intra_op_threads"
P_PROVIDER = "local.provider"
P_INT8_METHOD = "local.int8_method"
# INT8 recipes made for another runtime (export/quantize.py: ``simulate_on_cpu``). On CPU
# they run with QDQ fusion off: exact simulated quantisation, the same on every x86 CPU,
# instead of ONNX Runtime's fused u8 x s8 kernels, which saturate for full-range int8
# weights on CPUs without VNNI.
SIMULATE_ON_CPU = ("static_qdq_tensorrt",)


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.window = int(config["input"][0]["dims"][0])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get(P_INTRA_OP_THREADS, "0"))
        options.inter_op_num_threads = 1
        # Spinning threads burn the cores the client decodes audio on, and on shared
        # cores they slow ONNX Runtime itself (measured: 2 spinning threads ~50
        # windows/s, without spinning ~75; benchmarks/results/serving.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
        if params.get(P_PROVIDER) != "cuda" and params.get(P_INT8_METHOD) in SIMULATE_ON_CPU:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        if params.get(P_PROVIDER) == "cuda":
            device_id = int(args.get("model_instance_device_id", "0"))
            providers = [
                ("CUDAExecutionProvider", {"device_id": device_id}),
                "CPUExecutionProvider",
            ]
        path = params[P_ONNX_PATH]
        if not os.path.exists(path):
            raise pb_utils.TritonModelException(f"model file not found: {path}")
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        self.onnx_input = self.session.get_inputs()[0].name

    def execute(self, requests):
        batches, responses, good = [], [None] * len(requests), []
        for i, request in enumerate(requests):
            audio = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            problem = _check(audio, self.window, self.input_name)
            if problem:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(problem)
                )
                continue
            batches.append(audio)
            good.append(i)
        if batches:
            # One session run for every request the batcher merged.
            merged = np.concatenate(batches, axis=0) if len(batches) > 1 else batches[0]
            try:
                out = self.session.run(None, {self.onnx_input: merged})[0]
            except Exception as exc:
                error = pb_utils.TritonError(
                    f"ONNX Runtime failed on a batch of {merged.shape[0]}: {exc}"
                )
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=error)
                return responses
            out = np.ascontiguousarray(out, dtype=np.float32)
            row = 0
            for i, audio in zip(good, batches, strict=True):
                n = audio.shape[0]
                tensor = pb_utils.Tensor(self.output_name, out[row : row + n])
                responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor])
                row += n
        return responses

    def finalize(self):
        self.session = None


def _check(audio, window, name):
    """Why a request's input is unusable, or "" (Triton has checked dtype and dims already)."""
    if audio.ndim != 2 or audio.shape[1] != window:
        return f"{name} must have shape [batch, {window}], got {list(audio.shape)}"
    if audio.dtype.kind == "f" and not np.isfinite(audio).all():
        return f"{name} contains NaN or Inf samples: send finite PCM"
    return ""
