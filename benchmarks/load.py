"""Load a served model and report what the server did: windows/s, latency, windows per execution.

Two load generators, the same report:

- ``perf_analyzer``, NVIDIA's C++ load generator, which ships inside the
  ``tritonclient==2.51.0`` wheel (``<venv>/bin/perf_analyzer``; it needs two
  libraries that only the nvidia-pytriton wheel carries, linked in here);
- our own Python threads (tritonclient gRPC, and system shared memory
  through ``mert_indexer.client.shm``, the client's own transport), used where
  perf_analyzer cannot run.

The average batch per execution always comes from the server's own
statistics (``get_inference_statistics``: inferences / executions), never from
the client's guess. ``sweep`` serves each variant with :class:`LocalTriton`
and writes ``benchmarks/results/serving.{json,md}`` atomically.

    python benchmarks/load.py run --server 127.0.0.1:8001 --shm --concurrency 16
    python benchmarks/load.py sweep            # the CPU table (about 7 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from mert_indexer.atomic import atomic_write_text
from mert_indexer.contract import ModelContract, config_from_json, dump_config, load_config
from mert_indexer.errors import ConfigError, IndexerError, ServerStartError

RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Load:
    """One load: how many requests in flight, windows per request, transport, for how long."""

    concurrency: int = 16
    batch: int = 1
    shm: bool = False
    seconds: float = 8.0
    warmup: float = 2.0
    driver: str = "perf_analyzer"  # or "python"


@dataclass
class Result:
    """What one load achieved, measured by the client and by the server's statistics."""

    load: dict
    windows_per_s: float
    requests: int
    latency_ms_p50: float
    latency_ms_p99: float
    server_inferences: int
    server_executions: int
    server_queue_ms: float  # mean time a request waited in the batcher's queue
    server_compute_ms: float  # mean compute time per execution
    notes: list[str] = field(default_factory=list)

    @property
    def avg_batch(self) -> float:
        return self.server_inferences / self.server_executions if self.server_executions else 0.0

    def row(self) -> dict:
        return {**asdict(self), "avg_batch": round(self.avg_batch, 2)}


# ---------------------------------------------------------------- server statistics


@dataclass(frozen=True)
class Stats:
    inferences: int
    executions: int
    queue_ns: int
    queue_count: int
    compute_ns: int

    @classmethod
    def read(cls, url: str, model: str) -> Stats:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(url) as c:
            s = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
        inf = s.get("inference_stats", {})
        # inference_stats count per request; batch_stats count per execution.
        compute_ns = sum(
            int(b.get("compute_infer", {}).get("ns", 0)) for b in s.get("batch_stats", [])
        )
        return cls(
            int(s.get("inference_count", 0)),
            int(s.get("execution_count", 0)),
            int(inf.get("queue", {}).get("ns", 0)),
            int(inf.get("queue", {}).get("count", 0)),
            compute_ns,
        )

    def __sub__(self, other: Stats) -> Stats:
        return Stats(
            self.inferences - other.inferences,
            self.executions - other.executions,
            self.queue_ns - other.queue_ns,
            self.queue_count - other.queue_count,
            self.compute_ns - other.compute_ns,
        )


def contract_of(url: str, model: str) -> ModelContract:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as c:
        return ModelContract.from_config(
            config_from_json(c.get_model_config(model, as_json=True)["config"])
        )


# ---------------------------------------------------------------- perf_analyzer


def perf_analyzer_binary() -> Path | None:
    found = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    return Path(found) if Path(found).is_file() else None


@contextmanager
def perf_analyzer_libs() -> Iterator[str]:
    """A folder with the sonames perf_analyzer links (libb64, libcudart), from the Triton bundle."""
    from mert_indexer.server.bundle import find_bundle

    libs = find_bundle().libs
    with tempfile.TemporaryDirectory(prefix="pa-libs-") as tmp:
        for pattern, soname in (
            ("libb64*.so*", "libb64.so.0d"),
            ("libcudart*.so.12*", "libcudart.so.12"),
        ):
            match = sorted(libs.glob(pattern))
            if match:
                os.symlink(match[0], Path(tmp) / soname)
        yield tmp


