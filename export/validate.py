"""The gates an exported model must pass before it reaches the model repository.

Following optimum's exporter: names and shapes first, then numbers against the
source model. fp32 must reproduce PyTorch (relative L2 <= 1e-4). fp16 and INT8
must keep each window's direction (cosine >= 0.99 for at least 99% of the
windows; the minimum is reported) *and* the neighbourhood structure the index
relies on: the nearest neighbour of each window among the others must be the
same as with fp32 PyTorch for >= 95% of windows. Cosine alone flatters INT8:
unrelated clips already sit at cosine 0.95-0.995 with random weights.

Why 99% and not every window: a window that is mostly digital near-silence
(gated noise bursts, say) puts MERT's LayerNorms on near-constant frames,
where any rounding is amplified; with the tiny test model one such window in
256 lands at 0.975-0.99 under INT8 while all others stay above 0.998. One
pathological window should not veto a model; a systematic loss still fails.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.contract import INPUT_NAME, OUTPUT_NAME
from mert_indexer.errors import ValidationError

log = logging.getLogger(__name__)

FP32_MAX_REL_L2 = 1e-4
MIN_COSINE = 0.99
COSINE_EXCEPTIONS = 0.01  # share of windows allowed below MIN_COSINE
MIN_RETRIEVAL_AGREEMENT = 0.95

# /proc/cpuinfo flags that decide which int8 kernels ONNX Runtime runs on x86.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The int8-relevant vector extensions of this machine's CPU (empty where unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return tuple(flag for flag in CPU_FLAGS if flag in present)
    return ()


def cpu_class() -> str:
    """One phrase for the CPU class the int8 kernels depend on, with the flags seen.

    e.g. ``AVX-512 VNNI (avx2 avx512f avx512_vnni)`` or ``AVX2, no VNNI (avx2)``;
    AMX-INT8 first where present: ONNX Runtime's u8 x s8 GEMM ran at ~9.5x the
    fp32 rate there, against ~2.9x with AVX-512 VNNI alone
    (``benchmarks/results/xeon_amx/model_speed.md``).
    """
    flags = cpu_flags()
    if "amx_int8" in flags:
        name = "AMX-INT8"
    elif "avx512_vnni" in flags:
        name = "AVX-512 VNNI"
    elif "avx_vnni" in flags:
        name = "AVX-VNNI"
    elif "avx512f" in flags:
        name = "AVX-512, no VNNI"
    elif "avx2" in flags:
        name = "AVX2, no VNNI"
    else:
        name = "no AVX2 (or not x86)"
    return f"{name} ({' '.join(flags) or 'no flags read'})"


@dataclass(frozen=True)
class Report:
    """What the gates measured; logged, and written as a comment in the config's export block."""

    precision: str
    windows: int
    max_rel_l2: float
    min_cosine: float
    mean_cosine: float
    below_min_cosine: int  # windows under MIN_COSINE
    retrieval_agreement: float | None  # None where not gated (fp32)
    cpu: str = field(default_factory=cpu_class)  # the CPU class the candidate ran on
    simulated_qdq: bool = False  # QDQ fusion off: exact simulated quantisation in fp32

    def summary(self) -> str:
        parts = [
            f"{self.precision}: {self.windows} windows",
            f"max rel L2 {self.max_rel_l2:.2e}",
            f"cosine min {self.min_cosine:.5f} mean {self.mean_cosine:.5f}"
            + (f" ({self.below_min_cosine} below {MIN_COSINE})" if self.below_min_cosine else ""),
        ]
        if self.retrieval_agreement is not None:
            parts.append(f"nearest-neighbour agreement {self.retrieval_agreement:.1%}")
        parts.append(f"CPU {self.cpu}" + (", QDQ simulated in fp32" if self.simulated_qdq else ""))
        return ", ".join(parts)


