"""Shared parts of the client benchmarks: a test corpus, a trivial served model, CPU clocks.

Not a test helper: benchmarks measure, tests assert. Run the benchmarks from
the repository root (``python benchmarks/bench_client.py``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from mert_indexer.contract import (
    CONTRACT_PARAMS,
    CONTRACT_VERSION,
    INPUT_NAME,
    NUMPY_TO_TRITON,
    OUTPUT_NAME,
    P_CONTRACT_VERSION,
    P_EMBEDDING_DIM,
    P_LAYERS,
    P_MODEL_ID,
    P_POOLING,
    P_PRECISION,
    P_SAMPLE_RATE,
    P_WEIGHTS_SHA256,
    P_WINDOW_SAMPLES,
    dump_config,
)

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
SR = 24_000
WINDOW = 5 * SR


def write_trivial_repo(
    root: Path,
    *,
    input_dtype: str = "int16",
    dim: int = 32,
    max_batch: int = 64,
    instances: int = 1,
) -> Path:
    """A model repository whose ``mert`` only averages slices of the window.

    It carries the real contract parameters, so the real client accepts it;
    the server does almost no work, so what is measured is the client.
    """
    import onnx
    from onnx import TensorProto, helper
    from tritonclient.grpc import model_config_pb2 as mc

    if WINDOW % dim:
        raise ValueError(f"dim {dim} must divide the window ({WINDOW})")
    onnx_in = TensorProto.INT16 if input_dtype == "int16" else TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("ReduceMean", ["r", "axes"], [OUTPUT_NAME], keepdims=0),
        ],
        "trivial",
        [helper.make_tensor_value_info(INPUT_NAME, onnx_in, ["batch", WINDOW])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", dim])],
        [
            helper.make_tensor("shape", TensorProto.INT64, [3], [-1, dim, WINDOW // dim]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_dir = root / "mert"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(model_dir / "1" / "model.onnx"))

    config = mc.ModelConfig(name="mert", platform="onnxruntime_onnx", max_batch_size=max_batch)
    config.input.add(
        name=INPUT_NAME, data_type=mc.DataType.Value(NUMPY_TO_TRITON[input_dtype]), dims=[WINDOW]
    )
    config.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[dim])
    config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    config.dynamic_batching.SetInParent()
    params = {
        P_CONTRACT_VERSION: CONTRACT_VERSION,
        P_MODEL_ID: f"trivial-mean-{dim}",
        P_WEIGHTS_SHA256: "0" * 64,
        P_LAYERS: "0",
        P_POOLING: "slice_mean",
        P_WINDOW_SAMPLES: str(WINDOW),
        P_SAMPLE_RATE: str(SR),
        P_EMBEDDING_DIM: str(dim),
        P_PRECISION: "fp32",
    }
    assert set(params) == set(CONTRACT_PARAMS)
    for key, value in params.items():
        config.parameters[key].string_value = value
    (model_dir / "config.pbtxt").write_text(dump_config(config))
    return root


def write_audio(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Like :func:`mert_indexer.client.synth.write`, but writes Ogg in chunks.

    libsndfile 1.2.2 crashes (SIGSEGV) encoding a few minutes of Vorbis in
    one ``sf.write`` call; chunked writes are fine.
    """
    from mert_indexer.client.synth import write

    if path.suffix.lower() != ".ogg":
        return write(path, audio, sample_rate)
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(
        str(path),
        "w",
        sample_rate,
        audio.shape[1] if audio.ndim == 2 else 1,
        format="OGG",
        subtype="VORBIS",
    ) as fh:
        for i in range(0, len(audio), sample_rate):
            fh.write(audio[i : i + sample_rate])
    return path


