#!/usr/bin/env python
"""INT8 layer by layer: which quantisations of the conv front end keep the gates, buy speed.

The export's CPU recipe (``export/quantize.py``) quantises every MatMul and
keeps the seven convs of the waveform feature extractor fp32; they are about
half of its run time. This measures, in one run on one machine, each conv
quantised on its own (conv1..conv6; conv0 feeds the GroupNorm over the whole
window and stays fp32), all six together, all six as per-frame dynamic INT8
(``export/per_frame.py``: one scale per frame), the activation range taken from a
histogram percentile instead of min/max, calibration on real music instead
of synthetic windows, and ONNX Runtime's graph optimisation levels. Every
variant is:

- timed against fp32 and the recipe at batch 1 and 4, repeats interleaved
  (best of ``--rounds``): only ratios within one run mean anything on a
  shared machine;
- gated against the fp32 ONNX model like the export (cosine >= 0.99 for >=
  99% of windows, nearest-neighbour agreement >= 95%) on synthetic windows
  and, with ``--music DIR``, on windows of real music.

    python benchmarks/int8_layers.py --music data/music      # 95M: ~30-40 min on 2 cores
    python benchmarks/int8_layers.py --size tiny --rounds 1  # a smoke test of this script

Writes benchmarks/results/int8_layers.json and .md (atomically), with the CPU's
vector extensions (the INT8 kernels depend on them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_model import (
    WINDOW,
    _cpu_name,
    conv_labels,
    gates,
    gemm_rates,
    music_windows,
    profile,
    session,
    time_interleaved,
    write_readable,
)

RESULTS = ROOT / "benchmarks" / "results"
FP32 = "fp32"
RECIPE = "recipe: convs fp32"
log = logging.getLogger("int8_layers")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One INT8 model: a recipe, the audio it is calibrated on, the session's optimisation."""

    label: str
    recipe: Any
    calibration: str = "synthetic"  # or "real music"
    optimisation: str = "all"  # ONNX Runtime graph optimisation level


def variants(recipe: Any, music: bool) -> list[Variant]:
    """The recipe, then one change each: a conv, all convs, percentile ranges, music, opt level."""
    out = [Variant(RECIPE, recipe)]
    out.append(
        Variant("conv1..conv6", dataclasses.replace(recipe, feature_convs=(1, 2, 3, 4, 5, 6)))
    )
    out.append(
        Variant(
            "per-frame conv1..conv6",
            dataclasses.replace(recipe, per_frame_convs=(1, 2, 3, 4, 5, 6)),
        )
    )
    out += [
        Variant(f"conv{k}", dataclasses.replace(recipe, feature_convs=(k,))) for k in range(1, 7)
    ]
    out.append(
        Variant(
            "conv1, percentile 99.99",
            dataclasses.replace(recipe, feature_convs=(1,), percentile=99.99),
        )
    )
    out.append(
        Variant("convs fp32, percentile 99.99", dataclasses.replace(recipe, percentile=99.99))
    )
    if music:
        out.append(Variant("convs fp32, calibrated on music", recipe, calibration="real music"))
        out.append(
            Variant(
                "conv1, calibrated on music",
                dataclasses.replace(recipe, feature_convs=(1,)),
                calibration="real music",
            )
        )
    out.append(Variant("convs fp32, graph opt extended", recipe, optimisation="extended"))
    out.append(Variant("convs fp32, graph opt basic", recipe, optimisation="basic"))
    return out


