#!/usr/bin/env python
"""Model-only speed of the exported MERT graph on this machine's CPU: fp32 vs INT8, with gates.

No server, no decoding: ONNX Runtime sessions on windows already in memory,
so the numbers are the model's ceiling. Weights are random (same cost as the
real MERT-v1-95M). Speed is "x realtime": window seconds x windows / wall
seconds. In the same run:

- every model at batch 1, 4 and 16, the repeats interleaved (round-robin
  over models and batches, best of N): on a shared machine only ratios
  within one run mean anything;
- the machine's GEMM rates through ONNX Runtime itself (fp32 MatMul and the
  u8 x s8 QLinearMatMul the INT8 model runs, at a transformer FFN shape),
  turned into x-realtime ceilings at 109.3 GFLOP per 5 s window: INT8's
  speed is reported as a fraction of its own ceiling;
- the gates of each INT8 model against the fp32 model (cosine, nearest-
  neighbour agreement) on synthetic validation windows and, with
  ``--music DIR``, on real music;
- a per-operator profile (ONNX Runtime's profiler) of fp32 and the export's
  INT8 recipe at batch 4: where the time goes.

    python benchmarks/bench_model.py --music DIR   # 95M: ~15-25 minutes on 2 busy cores
    python benchmarks/bench_model.py --quick       # one timed run per cell, fewer gate windows

Writes benchmarks/results/model_speed.json and .md (atomically), with the CPU's
vector extensions (the INT8 kernels depend on them).
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
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mert_indexer.atomic import atomic_write

GFLOP_PER_WINDOW_95M = 109.3  # 5 s window, all 12 layers (DESIGN.md)
WINDOW = 120_000
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("bench_model")

FP32 = "fp32"
INT8 = "int8 (export CPU recipe)"


def build_models(
    work: Path, calibration_windows: int, size: str, variants: bool = True
) -> dict[str, Path]:
    """fp32, the export's INT8 CPU recipe and (``variants``) the alternatives it beat."""
    import dataclasses

    import torch

    from export import mert, quantize, synth
    from export.convert import export_module, save
    from export.graph import PooledMert

    loaded = mert.random_model(size, seed=0)
    module = PooledMert(loaded.model, tuple(range(loaded.num_layers + 1)), "int16").eval()
    fp32 = save(
        export_module(module, torch.zeros(2, WINDOW, dtype=torch.int16)), work / "fp32.onnx"
    )[0]
    calibration = synth.to_int16(
        synth.windows(calibration_windows, WINDOW, 24_000, seed=99), seed=99
    )
    cache = work / "calibration.json"  # one calibration pass shared by every static variant
    models = {FP32: fp32}
    recipes = {INT8: quantize.STATIC_CPU}
    if variants:
        recipes["int8 conv1..conv6 too (fails the gates)"] = dataclasses.replace(
            quantize.STATIC_CPU, feature_convs=(1, 2, 3, 4, 5, 6)
        )
        recipes["int8 before (8-bit weights)"] = dataclasses.replace(
            quantize.STATIC_CPU, reduce_range=False
        )
    for label, recipe in recipes.items():
        path = work / f"{len(models)}.onnx"
        models[label] = quantize.to_int8_static(
            fp32, path, calibration, recipe, calibration_cache=cache
        )
    if variants:
        models["int8 dynamic (MatMul, 7-bit)"] = quantize.to_int8_dynamic(
            fp32, work / "dynamic.onnx"
        )
    return models


