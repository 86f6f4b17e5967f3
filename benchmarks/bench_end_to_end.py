"""End to end with the 95M architecture: x realtime through the local Triton vs the model alone.

The model alone is ONNX Runtime running the exported graph in this process,
on the same cores, with the server's thread settings: what the machine can
do with no decoding, no transport and no server. The end-to-end figure is
the real client (decoding, windowing, batching, shared memory or gRPC) and
the bundled Triton serving the same file. Their ratio is the pipeline's
efficiency: 1.0 would mean decoding and transport cost nothing. Both are
measured in the same run, model-only before and after, to bracket the load
that other users put on a shared machine.

    python benchmarks/bench_end_to_end.py                      # exports once (minutes)
    python benchmarks/bench_end_to_end.py --repo /path/model_repository

Writes benchmarks/results/client_end_to_end.{json,md} and docs/client_end_to_end.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DOCS,
    ROOT,
    WINDOW,
    bar_chart,
    index_once,
    machine,
    serve,
    write_corpus,
    write_results,
)

from mert_indexer.client.triton_io import ConnectOptions, TritonPool
from mert_indexer.client.tuning import choose, usable_cores

MODEL_CACHE = Path(tempfile.gettempdir()) / "mert-bench-models"


def exported(precision: str, repo: Path | None) -> Path:
    """A model repository with the random-init 95M model, exported once and cached."""
    if repo is not None:
        return repo
    out = MODEL_CACHE / f"95m-{precision}"
    if not (out / "mert" / "1" / "model.onnx").is_file():
        cmd = [
            sys.executable,
            str(ROOT / "export" / "to_onnx.py"),
            "--random-init",
            "--size",
            "95m",
            "--precision",
            precision,
            "--output",
            str(out),
        ]
        if precision != "fp32":
            cmd += ["--validation-windows", "32"]  # the default 256 takes ~10 min on 2 cores
        print("exporting:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def model_only(onnx_path: Path, threads: int, batch: int, windows: int) -> float:
    """x realtime of ONNX Runtime alone on ``windows`` random int16 windows."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    dtype = np.int16 if "int16" in session.get_inputs()[0].type else np.float32
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((batch, WINDOW)) * 3000).astype(dtype)
    session.run(None, {name: x[:1]})  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < windows:
        session.run(None, {name: x})
        done += batch
    return done * WINDOW / 24_000 / (time.perf_counter() - t0)


def end_to_end(repo: Path, files: list[Path], work: Path) -> dict:
    with serve(repo) as server:
        pool = TritonPool(ConnectOptions(servers=(server.grpc_url,)))
        contract = pool.connect()
        try:
            assert pool.served is not None
            sizing = choose(pool.served, contract.window_samples * 2)
            run = index_once(
                pool,
                files,
                work / "idx",
                workers=sizing.decode_workers,
                batch=sizing.batch_size,
                slots=sizing.in_flight,
                shm=pool.all_local,
                server=server,
            )
        finally:
            pool.close()
    assert run.ok
    return {
        "x_realtime": run.realtime,
        "audio_s": run.audio_seconds,
        "wall_s": run.wall,
        "client_cpu_s": run.cpu,
        "server_cpu_s": run.server_cpu,
        "sizing": sizing.__dict__,
        "windows": run.windows,
    }


def plot(rows: dict, out: Path) -> None:
    bar_chart(
        out,
        ["model only (before)", "end to end", "model only (after)"],
        [rows["model_only_before"], rows["end_to_end"]["x_realtime"], rows["model_only_after"]],
        ["#999", "#2a7", "#999"],
        f"MERT-95M ({rows['precision']}), {rows['machine']['cores']} CPU cores: "
        f"ratio {rows['ratio']:.2f}",
        height=3.2,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, help="an exported model repository (default: export)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    p.add_argument("--minutes", type=float, default=4.0, help="audio through the pipeline")
    p.add_argument("--model-windows", type=int, default=48, help="windows for model-only")
    p.add_argument("--corpus", type=Path, help="corpus folder (default: a cache in /tmp)")
    args = p.parse_args(argv)
    repo = exported(args.precision, args.repo)
    onnx_path = repo / "mert" / "1" / "model.onnx"
    corpus = write_corpus(
        args.corpus or Path(tempfile.gettempdir()) / "mert-bench-e2e",
        args.minutes * 60,
        seed=5,
        lengths=(60.0, 90.0),
    )
    cores = usable_cores()
    info = machine()
    print(
        f"corpus: {len(corpus.files)} files, {corpus.seconds / 60:.1f} min {corpus.by_format}",
        flush=True,
    )
    # The served model runs 16-window requests merged by the batcher; the model
    # alone gets the same batch and the server's thread count (all cores, one instance).
    before = model_only(onnx_path, cores, 16, args.model_windows)
    print(f"model only: {before:.2f}x realtime", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        e2e = end_to_end(repo, corpus.files, Path(tmp))
    print(f"end to end: {e2e['x_realtime']:.2f}x realtime", flush=True)
    after = model_only(onnx_path, cores, 16, args.model_windows)
    print(f"model only: {after:.2f}x realtime", flush=True)
    reference = (before + after) / 2
    rows = {
        "machine": info,
        "precision": args.precision,
        "repo": str(repo),
        "corpus": {
            "files": len(corpus.files),
            "seconds": corpus.seconds,
            "formats": corpus.by_format,
        },
        "model_only_before": before,
        "model_only_after": after,
        "end_to_end": e2e,
        "ratio": e2e["x_realtime"] / reference,
        "load_avg_at_end": os.getloadavg()[0],
    }
    table = [
        f"# End to end, MERT-95M random init ({args.precision}), {info['cpu']}, {cores} "
        f"cores (load average {info['load_avg_at_start']:.1f} at start)",
        "",
        "| measurement | x realtime |",
        "|---|---|",
        f"| ONNX Runtime alone, before | {before:.2f} |",
        f"| end to end: client + local Triton ({corpus.seconds / 60:.1f} min, "
        f"{len(corpus.files)} files) | {e2e['x_realtime']:.2f} |",
        f"| ONNX Runtime alone, after | {after:.2f} |",
        f"| **ratio end to end / model alone** | **{rows['ratio']:.2f}** |",
        "",
        f"Client sizing (automatic): {e2e['sizing']}; client CPU {e2e['client_cpu_s']:.1f} s, "
        f"server CPU {e2e['server_cpu_s']:.1f} s for {e2e['audio_s']:.0f} s of audio.",
    ]
    md = write_results("client_end_to_end", rows, table)
    plot(rows, DOCS / "client_end_to_end.png")
    print("\n".join(table))
    print(f"wrote {md} and {DOCS / 'client_end_to_end.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