def run_perf_analyzer(url: str, model: str, load: Load, contract: ModelContract) -> Result:
    binary = perf_analyzer_binary()
    if binary is None:
        raise ConfigError("perf_analyzer not found (it ships in the tritonclient==2.51.0 wheel)")
    before = Stats.read(url, model)
    out_bytes = load.batch * contract.embedding_dim * 4
    with perf_analyzer_libs() as libdir, tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "pa.csv"
        interval_ms = int(load.seconds * 1000 / 3)
        cmd = [
            str(binary),
            "-m",
            model,
            "-u",
            url,
            "-i",
            "grpc",
            "-b",
            str(load.batch),
            f"--concurrency-range={load.concurrency}:{load.concurrency}",
            # Shared CPUs never give perf_analyzer's default 10 % stability: accept
            # three windows whatever their spread, and say so in the results.
            "--input-data=random",
            "-p",
            str(interval_ms),
            "-s",
            "1000",
            "-r",
            "3",
            "--shared-memory=system" if load.shm else "--shared-memory=none",
            "-f",
            str(csv_path),
        ]
        if load.shm:
            cmd.append(f"--output-shared-memory-size={out_bytes}")
        env = {
            **os.environ,
            "LD_LIBRARY_PATH": os.pathsep.join(
                p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p
            ),
        }
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, env=env, timeout=load.seconds * 6 + 60
        )
        if proc.returncode != 0 or not csv_path.exists():
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
            raise IndexerError(f"perf_analyzer failed (exit {proc.returncode}): {tail}")
        rows = list(csv.DictReader(csv_path.open()))
    after = Stats.read(url, model)
    row = rows[-1]
    notes = ["perf_analyzer: mean of 3 windows, stability not enforced"]
    return _result(
        load,
        after - before,
        float(row["Inferences/Second"]),
        requests=0,
        p50_ms=float(row["p50 latency"]) / 1000,
        p99_ms=float(row["p99 latency"]) / 1000,
        notes=notes,
    )


# ---------------------------------------------------------------- our own load