def session(
    path: Path, profile: Path | None = None, optimisation: str = "all", **kwargs: Any
) -> Any:
    """A CPU session; ``optimisation``: ONNX Runtime's graph optimisation level (basic,
    extended, all); ``kwargs``: session config entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimisation]
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    for key, value in kwargs.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_interleaved(
    runners: dict[str, Callable[[np.ndarray], Any]],
    audio: np.ndarray,
    batches: list[int],
    rounds: int,
) -> dict[str, list[dict]]:
    """Best-of-``rounds`` wall time per model and batch, the repeats interleaved.

    Each round times every (model, batch) once, so a burst of load elsewhere
    hits all models alike; the best of the rounds is the least disturbed.
    """
    for run in runners.values():  # warm-up: kernel choice, arena growth for each batch
        for batch in batches:
            run(audio[:batch])
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    for index in range(rounds):
        for name, run in runners.items():
            for batch in batches:
                start = time.perf_counter()
                run(audio[:batch])
                times[name, batch].append(time.perf_counter() - start)
        log.info("timing round %d of %d done", index + 1, rounds)
    cells: dict[str, list[dict]] = {}
    for name in runners:
        cells[name] = []
        for batch in batches:
            best = min(times[name, batch])
            cells[name].append(
                {
                    "batch": batch,
                    "runs": len(times[name, batch]),
                    "best_s": round(best, 3),
                    "mean_s": round(float(np.mean(times[name, batch])), 3),
                    "x_realtime": round(5.0 * batch / best, 2),
                }
            )
    return cells


def gemm_rates(seconds: float = 2.0, m: int = 1496, k: int = 768, n: int = 3072) -> dict:
    """fp32 and u8 x s8 (7-bit weights) GEMM rates through ONNX Runtime, best of ``seconds``.

    The shape is a 95M FFN matmul at batch 4 (4 x 374 frames x 768 -> 3072).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bench-gemm-"))
    fp32 = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["a", "w"], ["y"])],
            "fp32",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")],
        )
    )
    scalars = [
        numpy_helper.from_array(np.array(v, dtype=t), name)
        for name, v, t in (
            ("sa", 0.02, np.float32),
            ("za", 128, np.uint8),
            ("sw", 0.01, np.float32),
            ("zw", 0, np.int8),
            ("sy", 0.5, np.float32),
            ("zy", 128, np.uint8),
        )
    ]
    weights = rng.integers(-64, 65, (k, n)).astype(np.int8)
    int8 = helper.make_model(
        helper.make_graph(
            [
                helper.make_node(
                    "QLinearMatMul", ["a", "sa", "za", "w", "sw", "zw", "sy", "zy"], ["y"]
                )
            ],
            "int8",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.UINT8, [m, n])],
            [numpy_helper.from_array(weights, "w"), *scalars],
        )
    )
    out = {}
    for name, model, data in (
        ("fp32", fp32, rng.standard_normal((m, k)).astype(np.float32)),
        ("int8", int8, rng.integers(0, 256, (m, k)).astype(np.uint8)),
    ):
        model.opset_import[0].version = 17
        path = work / f"{name}.onnx"
        onnx.save(model, str(path))
        sess = session(path)
        sess.run(None, {"a": data})
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            sess.run(None, {"a": data})
            best = min(best, time.perf_counter() - start)
        out[name] = 2 * m * k * n / best / 1e9
    return {
        "fp32_gflops": round(out["fp32"], 1),
        "int8_gops": round(out["int8"], 1),
        "fp32_x_realtime": round(out["fp32"] / GFLOP_PER_WINDOW_95M * 5, 2),
        "int8_x_realtime": round(out["int8"] / GFLOP_PER_WINDOW_95M * 5, 2),
        "shape": [m, k, n],
    }


def gates(candidate: np.ndarray, reference: np.ndarray) -> dict:
    from export import validate

    cos = validate.cosines(candidate, reference)
    return {
        "windows": len(reference),
        "cosine_min": round(float(cos.min()), 5),
        "cosine_mean": round(float(cos.mean()), 5),
        "below_0.99": int(np.sum(cos < validate.MIN_COSINE)),
        "nn_agreement": round(validate.retrieval_agreement(candidate, reference), 4),
    }