def judged(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """``bench_model.gates`` figures, and whether the export's own gate would pass them."""
    from export import validate
    from mert_indexer.errors import ValidationError

    out = gates(candidate, reference)
    try:
        validate.gate("int8", candidate, reference)
        out["passes"] = True
    except ValidationError:
        out["passes"] = False
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    c = result["ceilings"]
    g = result["gemm"]
    batches = result["batches"]
    sets = result["gate_sets"]
    head = (
        "| variant | "
        + " | ".join(f"INT8/fp32 batch {b}" for b in batches)
        + " | "
        + " | ".join(f"{s}: cosine min, below 0.99, NN" for s in sets)
        + " | gates |"
    )
    rows = [
        "# INT8 layer by layer: the conv front end, calibration and graph optimisation (MERT "
        f"{result['size']}, random init)",
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores, **{m['cpu_class']}**; onnxruntime "
            f"{m['onnxruntime']}; load average before/after {m['load_before']} / "
            f"{m['load_after']}. Command: `{result['command']}`. Every variant is the export's "
            "CPU recipe (static QDQ, uint8 activations, per-tensor 7-bit weights, MinMax on "
            f"{result['calibration_windows']} windows) with the one change its name says; gated "
            "against the fp32 ONNX model; times best of "
            f"{result['rounds']} interleaved rounds."
        ),
        "",
        (
            f"Where fp32 spends its kernel time (profiler, batch {result['profile_batch']}): "
            f"feature-extractor convs {c['conv_share']:.0%}, matmuls {c['matmul_share']:.0%}, "
            f"the rest {c['other_share']:.0%}. GEMM rates through ONNX Runtime: fp32 "
            f"{g['fp32_gflops']:.0f} GFLOP/s, u8 x s8 {g['int8_gops']:.0f} GOP/s, ratio "
            f"{c['gemm_ratio']:.2f}. Amdahl estimate (only the matmuls speed up, by the GEMM "
            f"ratio): INT8/fp32 about **{c['convs_fp32']:.2f}** with the convs fp32, about "
            f"{c['convs_int8']:.2f} with them quantised too (shares of one profiled run at "
            "this batch; a timed ratio can beat it where fp32's own matmuls run below the "
            "GEMM rate, as at batch 1)."
        ),
        "",
        "Feature-extractor share of fp32 FLOPs (per 5 s window): "
        + ", ".join(f"{k} {v:.1%}" for k, v in result["conv_flop_share"].items())
        + ".",
        "",
        head,
        "|---|" + "---|" * (len(batches) + len(sets) + 1),
    ]
    fp32 = result["seconds"][FP32]
    for label, per_batch in result["seconds"].items():
        if label == FP32:
            continue
        cells = [f"{fp32[str(b)] / per_batch[str(b)]:.2f}" for b in batches]
        gate = result["gates"][label]
        for name in sets:
            g = gate[name]
            cells.append(f"{g['cosine_min']:.3f}, {g['below_0.99']}, {g['nn_agreement']:.1%}")
        ok = all(gate[name]["passes"] for name in sets)
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {'pass' if ok else 'fails'} |")
    rows += [
        "",
        "fp32 itself: "
        + ", ".join(f"batch {b} {5.0 * b / fp32[str(b)]:.2f}x realtime" for b in batches)
        + ".",
        "",
    ]
    return "\n".join(rows)


def ceilings(fp32_profile: dict[str, float], gemm_ratio: float) -> dict[str, float]:
    """Amdahl bounds on INT8/fp32 from where fp32 spends its time and the GEMM rate ratio.

    Shares of fp32 kernel time: the feature extractor's convs (conv0..conv6),
    matmuls, everything else (normalisations, softmax, GELU, the positional
    conv). Only what runs in INT8 can speed up, at best by ``gemm_ratio``.
    """
    kernels = {k: v for k, v in fp32_profile.items() if k != "(whole run)"}
    total = sum(kernels.values())
    convs = sum(v for k, v in kernels.items() if k.startswith("conv")) / total
    matmuls = sum(v for k, v in kernels.items() if "matmul" in k) / total
    other = 1.0 - convs - matmuls
    return {
        "conv_share": round(convs, 4),
        "matmul_share": round(matmuls, 4),
        "other_share": round(other, 4),
        "gemm_ratio": round(gemm_ratio, 3),
        "convs_fp32": round(1.0 / (convs + other + matmuls / gemm_ratio), 3),
        "convs_int8": round(1.0 / (other + (matmuls + convs) / gemm_ratio), 3),
    }