@dataclass(frozen=True)
class Corpus:
    files: list[Path]
    seconds: float

    @property
    def by_format(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            out[f.suffix] = out.get(f.suffix, 0) + 1
        return out


def write_corpus(
    folder: Path,
    total_seconds: float,
    *,
    seed: int = 0,
    suffixes: tuple[str, ...] = (".mp3", ".ogg", ".flac", ".m4a", ".wav"),
    lengths: tuple[float, float] = (60.0, 360.0),
    sample_rates: tuple[int, ...] = (44_100, 48_000),
) -> Corpus:
    """Real-world-like tracks (1-6 min, stereo, 44.1/48 kHz, mixed formats), ~``total_seconds``.

    Cached in ``folder`` by parameters: benchmarks rerun without regenerating.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "corpus.json"
    key = {
        "total": total_seconds,
        "seed": seed,
        "suffixes": suffixes,
        "lengths": lengths,
        "rates": sample_rates,
    }
    if stamp.exists():
        meta = json.loads(stamp.read_text())
        if meta["key"] == json.loads(json.dumps(key)):
            return Corpus([folder / n for n in meta["files"]], meta["seconds"])
    from mert_indexer.client.synth import music

    rng = np.random.default_rng(seed)
    files, total, i = [], 0.0, 0
    while total < total_seconds:
        # every format at least once, however small the total
        cap = max(lengths[0], min(total_seconds - total, total_seconds / len(suffixes)))
        length = float(min(rng.uniform(*lengths), cap))
        rate = int(sample_rates[i % len(sample_rates)])
        suffix = suffixes[i % len(suffixes)]
        # Synthesise a minute and vary it: generating hours note by note is slow.
        base = music(min(length, 60.0), seed=seed * 1000 + i, sample_rate=rate)
        reps = int(np.ceil(length * rate / len(base)))
        audio = np.concatenate(
            [base * np.float32(0.6 + 0.4 * ((k + i) % 3) / 2) for k in range(reps)]
        )[: int(length * rate)]
        files.append(write_audio(folder / f"track_{i:03d}{suffix}", audio, rate))
        total += length
        i += 1
    stamp.write_text(json.dumps({"key": key, "files": [f.name for f in files], "seconds": total}))
    return Corpus(files, total)


class CpuClock:
    """CPU seconds of this process (all threads) plus children reaped meanwhile."""

    def __enter__(self) -> CpuClock:
        self._t0 = os.times()
        self._w0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = os.times()
        self.wall = time.perf_counter() - self._w0
        self.cpu = (
            (t1.user - self._t0.user)
            + (t1.system - self._t0.system)
            + (t1.children_user - self._t0.children_user)
            + (t1.children_system - self._t0.children_system)
        )


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": cores,
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg()[0],
    }


def write_results(name: str, data: dict, table: list[str]) -> Path:
    """``benchmarks/results/<name>.json`` and ``.md`` (the table, for docs)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(table) + "\n")
    return md


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(repo: Path, **kw: object):
    """The bundled Triton serving ``repo`` on free ports (use as a context manager)."""
    from mert_indexer.server.launcher import LocalTriton, ServeOptions

    return LocalTriton(
        ServeOptions(
            model_repository=repo,
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            device="cpu",
            ready_timeout=600,
            **kw,
        )
    )


def server_cpu_seconds(server: object) -> float:
    """CPU seconds used so far by a LocalTriton and every process it started."""
    import psutil

    proc = getattr(server, "process", None)
    if proc is None:
        return 0.0
    try:
        root = psutil.Process(proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total
    except psutil.Error:
        return 0.0


@dataclass
class IndexRun:
    audio_seconds: float
    windows: int
    wall: float
    cpu: float  # client process and its PyAV decoder processes
    server_cpu: float
    ok: bool

    @property
    def realtime(self) -> float:
        return self.audio_seconds / self.wall

    @property
    def realtime_per_core(self) -> float:
        return self.audio_seconds / self.cpu


def index_once(
    pool: object,
    files: list[Path],
    index: Path,
    *,
    workers: int,
    batch: int,
    slots: int,
    shm: bool,
    pyav_processes: int | None = None,
    server: object = None,
) -> IndexRun:
    """One timed :class:`mert_indexer.client.pipeline.Pipeline` run into a fresh real store.

    Planning (which hashes every file) happens before the clock starts: it is
    the store's cost, paid once per file whatever the client does.
    """
    import shutil

    from mert_indexer.client.pipeline import Pipeline, PipelineOptions
    from mert_indexer.client.report import RunSummary
    from mert_indexer.client.transport import make_sender
    from mert_indexer.indexer.store import IndexStore

    shutil.rmtree(index, ignore_errors=True)
    contract = pool.contract  # type: ignore[attr-defined]
    hop = contract.window_samples
    summary = RunSummary()
    with IndexStore.open(index, contract.identity() | {"hop_samples": hop}, create=True) as store:
        plan = store.plan([str(f) for f in files])
        store.apply(plan)
        sender = make_sender(pool, slots=slots, batch_size=batch, shm=shm)  # type: ignore[arg-type]
        options = PipelineOptions(
            hop_samples=hop,
            decode_workers=workers,
            pyav_processes=workers if pyav_processes is None else pyav_processes,
            progress=False,
        )
        s0 = server_cpu_seconds(server)
        try:
            with CpuClock() as clock:
                Pipeline(contract, sender, store, options).run(plan.todo, summary)
        finally:
            sender.close()
        s1 = server_cpu_seconds(server)
    return IndexRun(
        summary.audio_seconds,
        summary.windows,
        clock.wall,
        clock.cpu + summary.decoder_process_cpu_seconds,
        s1 - s0,
        summary.ok,
    )


def bar_chart(
    out: Path,
    names: list[str],
    values: list[float],
    colors: list[str],
    title: str,
    *,
    height: float = 2.6,
) -> None:
    """A horizontal bar chart of x-realtime figures, written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, height))
    ax.barh(names, values, color=colors)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}x", va="center")
    ax.set_xlabel("x realtime")
    ax.set_title(title)
    ax.set_xlim(0, max(values) * 1.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


VECTOR_EXTENSIONS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")


def cpu_vector_extensions() -> list[str]:
    """Which of the vector extensions that decide ORT's GEMM speed the CPU has (/proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in VECTOR_EXTENSIONS if f in flags]
    except OSError:
        pass
    return []