def profile(
    path: Path, audio: np.ndarray, work: Path, label: str, convs: dict[str, str]
) -> dict[str, float]:
    """Milliseconds per operator group of one batch run (ONNX Runtime's profiler)."""
    sess = session(path, profile=work / f"profile-{label.split()[0]}")
    sess.run(None, {"AUDIO": audio})
    sess.run(None, {"AUDIO": audio})  # the second run is the one counted
    trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    last = runs[-1]
    begin = last["ts"]
    groups: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if event["ts"] < begin:
            continue
        node = event["name"][: -len("_kernel_time")]
        groups[op_group(node, event["args"]["op_name"], convs)] += event["dur"] / 1000.0
    groups["(whole run)"] = last["dur"] / 1000.0
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def conv_labels(fp32: Path) -> dict[str, str]:
    """The fp32 graph's Conv node names in order: conv0..conv6, then the positional conv."""
    import onnx

    model = onnx.load(str(fp32), load_external_data=False)
    names = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return {name: f"conv{i}" if i < len(names) - 1 else "pos_conv" for i, name in enumerate(names)}


def op_group(node: str, op: str, convs: dict[str, str]) -> str:
    """Which part of MERT a profiled node belongs to (conv layer, matmul kind, or its op)."""
    for name, group in sorted(convs.items(), key=lambda kv: -len(kv[0])):
        if node.startswith(name):
            return f"{group} ({op})"
    if op in ("MatMul", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "FusedMatMul"):
        kind = "attention" if node.startswith("node_matmul") else "linear"
        return f"{kind} matmul ({op})"
    return op


