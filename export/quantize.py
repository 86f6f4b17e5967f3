"""Lower-precision variants of the fp32 ONNX graph.

Three of them: fp16, INT8 static QDQ, INT8 dynamic (MatMul only).

- fp16 is for GPUs. The per-window normalisation, the feature extractor's
  GroupNorm, every LayerNorm and every mean stay fp32: they reduce over
  thousands of values or divide by small variances, where fp16 loses the
  answer. Input and output keep their types (int16/float32 in, float32 out).
- INT8 static QDQ is calibrated on audio windows (MinMax), in one of two
  flavours, because the fast CPU form and the TensorRT form differ:
  * ``cpu``: uint8 asymmetric activations, per-tensor int8 weights. ONNX
    Runtime fuses these into QLinearMatMul (profiled, MERT-95M: 2.3x less
    kernel time than fp32); with per-channel weights or symmetric int8
    activations many MatMuls stay dequantised to fp32 (1.1-1.35x).
  * ``gpu``: symmetric int8 activations and per-channel int8 weights, what
    TensorRT's explicit quantisation reads (zero points must be 0); the
    config then selects the TensorRT INT8 accelerator. ONNX Runtime CPU runs
    it too (for validation), just not fast.
  The CPU recipe's weights are 7-bit (``reduce_range``): see "Every x86 CPU"
  below. TensorRT computes int8 x int8 with int32 accumulation, so the GPU
  recipe keeps full 8-bit weights, and the export validates it with ONNX
  Runtime's QDQ fusion disabled (exact simulated quantisation in fp32, the
  same answer on every CPU), as the embedded server serves it on CPU.
  Either way the convolutional feature extractor stays fp32: its activations
  span the whole dynamic range of the audio, and one scale per tensor
  flattens the quiet parts of transient music (drums, gated noise) to a
  constant that the LayerNorms then amplify (measured, MERT-95M random init:
  cosine down to 0.57 and 74% neighbour agreement with it quantised; 0.996
  and 98% without; conv1..conv6 only, per tensor or per channel:
  cosine ~0.65, 34-44% agreement on real music, at 2.1-2.4x fp32 speed).
  ``feature_convs`` exists to measure that, layer by layer, not to ship it
  (``benchmarks/int8_layers.py``); so does ``per_frame_convs``, one scale per
  frame (``per_frame.py``), which keeps the quiet frames and still loses
  real-music neighbour agreement.
- INT8 dynamic quantises the MatMul weights only: ONNX Runtime's dynamic
  kernels exist on CPU only, and dynamic Conv is slower than fp32 there
  (measured), so convolutions stay fp32. It needs no calibration and is the
  fallback when the static model fails validation. Its activation scales are
  computed per call over the whole batch, so a window's embedding depends
  slightly on the windows batched with it (measured 6e-4 relative; static
  QDQ and fp32: 2e-7): another reason static is tried first. Its weights
  are 7-bit too.

Every x86 CPU: a model file is made on one machine and served on others.
ONNX Runtime's u8 x s8 kernels on AVX2 and on AVX-512 without VNNI multiply
with ``vpmaddubsw``, which adds two u8 x s8 products into a saturating int16:
255 x 127 x 2 = 64,770 overflows 32,767, and the result depends on the CPU
(seen: the TensorRT-recipe test at 97.3% neighbour agreement on a VNNI
machine got 91.8% on an AVX2 one, reproduced under ``qemu-x86_64 -cpu
Haswell``). With weights in [-64, 64] the pair sum is at most 255 x 64 x 2 =
32,640: no saturation anywhere, and VNNI (``vpdpbusd``, int32 accumulation)
gives the identical integers (measured: bitwise-identical embeddings). ONNX
Runtime's quantisation docs name this remedy (``reduce_range``) and U8U8;
see docs/export.md for the measurements.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.contract import INPUT_NAME
from mert_indexer.errors import ExportError

log = logging.getLogger(__name__)

FP16_KEEP_FP32_OPS = (
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "ReduceMean",
    "Sqrt",
    "Div",
)
STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class Int8Recipe:
    """How an INT8 model is made; recorded in the config and the metadata."""

    method: str
    description: str
    gpu_tensorrt: bool  # a Q/DQ model TensorRT can run in INT8
    activations_signed: bool = True
    per_channel: bool = False
    # 7-bit weights: no int16 saturation in ONNX Runtime's u8 x s8 kernels on CPUs without VNNI.
    reduce_range: bool = False
    # Validate (and serve on CPU) with QDQ fusion disabled: the model is meant for another
    # runtime (TensorRT), whose arithmetic is exact int8 x int8 -> int32.
    simulate_on_cpu: bool = False
    # Which of the waveform feature extractor's convs are quantised too (1..6; conv0, which
    # feeds the GroupNorm over the whole window, always stays fp32).
    feature_convs: tuple[int, ...] = ()
    # Activation ranges: None = MinMax; else the central ``percentile`` % of each histogram.
    percentile: float | None = None
    # Feature-extractor convs (a run ending at conv6) as per-frame dynamic INT8
    # (``per_frame.py``): one scale per frame, computed per call, instead of static QDQ.
    per_frame_convs: tuple[int, ...] = ()


STATIC_CPU = Int8Recipe(
    "static_qdq_cpu",
    "static QDQ for ONNX Runtime CPU: uint8 activations, per-tensor 7-bit int8 weights "
    "(reduce_range: the same integers on CPUs with and without VNNI), MinMax calibration; "
    "feature extractor fp32",
    gpu_tensorrt=False,
    activations_signed=False,
    per_channel=False,
    reduce_range=True,
)
STATIC_GPU = Int8Recipe(
    "static_qdq_tensorrt",
    "static QDQ for TensorRT: symmetric int8 activations, per-channel int8 weights, "
    "MinMax calibration; feature extractor fp32",
    gpu_tensorrt=True,
    activations_signed=True,
    per_channel=True,
    simulate_on_cpu=True,
)
DYNAMIC = Int8Recipe(
    "dynamic_matmul",
    "dynamic int8, MatMul weights only, 7-bit weights (ONNX Runtime CPU only)",
    False,
    reduce_range=True,
)
RECIPES = {recipe.method: recipe for recipe in (STATIC_CPU, STATIC_GPU, DYNAMIC)}


def to_fp16(model: Any) -> Any:
    """fp16 weights and compute, normalisations and reductions kept fp32, I/O types unchanged."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep_nodes = nodes_before_first_conv(model)
    try:
        return convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32_OPS),
            node_block_list=keep_nodes,
        )
    except Exception as exc:
        raise ExportError(f"fp16 conversion failed: {type(exc).__name__}: {exc}") from exc


