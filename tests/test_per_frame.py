"""export/per_frame.py: feature-extractor convs as per-frame dynamic INT8, on real ONNX Runtime.

A small front end of the exported shape (conv0 -> GELU -> conv1 (k3 s2) ->
GELU -> conv2 (k2 s2) -> GELU -> Transpose), once with frame lengths that need
padding and trimming. The point of per-frame scales: a frame 60 dB below its
neighbours keeps its own precision, where one scale per tensor flattens it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.per_frame import per_frame_convs  # noqa: E402
from export.quantize import feature_extractor_convs  # noqa: E402
from mert_indexer.errors import ExportError  # noqa: E402

CHANNELS = 32
CONVS = ((5, 2), (3, 2), (2, 2))  # (kernel, stride) of conv0, conv1, conv2


def front_end(samples: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Unsqueeze", ["x", "axis1"], ["x3"], name="unsqueeze")]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    previous, c_in = "x3", 1
    for index, (kernel, stride) in enumerate(CONVS):
        weight = rng.standard_normal((CHANNELS, c_in, kernel)) / np.sqrt(c_in * kernel)
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"w{index}"))
        nodes += [
            helper.make_node(
                "Conv",
                [previous, f"w{index}"],
                [f"conv{index}"],
                strides=[stride],
                kernel_shape=[kernel],
                name=f"conv{index}",
            ),
            helper.make_node("Gelu", [f"conv{index}"], [f"gelu{index}"], name=f"gelu{index}"),
        ]
        previous, c_in = f"gelu{index}", CHANNELS
    nodes.append(helper.make_node("Transpose", [previous], ["y"], perm=[0, 2, 1], name="to_btc"))
    graph = helper.make_graph(
        nodes,
        "front_end",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", samples])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def per_frame(model: onnx.ModelProto, layers=(1, 2)) -> onnx.ModelProto:
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    return per_frame_convs(rewritten, layers, feature_extractor_convs(rewritten))


def loud_and_quiet(samples: int, batch: int = 3) -> np.ndarray:
    """Noise whose second half is 60 dB quieter: a transient window's extremes."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, samples)).astype(np.float32)
    x[:, samples // 2 :] *= 1e-3
    return x


def frame_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Relative L2 error of every output frame ([batch, time, channels])."""
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


@pytest.mark.parametrize("samples", [401, 406])  # conv1 needs a padded frame / conv2 a trim
def test_every_frame_keeps_its_own_precision(samples: int) -> None:
    model = front_end(samples)
    x = loud_and_quiet(samples)
    want = run(model, x)
    rewritten = per_frame(model)
    got = run(rewritten, x)
    assert got.shape == want.shape
    errors = frame_errors(got, want)
    quiet = errors[:, want.shape[1] // 2 + 2 :]
    assert errors.max() < 0.05, errors.max()
    assert quiet.max() < 0.05, quiet.max()  # 60 dB down, still ~8-bit relative to itself
    ops = [node.op_type for node in rewritten.graph.node]
    assert ops.count("Conv") == 1  # conv0 stays fp32
    assert ops.count("MatMulInteger") == 3 + 2  # one GEMM per tap
    assert ops.count("Transpose") == 1  # the layout changes once, before conv1


def test_one_scale_per_tensor_would_flatten_the_quiet_frames() -> None:
    """The same integers with the scale of the whole tensor: the quiet half is lost."""
    samples = 401
    model = front_end(samples)
    x = loud_and_quiet(samples)
    cut = helper.make_model(
        helper.make_graph(
            list(model.graph.node)[:3],
            "conv0",
            list(model.graph.input),
            [helper.make_tensor_value_info("gelu0", TensorProto.FLOAT, None)],
            list(model.graph.initializer),
        ),
        opset_imports=[helper.make_opsetid("", 20)],
    )
    activations = run(cut, x)  # [batch, channels, time] into conv1
    scale = np.abs(activations).max() / 127.0
    flattened = np.round(activations / scale) * scale
    frames = activations.shape[-1]
    quiet = slice(frames // 2 + 2, frames)
    error = np.linalg.norm(flattened[..., quiet] - activations[..., quiet]) / np.linalg.norm(
        activations[..., quiet]
    )
    assert error > 0.5  # per tensor, the quiet frames round to (nearly) nothing


def test_weights_are_7_bit_and_the_result_does_not_depend_on_the_batch() -> None:
    samples = 401
    rewritten = per_frame(front_end(samples))
    for init in rewritten.graph.initializer:
        if init.data_type == TensorProto.INT8 and init.dims:
            values = numpy_helper.to_array(init)
            assert values.min() >= -64 and values.max() <= 64, init.name
    x = loud_and_quiet(samples, batch=4)
    together = run(rewritten, x)
    alone = np.concatenate([run(rewritten, x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_array_equal(together, alone)  # scales are per frame, not per batch


@pytest.mark.parametrize("layers", [(1,), (0, 1, 2), (2, 1, 3)])
def test_a_run_that_does_not_end_at_the_last_conv_is_refused(layers) -> None:
    with pytest.raises(ExportError, match="run ending at conv2"):
        per_frame(front_end(401), layers)


def test_a_front_end_without_the_transpose_to_frames_is_refused() -> None:
    model = front_end(401)
    transpose = model.graph.node[-1]
    transpose.op_type, transpose.attribute[0].ints[:] = "Transpose", [0, 1, 2]
    with pytest.raises(ExportError, match="not followed by the Transpose"):
        per_frame(model)
