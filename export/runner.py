"""One export, start to finish: load → graph → ONNX → precision → validate → model repository.

Everything is built and validated in a temporary folder; the model repository
is touched only after every gate passed (and the new config composed and
checked), so a failed export leaves the repository exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export import calibration, repo, synth, validate
from export.options import POOLING, ExportOptions, parse_layer_spec
from mert_indexer.contract import (
    CONTRACT_VERSION,
    P_CONTRACT_VERSION,
    P_EMBEDDING_DIM,
    P_LAYERS,
    P_MODEL_ID,
    P_POOLING,
    P_PRECISION,
    P_SAMPLE_RATE,
    P_WEIGHTS_SHA256,
    P_WINDOW_SAMPLES,
    format_layers,
)
from mert_indexer.errors import ConfigError, ValidationError

log = logging.getLogger(__name__)

# The validation windows do not depend on --seed: every export of every model
# is measured on the same audio.
VALIDATION_SEED = 20_240_601
# fp32 only has to reproduce PyTorch; a few dozen windows show that.
FP32_PARITY_WINDOWS = 32


class Stages:
    """Wall seconds per stage of one export, in the order they ran: where the time went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())


@dataclass(frozen=True)
class ExportResult:
    """What was written and what the gates measured."""

    model_path: Path
    config_path: Path
    params: dict[str, str]
    report: validate.Report
    int8_method: str | None
    seconds: float
    stages: dict[str, float]


def window_samples(seconds: float, sample_rate: int) -> int:
    """Samples per window; the window must be a whole number of samples."""
    samples = round(seconds * sample_rate)
    if abs(samples - seconds * sample_rate) > 1e-6:
        raise ConfigError(
            f"--window-seconds {seconds:g} is not a whole number of samples at {sample_rate} Hz"
        )
    if samples < 400:  # the conv feature extractor's receptive field
        raise ConfigError(
            f"--window-seconds {seconds:g} is too short: MERT needs at least 400 samples"
        )
    return samples


def model_input(audio: np.ndarray, input_dtype: str, seed: int) -> np.ndarray:
    """float windows → what a client sends: dithered int16, or the same values as float32."""
    pcm = synth.to_int16(audio, seed)
    if input_dtype == "int16":
        return pcm
    return pcm.astype(np.float32) / np.float32(32768.0)


def load(options: ExportOptions) -> Any:
    """The weights ``options`` ask for; random init says loudly that its embeddings mean nothing."""
    from export import mert

    if options.random_init:
        log.warning(
            "--random-init: untrained %s weights: the embeddings are MEANINGLESS "
            "(same architecture and cost; for tests and benchmarks only)",
            options.size,
        )
        return mert.random_model(options.size, options.seed)
    return mert.load_model(options.model_source)