def run_python(url: str, model: str, load: Load, contract: ModelContract) -> Result:
    """``load.concurrency`` threads, each with its own gRPC channel, one request in flight each."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    shape = (load.batch, contract.window_samples)
    data = [rng.integers(-20000, 20000, shape).astype(contract.input_dtype) for _ in range(4)]
    stop, measuring = threading.Event(), threading.Event()
    latencies: list[list[float]] = [[] for _ in range(load.concurrency)]
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        regions, names = [], []
        try:
            inp = grpcclient.InferInput(contract.input_name, list(shape), contract.wire_dtype)
            out = grpcclient.InferRequestedOutput(contract.output_name)
            if load.shm:
                from mert_indexer.client import shm

                regions = [
                    shm.create_regions(1, shape, contract.input_dtype)[0],
                    shm.create_regions(1, (load.batch, contract.embedding_dim), "float32")[0],
                ]
                for r in regions:
                    client.register_system_shared_memory(r.name, r.key, r.byte_size)
                    names.append(r.name)
                inp.set_shared_memory(regions[0].name, regions[0].byte_size)
                out.set_shared_memory(regions[1].name, regions[1].byte_size)
            i = slot
            while not stop.is_set():
                batch = data[i % len(data)]
                i += 1
                if load.shm:
                    regions[0].array[...] = batch  # the client writes its windows here anyway
                else:
                    inp.set_data_from_numpy(batch)
                t0 = time.perf_counter()
                client.infer(model, [inp], outputs=[out])
                if measuring.is_set():
                    latencies[slot].append(time.perf_counter() - t0)
        except BaseException as exc:
            errors.append(exc)
            stop.set()
        finally:
            for name in names:
                client.unregister_system_shared_memory(name)
            for r in regions:
                r.close()
            client.close()

    threads = [
        threading.Thread(target=worker, args=(i,), daemon=True) for i in range(load.concurrency)
    ]
    for t in threads:
        t.start()
    time.sleep(load.warmup)
    before = Stats.read(url, model)
    measuring.set()
    t0 = time.perf_counter()
    time.sleep(load.seconds)
    measuring.clear()
    elapsed = time.perf_counter() - t0
    after = Stats.read(url, model)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise IndexerError(f"load failed: {errors[0]}")
    lat = np.array([x for per in latencies for x in per]) * 1000
    if not len(lat):
        raise IndexerError("no request completed during the measurement")
    return _result(
        load,
        after - before,
        len(lat) * load.batch / elapsed,
        requests=len(lat),
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
    )


def _result(
    load: Load,
    d: Stats,
    windows_per_s: float,
    *,
    requests: int,
    p50_ms: float,
    p99_ms: float,
    notes: list[str] | None = None,
) -> Result:
    return Result(
        load=asdict(load),
        windows_per_s=round(windows_per_s, 1),
        requests=requests,
        latency_ms_p50=round(p50_ms, 2),
        latency_ms_p99=round(p99_ms, 2),
        server_inferences=d.inferences,
        server_executions=d.executions,
        server_queue_ms=round(d.queue_ns / max(d.queue_count, 1) / 1e6, 3),
        server_compute_ms=round(d.compute_ns / max(d.executions, 1) / 1e6, 2),
        notes=notes or [],
    )


def measure(url: str, model: str, load: Load) -> Result:
    contract = contract_of(url, model)
    if load.driver == "perf_analyzer":
        return run_perf_analyzer(url, model, load, contract)
    return run_python(url, model, load, contract)


# ---------------------------------------------------------------- serving variants


def variant_repo(
    source: Path,
    dest: Path,
    *,
    instances: int | None = None,
    queue_delay_us: int | None = None,
    max_batch_size: int | None = None,
) -> Path:
    """A copy of ``source`` (config edited, model files linked) with other serving settings."""
    for model_dir in sorted(p.parent for p in source.glob("*/config.pbtxt")):
        config = load_config(model_dir / "config.pbtxt")
        if instances is not None:
            del config.instance_group[:]
            config.instance_group.add(count=instances)
        if queue_delay_us is not None:
            config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
        if max_batch_size is not None:
            config.max_batch_size = max_batch_size
        out = dest / model_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for version in model_dir.iterdir():
            if version.is_dir():
                os.symlink(version.resolve(), out / version.name)
        atomic_write_text(out / "config.pbtxt", dump_config(config))
    return dest


@contextmanager
def serving(repo: Path, **variant: int) -> Iterator[str]:
    """Serve a variant of ``repo`` on free ports; yields the gRPC URL."""
    import socket

    from mert_indexer.server.launcher import LocalTriton, ServeOptions

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        repo = variant_repo(repo, Path(tmp) / "repo", **variant)
        for attempt in range(3):
            server = LocalTriton(
                ServeOptions(
                    model_repository=repo,
                    grpc_port=port(),
                    http_port=port(),
                    metrics_port=port(),
                    device="cpu",
                    ready_timeout=300,
                )
            )
            try:
                server.start()
                break
            except ServerStartError as exc:  # a free port taken meanwhile: new ports
                if "was taken" not in str(exc) or attempt == 2:
                    raise
        try:
            yield server.grpc_url
        finally:
            server.stop()


# ---------------------------------------------------------------- the CPU sweep


def sweep(args: argparse.Namespace) -> int:
    """Three comparisons, each point measured ``--rounds`` times, interleaved, median reported.

    The CPUs are shared with other work, so variants being compared run side by
    side (one server each, idle unless loaded) and take turns, round by round:
    a burst of outside load hits every variant alike instead of one.
    """
    from common import machine, write_trivial_repo

    driver = "perf_analyzer" if perf_analyzer_binary() and not args.python_driver else "python"
    base = Load(concurrency=16, batch=1, seconds=args.seconds, warmup=1.0, driver=driver)
    started = time.monotonic()
    raw: list[dict] = []

    def compare(section: str, model: str, points: list[tuple[str, str, Load, dict]]) -> None:
        """``points``: (label, url, load, extra); measured in turn, ``args.rounds`` times."""
        for round_ in range(args.rounds):
            for label, url, load, extra in points:
                res = measure(url, "mert", load)
                raw.append(
                    {
                        "section": section,
                        "model": model,
                        "label": label,
                        "round": round_,
                        **extra,
                        **res.row(),
                    }
                )
                print(
                    f"{section:9s} {label:24s} r{round_} {res.windows_per_s:8.1f} windows/s  "
                    f"avg batch {res.avg_batch:5.2f}  p50 {res.latency_ms_p50:7.1f} ms",
                    flush=True,
                )

    with tempfile.TemporaryDirectory(prefix="serving-sweep-") as tmp:
        null_repo = write_trivial_repo(Path(tmp) / "null")
        tiny_repo = args.tiny_repo or export_tiny(Path(tmp) / "tiny")
        # 1. Transport: a model that does almost nothing, so the wire is what is measured.
        with serving(null_repo, instances=1, queue_delay_us=args.delay) as url:
            compare(
                "transport",
                "null",
                [
                    (
                        f"{'shm' if shm else 'gRPC'} b={b} c=16",
                        url,
                        replace(base, shm=shm, batch=b),
                        {
                            "instances": 1,
                            "delay_us": args.delay,
                            "transport": "shm" if shm else "grpc",
                        },
                    )
                    for b in (1, 8)
                    for shm in (False, True)
                ],
            )
        # 2. Instances x transport on the tiny MERT (model-bound on this CPU).
        with (
            serving(tiny_repo, instances=1, queue_delay_us=args.delay) as one,
            serving(tiny_repo, instances=2, queue_delay_us=args.delay) as two,
        ):
            compare(
                "instances",
                "tiny",
                [
                    (
                        f"{n} inst {'shm' if shm else 'gRPC'} c=16",
                        url,
                        replace(base, shm=shm),
                        {
                            "instances": n,
                            "delay_us": args.delay,
                            "transport": "shm" if shm else "grpc",
                        },
                    )
                    for shm in (False, True)
                    for n, url in ((1, one), (2, two))
                ],
            )
        # 3. The batcher's queue delay, under full load (16 clients) and light load (2).
        with contextlib.ExitStack() as stack:
            urls = {
                d: stack.enter_context(serving(tiny_repo, instances=1, queue_delay_us=d))
                for d in args.delays
            }
            compare(
                "delay",
                "tiny",
                [
                    (
                        f"delay {d} us c={c}",
                        urls[d],
                        replace(base, concurrency=c, shm=True),
                        {"instances": 1, "delay_us": d, "transport": "shm"},
                    )
                    for c in (16, 2)
                    for d in args.delays
                ],
            )

    payload = {
        "machine": machine(),
        "driver": driver,
        "seconds_per_point": args.seconds,
        "rounds": args.rounds,
        "wall_seconds": round(time.monotonic() - started),
        "summary": summarise(raw),
        "raw": raw,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "serving.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(RESULTS / "serving.md", markdown(payload))
    print(f"wrote {RESULTS / 'serving.json'} and serving.md in {payload['wall_seconds']} s")
    return 0


def summarise(raw: list[dict]) -> list[dict]:
    """One row per (section, label): medians over the rounds, and the spread of windows/s."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in raw:
        groups.setdefault((r["section"], r["label"]), []).append(r)
    rows = []
    for (section, label), rs in groups.items():
        wps = [r["windows_per_s"] for r in rs]
        rows.append(
            {
                "section": section,
                "label": label,
                "model": rs[0]["model"],
                "instances": rs[0]["instances"],
                "delay_us": rs[0]["delay_us"],
                "transport": rs[0]["transport"],
                "concurrency": rs[0]["load"]["concurrency"],
                "batch": rs[0]["load"]["batch"],
                "windows_per_s": round(float(np.median(wps)), 1),
                "windows_per_s_min": min(wps),
                "windows_per_s_max": max(wps),
                "avg_batch": round(float(np.median([r["avg_batch"] for r in rs])), 2),
                "latency_ms_p50": round(float(np.median([r["latency_ms_p50"] for r in rs])), 1),
                "latency_ms_p99": round(float(np.median([r["latency_ms_p99"] for r in rs])), 1),
                "server_queue_ms": round(float(np.median([r["server_queue_ms"] for r in rs])), 2),
            }
        )
    return rows


