#!/usr/bin/env python
"""Model-only speed of the exported MERT graph on this machine's CPU, per precision and batch size.

No server, no decoding: ONNX Runtime sessions on windows already in memory,
so the numbers are the model's ceiling. Weights are random (same cost as the
real MERT-v1-95M). Speed is "x realtime": window seconds x windows / wall
seconds. Beside it, the machine's fp32 GEMM ceiling: numpy matmul GFLOP/s
turned into x realtime at 109.3 GFLOP per 5 s window (95M, all layers).

    python benchmarks/bench_model.py            # ~5-8 minutes on 2 cores
    python benchmarks/bench_model.py --quick    # one timed run per cell

Writes benchmarks/results/model_speed.json and .md (atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mert_indexer.atomic import atomic_write

GFLOP_PER_WINDOW_95M = 109.3  # 5 s window, all 12 layers (DESIGN.md)
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("bench_model")


def gemm_ceiling(seconds: float = 3.0, n: int = 2048) -> float:
    """Sustained fp32 GFLOP/s of numpy matmul (all cores), best of a few runs."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def build_models(work: Path, calibration_windows: int, size: str) -> dict[str, Path]:
    """fp32, int8 static (the export's CPU recipe) and int8 dynamic models of a random-init MERT."""
    import torch

    from export import mert, quantize, synth
    from export.convert import export_module, save
    from export.graph import PooledMert

    loaded = mert.random_model(size, seed=0)
    module = PooledMert(loaded.model, tuple(range(loaded.num_layers + 1)), "int16").eval()
    fp32 = save(
        export_module(module, torch.zeros(2, 120_000, dtype=torch.int16)), work / "fp32.onnx"
    )[0]
    calibration = synth.to_int16(
        synth.windows(calibration_windows, 120_000, 24_000, seed=99), seed=99
    )
    static = quantize.to_int8_static(
        fp32, work / "int8_static.onnx", calibration, quantize.STATIC_CPU
    )
    dynamic = quantize.to_int8_dynamic(fp32, work / "int8_dynamic.onnx")
    return {"fp32": fp32, "int8 static QDQ": static, "int8 dynamic (MatMul)": dynamic}


def time_cells(
    path: Path, audio: np.ndarray, batches: list[int], runs: dict[int, int]
) -> list[dict]:
    """Best-of-N wall time per batch size (the machine is shared: the best run is the least disturbed)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"AUDIO": audio[:1]})  # warm-up: kernel selection, first allocations
    cells = []
    for batch in batches:
        inputs = {"AUDIO": audio[:batch]}
        times = []
        for _ in range(runs[batch]):  # the first run of a new batch size also grows the arena
            start = time.perf_counter()
            session.run(None, inputs)
            times.append(time.perf_counter() - start)
        best = min(times)
        cells.append(
            {
                "batch": batch,
                "runs": len(times),
                "best_s": round(best, 3),
                "mean_s": round(sum(times) / len(times), 3),
                "windows_per_s": round(batch / best, 3),
                "x_realtime": round(5.0 * batch / best, 2),
            }
        )
        log.info(
            "%-22s batch %2d: %6.2fx realtime (best of %d)",
            path.stem,
            batch,
            5.0 * batch / best,
            len(times),
        )
    return cells


def markdown(result: dict) -> str:
    rows = [
        f"# Model-only speed: {result['model']}, ONNX Runtime CPU",
        "",
        (
            f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
            f"onnxruntime {result['machine']['onnxruntime']}; load average before/after "
            f"{result['machine']['load_before']} / {result['machine']['load_after']} (shared machine)."
        ),
        "",
        (
            f"fp32 GEMM ceiling (numpy matmul): {result['gemm_gflops']:.1f} GFLOP/s "
            f"= **{result['gemm_x_realtime']:.2f}x realtime** at {GFLOP_PER_WINDOW_95M} GFLOP per 5 s window."
        ),
        "",
        "| precision | batch 1 | batch 4 | batch 16 | vs fp32 (best batch) |",
        "|---|---|---|---|---|",
    ]
    best_fp32 = max(c["x_realtime"] for c in result["cells"]["fp32"])
    for precision, cells in result["cells"].items():
        by_batch = {c["batch"]: c["x_realtime"] for c in cells}
        best = max(by_batch.values())
        rows.append(
            f"| {precision} | "
            + " | ".join(f"{by_batch.get(b, float('nan')):.2f}x" for b in (1, 4, 16))
            + f" | {best / best_fp32:.2f}x |"
        )
    rows += [
        "",
        "x realtime = 5 s x windows / wall seconds, best of 2-4 runs per cell; one session, all cores.",
        "int8 static QDQ = the export's CPU recipe (uint8 activations, per-tensor int8 weights,",
        "feature extractor fp32); int8 dynamic = MatMul weights only.",
        "",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one timed run per cell")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--size", choices=("95m", "tiny"), default="95m", help="tiny: a smoke test of this script"
    )
    args = parser.parse_args(argv)
    from export.to_onnx import configure_logging

    configure_logging(quiet=False)  # progress lines, without the quantiser's narration
    import onnxruntime

    from export import synth

    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()[0]
    gflops = gemm_ceiling()
    log.info(
        "fp32 GEMM ceiling: %.1f GFLOP/s = %.2fx realtime",
        gflops,
        gflops / GFLOP_PER_WINDOW_95M * 5,
    )
    audio = synth.to_int16(synth.windows(max(batches), 120_000, 24_000, seed=1), seed=1)
    cells: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-model-") as work:
        started = time.perf_counter()
        models = build_models(Path(work), args.calibration_windows, args.size)
        log.info("built the three models in %.0f s", time.perf_counter() - started)
        runs = {b: 1 if args.quick else (4 if b == 1 else 3 if b <= 4 else 2) for b in batches}
        for precision, path in models.items():
            cells[precision] = time_cells(path, audio, batches, runs)
    result = {
        "model": f"MERT {args.size} architecture, random init, all hidden states pooled, int16 input",
        "window_seconds": 5.0,
        "gflop_per_window": GFLOP_PER_WINDOW_95M,
        "gemm_gflops": round(gflops, 1),
        "gemm_x_realtime": round(gflops / GFLOP_PER_WINDOW_95M * 5, 2),
        "cells": cells,
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    write_readable(args.output / "model_speed.json", json.dumps(result, indent=2) + "\n")
    write_readable(args.output / "model_speed.md", markdown(result))
    print(markdown(result))
    return 0


def write_readable(path: Path, text: str) -> None:
    """Atomic write; world-readable like any results file (the temporary file starts 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    with atomic_write(path, "w") as fh:
        fh.write(text)
        os.fchmod(fh.fileno(), 0o666 & ~umask)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