def run_export(options: ExportOptions) -> ExportResult:
    """Export, validate and install one model as ``options`` says.

    Raises a typed error otherwise.
    """
    started = time.monotonic()
    stages = Stages()
    model_dir = options.output / options.name
    # Fail fast on a config we could not update, before minutes of export work.
    repo.check_existing(model_dir / repo.CONFIG_NAME, options.name)
    with stages.time("load"):
        loaded = load(options)
    layers = parse_layer_spec(options.layers, loaded.num_layers)
    samples = window_samples(options.window_seconds, loaded.sample_rate)
    params = contract_params(loaded, layers, samples, options.precision)
    log.info(
        "exporting %s: hidden states %s of 0..%d, %s input, %d-sample windows, %s",
        loaded.model_id,
        params[P_LAYERS],
        loaded.num_layers,
        options.input_dtype,
        samples,
        options.precision,
    )
    count = options.validation_windows
    if options.precision == "fp32":
        count = min(count, FP32_PARITY_WINDOWS)
    windows = synth.windows(count, samples, loaded.sample_rate, VALIDATION_SEED)
    audio = model_input(windows, options.input_dtype, VALIDATION_SEED)

    with tempfile.TemporaryDirectory(prefix="mert-export-") as work_dir:
        work = Path(work_dir)
        with stages.time("trace"):
            fp32_path = build_fp32(
                loaded, layers, options.input_dtype, samples, work / "fp32" / repo.MODEL_FILE
            )
        from export.reference import gate_reference, reference_embeddings

        with stages.time("reference"):
            if options.precision == "fp32":
                log.info("computing the PyTorch reference on %d validation windows", count)
                reference = reference_embeddings(loaded.model, audio, layers)
            else:
                # PyTorch proves the fp32 ONNX on the first windows, which then computes the rest.
                reference = gate_reference(
                    loaded.model,
                    loaded.weights_sha256,
                    fp32_path,
                    audio,
                    layers,
                    min(count, FP32_PARITY_WINDOWS),
                ).embeddings
        if options.precision == "fp32":
            candidates = [("fp32", lambda: fp32_path)]
        elif options.precision == "fp16":
            candidates = [("fp16", lambda: make_fp16(fp32_path, work / "fp16" / repo.MODEL_FILE))]
        else:
            candidates = int8_candidates(options, loaded, samples, fp32_path, work)
        method, files, report = first_passing(
            candidates, options, loaded, samples, params, audio, reference, stages
        )

        from export.quantize import RECIPES

        recipe = RECIPES.get(method) if options.precision == "int8" else None
        notes = [f"validated: {report.summary()}"]
        if recipe:
            notes.append(f"INT8: {recipe.description}")
        if loaded.random_init:
            notes.append("WARNING: random-init weights; the embeddings are meaningless")
        spec = repo.BlockSpec(
            input_dtype=options.input_dtype,
            window_samples=samples,
            embedding_dim=loaded.hidden_size,
            params=params,
            tensorrt_int8=bool(recipe and recipe.gpu_tensorrt),
            notes=tuple(notes),
        )
        with stages.time("install"):
            config_text = repo.compose_config(model_dir / repo.CONFIG_NAME, options.name, spec)
            model_path = repo.install(files, model_dir, config_text)
    seconds = time.monotonic() - started
    log.info("wrote %s and %s in %.1f s", model_path, model_dir / repo.CONFIG_NAME, seconds)
    log.info("where the time went: %s", stages.summary())
    int8_method = recipe.method if recipe else None
    return ExportResult(
        model_path,
        model_dir / repo.CONFIG_NAME,
        params,
        report,
        int8_method,
        seconds,
        dict(stages.seconds),
    )


def contract_params(
    loaded: Any, layers: tuple[int, ...], samples: int, precision: str
) -> dict[str, str]:
    """The identity the config and the ONNX metadata carry (every key of the contract)."""
    return {
        P_CONTRACT_VERSION: CONTRACT_VERSION,
        P_MODEL_ID: loaded.model_id,
        P_WEIGHTS_SHA256: loaded.weights_sha256,
        P_LAYERS: format_layers(layers),
        P_POOLING: POOLING,
        P_WINDOW_SAMPLES: str(samples),
        P_SAMPLE_RATE: str(loaded.sample_rate),
        P_EMBEDDING_DIM: str(loaded.hidden_size),
        P_PRECISION: precision,
    }


def first_passing(
    candidates: list[tuple[str, Callable[[], Path]]],
    options: ExportOptions,
    loaded: Any,
    samples: int,
    params: dict[str, str],
    audio: np.ndarray,
    reference: np.ndarray,
    stages: Stages,
) -> tuple[str, list[Path], validate.Report]:
    """Build and gate each candidate in turn; the first that passes wins, else ValidationError."""
    failures = []
    for method, produce in candidates:
        metadata = dict(params)
        if options.precision == "int8":
            metadata["export.int8_method"] = method
        if loaded.random_init:
            metadata["export.random_init"] = "true: embeddings are meaningless"
        with stages.time(f"{method}: build"):
            files = finalise(produce(), metadata)
        try:
            with stages.time(f"{method}: gates"):
                report = check(
                    files[0], options, samples, loaded.hidden_size, audio, reference, metadata
                )
        except ValidationError as exc:
            failures.append(f"{method}: {exc}")
            if method != candidates[-1][0]:
                log.warning("INT8 %s failed validation (%s); trying the fallback", method, exc)
            continue
        return method, files, report
    raise ValidationError("; ".join(failures) + " (nothing was written)")


