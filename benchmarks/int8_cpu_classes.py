#!/usr/bin/env python
"""Do the INT8 recipes give the same embeddings on every x86 CPU class? (tiny model, emulation)

ONNX Runtime's u8 x s8 kernels saturate on AVX2 / AVX-512 without VNNI for
full-range int8 weights (docs/export.md, "INT8 on every x86 CPU class"). This
makes the tiny model's INT8 variants natively, then embeds the same windows
natively and under an emulated AVX2-only CPU, and compares:

    python benchmarks/int8_cpu_classes.py make DIR               # natively: models, windows
    python benchmarks/int8_cpu_classes.py embed DIR native
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/int8_cpu_classes.py embed DIR haswell
    python benchmarks/int8_cpu_classes.py compare DIR native haswell

``qemu-x86_64`` is Debian's ``qemu-user`` (7.2 emulates AVX2; CPUID then shows
no AVX-512 and no VNNI, and ONNX Runtime dispatches on CPUID). ~1 minute per
model under emulation on 2 cores. Before/after for each recipe: the old
full-range weights (or fused kernels, for the TensorRT recipe) against the
export's current choice.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WINDOWS = 16


def make(folder: Path) -> None:
    from export import mert, quantize, runner, synth

    folder.mkdir(parents=True, exist_ok=True)
    loaded = mert.random_model("tiny", 0)
    samples = 120_000
    fp32 = runner.build_fp32(loaded, (0, 1, 2), "int16", samples, folder / "fp32.onnx")
    audio = runner.model_input(
        synth.windows(WINDOWS, samples, 24_000, runner.VALIDATION_SEED),
        "int16",
        runner.VALIDATION_SEED,
    )
    np.save(folder / "audio.npy", audio)
    calibration = runner.model_input(
        synth.windows(32, samples, 24_000, runner.VALIDATION_SEED + 7919),
        "int16",
        runner.VALIDATION_SEED + 1,
    )
    cases = {}
    for label, recipe in (
        (
            "cpu static, 8-bit weights (before)",
            dataclasses.replace(quantize.STATIC_CPU, reduce_range=False),
        ),
        ("cpu static, 7-bit weights (now)", quantize.STATIC_CPU),
        ("tensorrt recipe", quantize.STATIC_GPU),
    ):
        path = folder / f"{len(cases)}.onnx"
        quantize.to_int8_static(fp32, path, calibration, recipe)
        if recipe.simulate_on_cpu:
            cases[f"{label}, fused kernels (before)"] = (path.name, False)
            cases[f"{label}, QDQ simulated (now)"] = (path.name, True)
        else:
            cases[label] = (path.name, False)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for label, reduce_range in (("before", False), ("now", True)):
        path = folder / f"dynamic-{label}.onnx"
        quantize_dynamic(
            str(fp32),
            str(path),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            reduce_range=reduce_range,
            extra_options={"MatMulConstBOnly": True},
        )
        bits = 7 if reduce_range else 8
        cases[f"dynamic, {bits}-bit weights ({label})"] = (path.name, False)
    (folder / "cases.json").write_text(json.dumps(cases, indent=1))


def embed(folder: Path, label: str) -> None:
    from export import validate

    audio = np.load(folder / "audio.npy")
    cases = json.loads((folder / "cases.json").read_text())
    out = {}
    for name, (file, simulate) in cases.items():
        out[name] = validate.run(validate.session(folder / file, simulate_qdq=simulate), audio)
        print(label, name, flush=True)
    np.savez(folder / f"embeddings-{label}.npz", **out)


def compare(folder: Path, a: str, b: str) -> None:
    from export import validate

    with np.load(folder / f"embeddings-{a}.npz") as x, np.load(folder / f"embeddings-{b}.npz") as y:
        print(f"| model | {b} vs {a}: max rel L2 | min cosine | bitwise equal |")
        print("|---|---|---|---|")
        for name in x.files:
            rel = validate.rel_l2(y[name], x[name]).max()
            cos = validate.cosines(y[name], x[name]).min()
            print(f"| {name} | {rel:.1e} | {cos:.5f} | {np.array_equal(x[name], y[name])} |")


if __name__ == "__main__":
    command, where = sys.argv[1], Path(sys.argv[2])
    if command == "make":
        make(where)
    elif command == "embed":
        embed(where, sys.argv[3])
    else:
        compare(where, sys.argv[3], sys.argv[4])