def session(path: Path, *, simulate_qdq: bool = False) -> Any:
    """A CPU ONNX Runtime session (the gates run where the export runs).

    ``simulate_qdq`` turns ONNX Runtime's QDQ fusion off: each QuantizeLinear /
    DequantizeLinear pair then runs in fp32, which is exact simulated
    quantisation and the same on every CPU. That is how a model meant for
    another runtime (the TensorRT recipe) is measured: ORT's fused CPU int8
    kernels would measure their own arithmetic, which on CPUs without VNNI
    saturates for full-range int8 weights.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if simulate_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValidationError(f"{path.name}: ONNX Runtime cannot load the model: {exc}") from exc


def check_signature(sess: Any, input_dtype: str, window_samples: int, embedding_dim: int) -> None:
    """Check the signature: one input, one output.

    Input ``AUDIO [batch, window]`` of the promised dtype, output
    ``EMBEDDING [batch, D]`` float32.
    """
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
        raise ValidationError(
            f"graph signature {[i.name for i in inputs]} -> {[o.name for o in outputs]}, "
            f"expected [{INPUT_NAME!r}] -> [{OUTPUT_NAME!r}]"
        )
    expected_type = {"int16": "tensor(int16)", "float32": "tensor(float)"}[input_dtype]
    if inputs[0].type != expected_type:
        raise ValidationError(f"input {INPUT_NAME} is {inputs[0].type}, expected {expected_type}")
    if outputs[0].type != "tensor(float)":
        raise ValidationError(f"output {OUTPUT_NAME} is {outputs[0].type}, expected tensor(float)")
    in_shape, out_shape = inputs[0].shape, outputs[0].shape
    if len(in_shape) != 2 or isinstance(in_shape[0], int) or in_shape[1] != window_samples:
        raise ValidationError(f"input shape {in_shape}, expected [batch, {window_samples}]")
    if len(out_shape) != 2 or isinstance(out_shape[0], int) or out_shape[1] != embedding_dim:
        raise ValidationError(f"output shape {out_shape}, expected [batch, {embedding_dim}]")


def check_metadata(sess: Any, expected: dict[str, str]) -> None:
    """The model file itself carries its identity (the contract keys).

    Read back by ONNX Runtime.
    """
    found = sess.get_modelmeta().custom_metadata_map
    wrong = sorted(k for k, v in expected.items() if found.get(k) != v)
    if wrong:
        raise ValidationError(f"model metadata lacks or misstates {', '.join(wrong)}")


def run(sess: Any, audio: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """Embeddings for ``audio`` in batches; checks the per-call output shape too."""
    out = []
    for start in range(0, len(audio), batch_size):
        batch = audio[start : start + batch_size]
        (result,) = sess.run([OUTPUT_NAME], {INPUT_NAME: batch})
        if result.shape[0] != len(batch) or result.dtype != np.float32:
            raise ValidationError(
                f"batch of {len(batch)} gave output {result.shape} {result.dtype}, "
                f"expected [{len(batch)}, D] float32"
            )
        out.append(result)
    return np.concatenate(out)


def rel_l2(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-window ``|c - r| / |r|``."""
    denom = np.maximum(np.linalg.norm(reference, axis=1), 1e-12)
    return np.linalg.norm(candidate - reference, axis=1) / denom


def cosines(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    a = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    b = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """Index of each window's most similar other window (cosine, self excluded)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)


def retrieval_agreement(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Share of windows whose nearest neighbour is the same under both models."""
    return float(np.mean(nearest_neighbours(candidate) == nearest_neighbours(reference)))


def gate(
    precision: str, candidate: np.ndarray, reference: np.ndarray, *, simulated_qdq: bool = False
) -> Report:
    """Measure ``candidate`` against ``reference``.

    Raises :class:`ValidationError` on a failed gate; its message names the CPU class.
    """
    if candidate.shape != reference.shape:
        raise ValidationError(f"output shape {candidate.shape}, PyTorch gives {reference.shape}")
    if not np.all(np.isfinite(candidate)):
        raise ValidationError(f"{precision}: the exported model produced NaN or Inf")
    errors = rel_l2(candidate, reference)
    cos = cosines(candidate, reference)
    gated_retrieval = precision != "fp32"
    report = Report(
        precision=precision,
        windows=len(reference),
        max_rel_l2=float(errors.max()),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        below_min_cosine=int(np.sum(cos < MIN_COSINE)),
        retrieval_agreement=retrieval_agreement(candidate, reference) if gated_retrieval else None,
        simulated_qdq=simulated_qdq,
    )
    where = f" (CPU {report.cpu}{', QDQ simulated in fp32' if simulated_qdq else ''})"
    log.info("validation: %s", report.summary())
    if precision == "fp32":
        if report.max_rel_l2 > FP32_MAX_REL_L2:
            worst = int(errors.argmax())
            raise ValidationError(
                f"fp32 output differs from PyTorch: relative L2 {report.max_rel_l2:.2e} "
                f"(window {worst}) > {FP32_MAX_REL_L2:g}{where}"
            )
        return report
    allowed = int(COSINE_EXCEPTIONS * report.windows)
    if report.below_min_cosine > allowed:
        raise ValidationError(
            f"{precision}: cosine similarity to fp32 PyTorch is below {MIN_COSINE} for "
            f"{report.below_min_cosine} of {report.windows} windows (at most {allowed} allowed; "
            f"worst {report.min_cosine:.4f}, window {int(cos.argmin())}){where}"
        )
    assert report.retrieval_agreement is not None
    if report.retrieval_agreement < MIN_RETRIEVAL_AGREEMENT:
        raise ValidationError(
            f"{precision}: nearest neighbour agrees with fp32 PyTorch for only "
            f"{report.retrieval_agreement:.1%} of {report.windows} windows "
            f"(< {MIN_RETRIEVAL_AGREEMENT:.0%}){where}"
        )
    return report