def nodes_before_first_conv(model: Any) -> list[str]:
    """Names of the nodes between the input and the first Conv: the per-window normalisation."""
    names = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            break
        names.append(node.name)
    return names


def feature_extractor_convs(model: Any) -> list[str]:
    """The Conv nodes that run before the first MatMul: the waveform feature extractor."""
    names = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            break
        if node.op_type == "Conv":
            names.append(node.name)
    return names


# Windows per calibration run. MinMax ranges do not depend on the batching (the same scales
# and zero points, bit for bit), but ONNX Runtime's calibrator runs its session with graph
# optimisations off, where a batch of 4 windows held more than twice the memory of one and
# ran slower: the static build of MERT-330M peaked at 14.7 GB with 4 and 6.7 GB with 1 (169 s
# and 154 s; 95M: 6.4 and 2.8 GB, 60 s and 56 s; benchmarks/results/export_times.md).
CALIBRATION_BATCH = 1


class _WindowReader:
    """Feeds calibration windows to ONNX Runtime's calibrator, ``batch_size`` at a time."""

    def __init__(self, audio: np.ndarray, batch_size: int) -> None:
        self._batches = [audio[i : i + batch_size] for i in range(0, len(audio), batch_size)]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        batch = self._batches[self._next]
        self._next += 1
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._next = 0


def to_int8_static(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    recipe: Int8Recipe,
    *,
    calibration_cache: Path | None = None,
    batch_size: int = CALIBRATION_BATCH,
) -> Path:
    """Calibrated QDQ model at ``out_path``.

    ``calibration`` is already in the model's input dtype. ``calibration_cache``
    (a JSON file, written on first use) lets several recipes share one
    calibration pass over the same fp32 model and windows. ``batch_size``:
    windows per calibration run (the ranges do not depend on it; the memory does).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if set(recipe.feature_convs) & set(recipe.per_frame_convs):
        raise ExportError("a conv is either static or per-frame INT8, not both")

    class Reader(_WindowReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="mert-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            # Shape inference + graph cleanup so every MatMul/Conv is seen with its shapes.
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:
            log.warning("quantisation pre-processing failed (%s); quantising the raw graph", exc)
            prepared = fp32_path
        import onnx

        feature_convs = feature_extractor_convs(onnx.load(str(prepared), load_external_data=False))
        keep_fp32 = [
            name
            for index, name in enumerate(feature_convs)
            if index == 0 or index not in recipe.feature_convs
        ]
        extra: dict[str, Any] = {
            "ActivationSymmetric": recipe.activations_signed,
            "WeightSymmetric": True,
        }
        method = CalibrationMethod.MinMax
        if recipe.percentile is not None:
            method = CalibrationMethod.Percentile
            extra["CalibPercentile"] = recipe.percentile
        try:
            quantize_static(
                str(prepared),
                str(out_path),
                Reader(calibration, batch_size),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(STATIC_OP_TYPES),
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                activation_type=QuantType.QInt8 if recipe.activations_signed else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=keep_fp32,
                extra_options=extra,
                calibration_cache_path=calibration_cache,
            )
        except Exception as exc:
            raise ExportError(
                f"static INT8 quantisation failed: {type(exc).__name__}: {exc}"
            ) from exc
    if recipe.per_frame_convs:
        from export.per_frame import per_frame_convs

        model = onnx.load(str(out_path))
        per_frame_convs(model, recipe.per_frame_convs, feature_extractor_convs(model))
        onnx.save(model, str(out_path))
    return out_path


def to_int8_dynamic(fp32_path: Path, out_path: Path) -> Path:
    """MatMul-only dynamic INT8 (CPU): weights int8 offline, activations quantised per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            per_channel=False,
            reduce_range=DYNAMIC.reduce_range,
            extra_options={"MatMulConstBOnly": True},
        )
    except Exception as exc:
        raise ExportError(f"dynamic INT8 quantisation failed: {type(exc).__name__}: {exc}") from exc
    return out_path