def markdown(result: dict) -> str:
    m = result["machine"]
    g = result["gemm"]
    batches = result["batches"]
    rows = [
        f"# Model-only speed: {result['model']}, ONNX Runtime CPU",
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores, **{m['cpu_class']}**; "
            f"onnxruntime {m['onnxruntime']}; load average before/after "
            f"{m['load_before']} / {m['load_after']} (shared machine). Command: "
            f"`{result['command']}`."
        ),
        "",
        (
            f"GEMM rates through ONNX Runtime ({'x'.join(map(str, g['shape']))}): fp32 "
            f"{g['fp32_gflops']:.0f} GFLOP/s = {g['fp32_x_realtime']:.1f}x realtime ceiling, "
            f"u8 x s8 {g['int8_gops']:.0f} GOP/s = {g['int8_x_realtime']:.1f}x; their ratio "
            f"{g['int8_gops'] / g['fp32_gflops']:.2f}."
        ),
        "",
        "| model | "
        + " | ".join(f"batch {b}" for b in batches)
        + " | vs fp32 per batch | share of its GEMM ceiling (best) |",
        "|---|" + "---|" * (len(batches) + 2),
    ]
    fp32 = {c["batch"]: c["x_realtime"] for c in result["cells"][FP32]}
    for name, cells in result["cells"].items():
        by_batch = {c["batch"]: c["x_realtime"] for c in cells}
        ceiling = g["fp32_x_realtime"] if name == FP32 else g["int8_x_realtime"]
        rows.append(
            f"| {name} | "
            + " | ".join(f"{by_batch[b]:.2f}x" for b in batches)
            + " | "
            + " / ".join(f"{by_batch[b] / fp32[b]:.2f}" for b in batches)
            + f" | {max(by_batch.values()) / ceiling:.0%} |"
        )
    rows += [
        "",
        "Gates of each INT8 model against the fp32 model (cosine >= 0.99 for >= 99% of "
        "windows, nearest-neighbour agreement >= 95%):",
        "",
        "| model | audio | windows | cosine min / mean | below 0.99 | NN agreement |",
        "|---|---|---|---|---|---|",
    ]
    for name, per_set in result["gates"].items():
        for audio, gate in per_set.items():
            rows.append(
                f"| {name} | {audio} | {gate['windows']} | {gate['cosine_min']:.4f} / "
                f"{gate['cosine_mean']:.4f} | {gate['below_0.99']} | {gate['nn_agreement']:.1%} |"
            )
    if result.get("profile"):
        names = list(result["profile"])
        groups = sorted(
            {k for p in result["profile"].values() for k in p},
            key=lambda k: -max(p.get(k, 0.0) for p in result["profile"].values()),
        )
        rows += [
            "",
            f"Per-operator profile, batch {result['profile_batch']} (ONNX Runtime profiler, "
            "kernel ms of one run):",
            "",
            "| operator group | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for group in groups[:24]:
            rows.append(
                f"| {group} | "
                + " | ".join(f"{result['profile'][n].get(group, 0.0):.0f}" for n in names)
                + " |"
            )
    rows += [
        "",
        "x realtime = 5 s x windows / wall seconds, best of the interleaved rounds; one "
        "session, all cores. INT8 export CPU recipe: uint8 activations, per-tensor 7-bit int8 "
        "weights (the same integers on CPUs with and without VNNI), conv feature extractor "
        "fp32 (docs/export.md).",
        "",
    ]
    return "\n".join(rows)


def music_windows(folder: Path, count: int) -> np.ndarray:
    from export import calibration, synth

    return synth.to_int16(calibration.folder_windows(folder, count, WINDOW, 24_000), seed=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one timed round, fewer windows")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--calibration-windows", type=int, default=64)
    parser.add_argument("--gate-windows", type=int, default=64, help="synthetic gate windows")
    parser.add_argument("--music", type=Path, help="folder of real music for a second gate set")
    parser.add_argument("--music-windows", type=int, default=64)
    parser.add_argument("--no-variants", action="store_true", help="fp32 and the recipe only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--size", choices=("95m", "tiny"), default="95m", help="tiny: a smoke test of this script"
    )
    args = parser.parse_args(argv)
    from export.to_onnx import configure_logging

    configure_logging(quiet=False)  # progress lines, without the quantiser's narration
    import onnxruntime

    from export import runner, synth, validate

    batches = [int(b) for b in args.batches.split(",")]
    rounds = 1 if args.quick else args.rounds
    gate_count = 16 if args.quick else args.gate_windows
    load_before = os.getloadavg()[0]
    gemm = gemm_rates()
    log.info("GEMM through ONNX Runtime: %s", gemm)
    audio = synth.to_int16(synth.windows(max(batches), WINDOW, 24_000, seed=1), seed=1)
    gate_sets = {
        "synthetic": runner.model_input(
            synth.windows(gate_count, WINDOW, 24_000, runner.VALIDATION_SEED),
            "int16",
            runner.VALIDATION_SEED,
        )
    }
    if args.music:
        gate_sets["real music"] = music_windows(
            args.music, 16 if args.quick else args.music_windows
        )
    with tempfile.TemporaryDirectory(prefix="bench-model-") as work_dir:
        work = Path(work_dir)
        started = time.perf_counter()
        models = build_models(work, args.calibration_windows, args.size, not args.no_variants)
        log.info("built %d models in %.0f s", len(models), time.perf_counter() - started)
        sessions = {name: session(path) for name, path in models.items()}
        runners = {
            name: (lambda x, s=sess: s.run(None, {"AUDIO": x})) for name, sess in sessions.items()
        }
        cells = time_interleaved(runners, audio, batches, rounds)
        gate_results: dict[str, dict] = {}
        for set_name, windows in gate_sets.items():
            reference = validate.run(sessions[FP32], windows)
            for name, sess in sessions.items():
                if name != FP32:
                    gate_results.setdefault(name, {})[set_name] = gates(
                        validate.run(sess, windows), reference
                    )
        profile_batch = 4 if 4 in batches else batches[0]
        convs = conv_labels(models[FP32])
        profiles = {
            name: profile(models[name], audio[:profile_batch], work, name, convs)
            for name in (FP32, INT8)
        }
    result = {
        "model": (
            f"MERT {args.size} architecture, random init, all hidden states pooled, int16 input"
        ),
        "command": "python benchmarks/bench_model.py " + " ".join(argv or sys.argv[1:]),
        "window_seconds": 5.0,
        "gflop_per_window": GFLOP_PER_WINDOW_95M,
        "batches": batches,
        "gemm": gemm,
        "cells": cells,
        "gates": gate_results,
        "profile_batch": profile_batch,
        "profile": profiles,
        "machine": {
            "cpu": _cpu_name(),
            "cpu_class": validate.cpu_class(),
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
    """Atomic write; world-readable like any results file."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


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