def export_tiny(dest: Path) -> Path:
    cmd = [
        sys.executable,
        str(ROOT / "export" / "to_onnx.py"),
        "--random-init",
        "--size",
        "tiny",
        "--output",
        str(dest),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise IndexerError(
            f"tiny export failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
        )
    return dest


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        (
            f"# Serving on this CPU ({m.get('cpu')}, {m.get('cores')} cores shared with other "
            f"work; load average {m.get('load_avg_at_start', 0):.1f} at the start)"
        ),
        "",
        (
            f"Load: {payload['driver']}, {payload['seconds_per_point']:g} s per point, "
            f"{payload['rounds']} interleaved rounds, medians (windows/s range in brackets). "
            "Windows are 5 s of int16 PCM (120,000 samples, 240 kB). Average batch = the "
            "server's inference_count / execution_count during the point. Models: `null` "
            "averages the window (transport-bound), `tiny` is the tiny MERT export "
            "(model-bound here). Server: indexer-serve (bundled Triton, Python backend, "
            "ONNX Runtime CPU)."
        ),
        "",
        "| section | model | load | windows/s | avg batch | p50 ms | p99 ms | queue ms |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in payload["summary"]:
        lines.append(
            f"| {r['section']} | {r['model']} | {r['label']} | {r['windows_per_s']:.1f} "
            f"({r['windows_per_s_min']:.0f}-{r['windows_per_s_max']:.0f}) | "
            f"{r['avg_batch']:.2f} | {r['latency_ms_p50']:.1f} | {r['latency_ms_p99']:.1f} | "
            f"{r['server_queue_ms']:.2f} |"
        )
    lines += ["", f"Measured in {payload['wall_seconds']} s by `python benchmarks/load.py sweep`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="load.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="load a running server and print one JSON result")
    r.add_argument("--server", default="127.0.0.1:8001")
    r.add_argument("--model", default="mert")
    r.add_argument("--concurrency", type=int, default=16)
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--seconds", type=float, default=8.0)
    r.add_argument("--shm", action="store_true", help="system shared memory (same host only)")
    r.add_argument("--driver", choices=("perf_analyzer", "python"), default="perf_analyzer")
    r.add_argument("--json", type=Path, help="also write the result here (atomically)")
    s = sub.add_parser(
        "sweep", help="serve variants locally and write benchmarks/results/serving.*"
    )
    s.add_argument(
        "--tiny-repo", type=Path, help="an exported tiny repository (default: export one)"
    )
    s.add_argument("--seconds", type=float, default=5.0)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--delay", type=int, default=1000, help="queue delay (us) for sections 1-2")
    s.add_argument(
        "--delays",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[0, 500, 2000, 10000],
        help="queue delays (us) to compare",
    )
    s.add_argument(
        "--python-driver", action="store_true", help="our load threads, not perf_analyzer"
    )
    args = p.parse_args(argv)
    if getattr(args, "concurrency", 1) < 1 or getattr(args, "batch", 1) < 1:
        p.error("--concurrency and --batch must be at least 1")
    try:
        if args.command == "sweep":
            return sweep(args)
        load = Load(
            concurrency=args.concurrency,
            batch=args.batch,
            shm=args.shm,
            seconds=args.seconds,
            driver=args.driver,
        )
        res = measure(args.server, args.model, load)
        text = json.dumps(res.row())
        print(text)
        if args.json:
            atomic_write_text(args.json, text + "\n")
        return 0
    except IndexerError as exc:
        print(f"load.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
