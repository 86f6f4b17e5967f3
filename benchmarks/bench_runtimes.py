#!/usr/bin/env python
"""ONNX Runtime vs OpenVINO on the same exported ONNX files: fp32 and INT8, batch 1/4/16, one run.

Triton deployments on CPU often use the OpenVINO backend; the embedded server
runs ONNX Runtime in the Python backend. This measures both on the same
``model.onnx`` (fp32, and the export's INT8 CPU recipe), the repeats
interleaved in one run, and gates each against ONNX Runtime fp32 (fp32:
relative L2 <= 1e-4; INT8: cosine >= 0.99 for >= 99% of windows and
nearest-neighbour agreement >= 95%, on synthetic windows and, with
``--music DIR``, real music). A runtime that is >= 1.2x faster at the same
gates would become the embedded server's CPU default.

    python benchmarks/bench_runtimes.py --music DIR     # needs `pip install openvino`

Writes benchmarks/results/runtime_compare.json and .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_model import (
    FP32,
    INT8,
    RESULTS,
    WINDOW,
    _cpu_name,
    build_models,
    gates,
    music_windows,
    session,
    time_interleaved,
    write_readable,
)

log = logging.getLogger("bench_runtimes")
CLEAR_MARGIN = 1.2


def openvino_runner(path: Path) -> Callable[[np.ndarray], Any]:
    """An OpenVINO CPU request on ``path`` (dynamic batch), fp32 arithmetic where the model is."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise SystemExit("this benchmark needs OpenVINO: pip install openvino") from exc
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        # f32: without it OpenVINO may pick bf16 on CPUs that have it, which is not fp32.
        {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()

    def run(audio: np.ndarray) -> np.ndarray:
        request.infer({0: audio})
        return np.array(request.get_output_tensor(0).data, copy=True)

    return run


def ort_runner(path: Path) -> Callable[[np.ndarray], Any]:
    sess = session(path)

    def run(audio: np.ndarray) -> np.ndarray:
        return sess.run(None, {"AUDIO": audio})[0]

    return run


def embed(run: Callable[[np.ndarray], Any], audio: np.ndarray, batch: int = 4) -> np.ndarray:
    return np.concatenate([run(audio[i : i + batch]) for i in range(0, len(audio), batch)])


def markdown(result: dict) -> str:
    m = result["machine"]
    batches = result["batches"]
    rows = [
        "# ONNX Runtime vs OpenVINO, model only, CPU",
        "",
        (
            f"{result['model']}. Machine: {m['cpu']}, {m['cores']} cores, **{m['cpu_class']}**; "
            f"onnxruntime {m['onnxruntime']}, openvino {m['openvino']}; load average "
            f"before/after {m['load_before']} / {m['load_after']} (shared machine). Command: "
            f"`{result['command']}`."
        ),
        "",
        "| runtime, model | "
        + " | ".join(f"batch {b}" for b in batches)
        + " | vs ONNX Runtime, same model |",
        "|---|" + "---|" * (len(batches) + 1),
    ]
    cells = {
        name: {c["batch"]: c["x_realtime"] for c in cs} for name, cs in result["cells"].items()
    }
    for name, by_batch in cells.items():
        runtime, model = name.split(" | ")
        base = cells[f"onnxruntime | {model}"]
        rows.append(
            f"| {runtime}, {model} | "
            + " | ".join(f"{by_batch[b]:.2f}x" for b in batches)
            + " | "
            + " / ".join(f"{by_batch[b] / base[b]:.2f}" for b in batches)
            + " |"
        )
    rows += [
        "",
        "Parity against ONNX Runtime fp32:",
        "",
        "| runtime, model | audio | windows | max rel L2 | cosine min | below 0.99 "
        "| NN agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, per_set in result["gates"].items():
        for audio, g in per_set.items():
            rows.append(
                f"| {name.replace(' | ', ', ')} | {audio} | {g['windows']} | "
                f"{g['max_rel_l2']:.1e} | {g['cosine_min']:.4f} | {g['below_0.99']} | "
                f"{g['nn_agreement']:.1%} |"
            )
    rows += ["", f"**Choice:** {result['choice']}", ""]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration-windows", type=int, default=64)
    parser.add_argument("--gate-windows", type=int, default=64)
    parser.add_argument("--music", type=Path)
    parser.add_argument("--music-windows", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--size", choices=("95m", "tiny"), default="95m")
    args = parser.parse_args(argv)
    from export.to_onnx import configure_logging

    configure_logging(quiet=False)
    import onnxruntime
    import openvino

    from export import runner, synth, validate

    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()[0]
    audio = synth.to_int16(synth.windows(max(batches), WINDOW, 24_000, seed=1), seed=1)
    gate_sets = {
        "synthetic": runner.model_input(
            synth.windows(args.gate_windows, WINDOW, 24_000, runner.VALIDATION_SEED),
            "int16",
            runner.VALIDATION_SEED,
        )
    }
    if args.music:
        gate_sets["real music"] = music_windows(args.music, args.music_windows)
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as work_dir:
        models = build_models(Path(work_dir), args.calibration_windows, args.size, variants=False)
        runners = {}
        for model_name, path in ((FP32, models[FP32]), ("int8", models[INT8])):
            runners[f"onnxruntime | {model_name}"] = ort_runner(path)
            runners[f"openvino | {model_name}"] = openvino_runner(path)
        cells = time_interleaved(runners, audio, batches, args.rounds)
        gate_results: dict[str, dict] = {}
        for set_name, windows in gate_sets.items():
            reference = embed(runners[f"onnxruntime | {FP32}"], windows)
            for name, run in runners.items():
                if name == f"onnxruntime | {FP32}":
                    continue
                out = embed(run, windows)
                g = gates(out, reference)
                g["max_rel_l2"] = float(validate.rel_l2(out, reference).max())
                gate_results.setdefault(name, {})[set_name] = g
    best = {name: {c["batch"]: c["x_realtime"] for c in cs} for name, cs in cells.items()}
    speedups = {
        model: min(
            best[f"openvino | {model}"][b] / best[f"onnxruntime | {model}"][b] for b in batches
        )
        for model in (FP32, "int8")
    }
    choice = (
        "OpenVINO is >= 1.2x faster at every batch for both models"
        if all(s >= CLEAR_MARGIN for s in speedups.values())
        else "ONNX Runtime stays the embedded server's CPU runtime: OpenVINO's worst-batch "
        + ", ".join(f"{m} {s:.2f}x" for m, s in speedups.items())
        + f" of ONNX Runtime (a switch needs >= {CLEAR_MARGIN}x at the same gates)"
    )
    result = {
        "model": f"MERT {args.size} architecture, random init, all hidden states, int16 input",
        "command": "python benchmarks/bench_runtimes.py " + " ".join(argv or sys.argv[1:]),
        "batches": batches,
        "cells": cells,
        "gates": gate_results,
        "worst_batch_speedup_openvino": speedups,
        "choice": choice,
        "machine": {
            "cpu": _cpu_name(),
            "cpu_class": validate.cpu_class(),
            "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__.split("-")[0],
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    write_readable(args.output / "runtime_compare.json", json.dumps(result, indent=2) + "\n")
    write_readable(args.output / "runtime_compare.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