def conv_flop_share(fp32: Path) -> dict[str, float]:
    """Each feature-extractor conv's share of the graph's MatMul + Conv multiply-adds."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(fp32)))
    init = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(model.graph.value_info) + list(model.graph.output)
    }
    from export.quantize import feature_extractor_convs

    convs = feature_extractor_convs(model)
    macs: dict[str, float] = {}
    total = 0.0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if not out or any(d <= 0 for d in out[1:]):
            continue
        if node.op_type == "Conv" and node.input[1] in init:
            weight = init[node.input[1]]
            cost = float(np.prod(out[1:])) * float(np.prod(weight[1:]))
        elif node.op_type == "MatMul" and node.input[1] in init:
            cost = float(np.prod(out[1:])) * init[node.input[1]][0]
        elif node.op_type == "MatMul":
            left = shapes.get(node.input[0])
            if not left or any(d <= 0 for d in left[1:]):
                continue
            cost = float(np.prod(out[1:])) * left[-1]
        else:
            continue
        total += cost
        if node.name in convs:
            macs[f"conv{convs.index(node.name)}"] = cost
    return {name: cost / total for name, cost in macs.items()} if total else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("95m", "tiny"), default="95m")
    parser.add_argument("--music", type=Path, help="folder of real music (second gate set)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--gate-windows", type=int, default=32, help="windows per gate set")
    parser.add_argument("--only", nargs="*", help="variant labels to build (default: all)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from export.to_onnx import configure_logging

    configure_logging(quiet=False)
    import onnxruntime

    from export import mert, quantize, runner, synth, validate

    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()[0]
    gemm = gemm_rates()
    log.info("GEMM through ONNX Runtime: %s", gemm)
    gate_sets = {
        "synthetic": runner.model_input(
            synth.windows(args.gate_windows, WINDOW, 24_000, runner.VALIDATION_SEED),
            "int16",
            runner.VALIDATION_SEED,
        )
    }
    calibration = {
        "synthetic": synth.to_int16(
            synth.windows(args.calibration_windows, WINDOW, 24_000, seed=99), seed=99
        )
    }
    if args.music:
        music = music_windows(args.music, args.gate_windows + args.calibration_windows)
        gate_sets["real music"] = music[: args.gate_windows]
        calibration["real music"] = music[args.gate_windows :]
    chosen = variants(quantize.STATIC_CPU, args.music is not None)
    if args.only:
        unknown = set(args.only) - {v.label for v in chosen}
        if unknown:
            parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
        chosen = [v for v in chosen if v.label in args.only or v.label == RECIPE]
    audio = synth.to_int16(synth.windows(max(batches), WINDOW, 24_000, seed=1), seed=1)
    with tempfile.TemporaryDirectory(prefix="int8-layers-") as work_dir:
        work = Path(work_dir)
        loaded = mert.random_model(args.size, seed=0)
        layers = tuple(range(loaded.num_layers + 1))
        fp32 = runner.build_fp32(loaded, layers, "int16", WINDOW, work / "fp32.onnx")
        shares = conv_flop_share(fp32)
        profile_batch = 4 if 4 in batches else batches[0]
        fp32_profile = profile(fp32, audio[:profile_batch], work, "fp32", conv_labels(fp32))
        paths: dict[str, tuple[Path, str]] = {}
        # Calibrate the widest variant first: its cache holds every tensor the others need.
        order = sorted(chosen, key=lambda v: -len(v.recipe.feature_convs))
        for index, variant in enumerate(order):
            started = time.perf_counter()
            method = "minmax" if variant.recipe.percentile is None else "percentile"
            cache = (
                work
                / f"calibration-{variant.calibration}-{method}-{variant.recipe.percentile}.json"
            )
            path = quantize.to_int8_static(
                fp32,
                work / f"{index}.onnx",
                calibration[variant.calibration],
                variant.recipe,
                calibration_cache=cache,
            )
            paths[variant.label] = (path, variant.optimisation)
            log.info("%s: built in %.0f s", variant.label, time.perf_counter() - started)
        # Timed before the gates: after gating 128 windows per set, the recipe timed at
        # 0.84-0.96x fp32 where a run timed first gave 1.46-1.48x (2-core AMX Xeon VM).
        sessions = {FP32: session(fp32)}
        for variant in chosen:
            path, level = paths[variant.label]
            sessions[variant.label] = session(path, optimisation=level)
        runners = {
            name: (lambda x, s=sess: s.run(None, {"AUDIO": x})) for name, sess in sessions.items()
        }
        cells = time_interleaved(runners, audio, batches, args.rounds)
        references = {
            name: validate.run(sessions[FP32], windows) for name, windows in gate_sets.items()
        }
        gate_results: dict[str, dict] = {}
        for variant in chosen:
            gate_results[variant.label] = {
                name: judged(validate.run(sessions[variant.label], windows), references[name])
                for name, windows in gate_sets.items()
            }
            log.info("%s: gates %s", variant.label, gate_results[variant.label])
    result = {
        "size": args.size,
        "command": "python benchmarks/int8_layers.py " + " ".join(argv or sys.argv[1:]),
        "batches": batches,
        "rounds": args.rounds,
        "calibration_windows": args.calibration_windows,
        "gate_sets": list(gate_sets),
        "conv_flop_share": shares,
        "gemm": gemm,
        "profile_batch": profile_batch,
        "fp32_profile_ms": fp32_profile,
        "ceilings": ceilings(fp32_profile, gemm["int8_gops"] / gemm["fp32_gflops"]),
        "seconds": {
            name: {str(c["batch"]): c["best_s"] for c in per} for name, per in cells.items()
        },
        "gates": gate_results,
        "machine": {
            "cpu": _cpu_name(),
            "cpu_class": validate.cpu_class(),
            "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__,
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stem = "int8_layers" if args.size == "95m" else f"int8_layers_{args.size}"
    write_readable(args.output / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    write_readable(args.output / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