def build_fp32(
    loaded: Any, layers: tuple[int, ...], input_dtype: str, samples: int, path: Path
) -> Path:
    """Trace the pooled graph and save it (single file, or with external data past 2 GB)."""
    import torch

    from export.convert import export_module, save
    from export.graph import PooledMert

    module = PooledMert(loaded.model, layers, input_dtype).eval()
    dtype = torch.int16 if input_dtype == "int16" else torch.float32
    example = torch.zeros(2, samples, dtype=dtype)
    log.info("tracing the graph to ONNX")
    save(export_module(module, example), path)
    return path


def make_fp16(fp32_path: Path, path: Path) -> Path:
    import onnx

    from export.convert import save
    from export.quantize import to_fp16

    save(to_fp16(onnx.load(str(fp32_path))), path)
    return path


def int8_candidates(
    options: ExportOptions, loaded: Any, samples: int, fp32_path: Path, work: Path
) -> list[tuple[str, Callable[[], Path]]]:
    """Static QDQ for the target first, then (CPU target) dynamic MatMul-only as the fallback.

    Each candidate is built only when the one before it failed validation. The
    GPU target has no fallback: dynamic INT8 kernels exist on CPU only.
    """
    from export.quantize import DYNAMIC, STATIC_CPU, STATIC_GPU, to_int8_dynamic, to_int8_static

    recipe = STATIC_GPU if options.int8_target == "gpu" else STATIC_CPU

    def static() -> Path:
        windows = calibration.calibration_windows(
            options.calibration_dir,
            options.calibration_windows,
            samples,
            loaded.sample_rate,
            VALIDATION_SEED,
        )
        log.info("calibrating INT8 (%s) on %d windows", recipe.method, len(windows))
        path = work / recipe.method / repo.MODEL_FILE
        path.parent.mkdir(parents=True)
        pcm = model_input(windows, options.input_dtype, VALIDATION_SEED + 1)
        return to_int8_static(fp32_path, path, pcm, recipe)

    def dynamic() -> Path:
        log.info("quantising MatMul weights to INT8 (dynamic, CPU only)")
        path = work / DYNAMIC.method / repo.MODEL_FILE
        path.parent.mkdir(parents=True)
        return to_int8_dynamic(fp32_path, path)

    out: list[tuple[str, Callable[[], Path]]] = []
    if options.int8_method in ("auto", "static"):
        out.append((recipe.method, static))
    if options.int8_method == "dynamic" or (
        options.int8_method == "auto" and options.int8_target == "cpu"
    ):
        out.append((DYNAMIC.method, dynamic))
    return out


def finalise(path: Path, metadata: dict[str, str]) -> list[Path]:
    """Write the identity into the model's metadata, in place; returns the file(s) to install."""
    import onnx

    from export.convert import save, set_metadata

    model = onnx.load(str(path))
    set_metadata(model, metadata)
    final = path.parent / "final" / repo.MODEL_FILE
    return save(model, final)


def check(
    path: Path,
    options: ExportOptions,
    samples: int,
    embedding_dim: int,
    audio: np.ndarray,
    reference: np.ndarray,
    metadata: dict[str, str],
) -> validate.Report:
    """Every gate, on the exact file that would be installed.

    A model meant for TensorRT is measured with QDQ simulated in fp32 (exact,
    CPU-independent), not with ONNX Runtime's fused CPU int8 kernels.
    """
    from export.quantize import RECIPES

    recipe = RECIPES.get(metadata.get("export.int8_method", ""))
    simulate = bool(recipe and recipe.simulate_on_cpu)
    session = validate.session(path, simulate_qdq=simulate)
    validate.check_signature(session, options.input_dtype, samples, embedding_dim)
    validate.check_metadata(session, metadata)
    embeddings = validate.run(session, audio)
    return validate.gate(options.precision, embeddings, reference, simulated_qdq=simulate)
