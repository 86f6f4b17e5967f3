"""Benchmark the search service (indexer-search-serve) against the bundled Triton.

One run, one machine, the tiny random-init model exported here (its inference
is cheap, so what the service adds stands out):

- warm ``POST /v1/identify`` of a 10 s clip, p50/p95, and the part of it that is
  not Triton inference (wall time at the client minus the service's embed
  stage), on an exact index built by ``indexer-client`` from generated audio,
  and on a 100k-window IVF-PQ index of seeded synthetic vectors
  (``mert_indexer.indexer.synthetic``) recorded as the served model's;
- the same query through ``indexer-query`` (a cold process each time): the
  service/CLI ratio;
- throughput with 1, 4 and 16 concurrent clients, and the errors (must be 0);
- query p50/p95 while ``indexer-client`` saturates the same Triton, with the
  model's priority levels (queries at 1, indexing at the default 2) and with a
  copy of the config without them.

Writes ``benchmarks/results/search_service.{json,md}``.

    python benchmarks/bench_search_service.py            # ~4 minutes on 2 shared cores
    python benchmarks/bench_search_service.py --queries 20 --seconds 4   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_index.py

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_vector_extensions, machine, serve, write_results

from mert_indexer.client.decode import decode
from mert_indexer.client.synth import write, write_catalogue
from mert_indexer.client.triton_io import ConnectOptions, TritonPool
from mert_indexer.indexer.generation import INDEX_DIR, current_info
from mert_indexer.indexer.plan import PendingFile
from mert_indexer.indexer.store import IndexStore
from mert_indexer.indexer.synthetic import SyntheticEmbedder, indexed_track
from mert_indexer.service.options import ServiceOptions
from mert_indexer.service.server import ServiceThread

BIN = Path(sys.executable).parent
SR = 24_000
CLIP_SECONDS = 10.0


def run(*cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def export_tiny(dest: Path) -> Path:
    run(sys.executable, str(ROOT / "export" / "to_onnx.py"), "--random-init", "--size", "tiny",
        "--output", str(dest))  # fmt: skip
    return dest


def without_priorities(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest)
    cfg = dest / "mert" / "config.pbtxt"
    lines = cfg.read_text().splitlines(keepends=True)
    cfg.write_text("".join(x for x in lines if "priority_level" not in x))
    return dest


def post(base: str, clip: bytes, name: str = "clip.wav") -> tuple[int, float, dict[str, Any]]:
    """(status, wall seconds, JSON) of one multipart identify."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + clip
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"{base}/v1/identify?min_score=off", data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, time.perf_counter() - t0, json.loads(raw)


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs) * 1000, q)), 1)


def wait_ready(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{base} never became ready")


@contextlib.contextmanager
def service(index: Path, grpc_url: str) -> Iterator[ServiceThread]:
    opts = ServiceOptions(index=index, port=0, connect=ConnectOptions(servers=(grpc_url,)))
    with ServiceThread(opts) as svc:
        wait_ready(svc.url)
        yield svc


def latency(base: str, clip: bytes, n: int) -> dict[str, Any]:
    for _ in range(5):  # warm: segment maps, ORT, connections
        post(base, clip)
    walls, embeds, searches, errors = [], [], [], 0
    for _ in range(n):
        status, wall, got = post(base, clip)
        if status != 200:
            errors += 1
            continue
        walls.append(wall)
        embeds.append(got["timings_ms"]["embed"] / 1000)
        searches.append(got["timings_ms"]["search"] / 1000)
    rest = [w - e for w, e in zip(walls, embeds, strict=True)]
    return {
        "queries": n,
        "errors": errors,
        "p50_ms": pct(walls, 50),
        "p95_ms": pct(walls, 95),
        "embed_p50_ms": pct(embeds, 50),
        "search_p50_ms": pct(searches, 50),
        "not_inference_p50_ms": pct(rest, 50),
        "not_inference_p95_ms": pct(rest, 95),
    }


def cli_latency(grpc_url: str, index: Path, clip: Path, n: int = 3) -> dict[str, Any]:
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        run(str(BIN / "indexer-query"), "--server", grpc_url, "--index", str(index), "--json",
            "--min-score", "off", str(clip))  # fmt: skip
        walls.append(time.perf_counter() - t0)
    return {"runs": n, "median_ms": round(statistics.median(walls) * 1000, 1)}


def throughput(base: str, clip: bytes, clients: int, seconds: float) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    walls: list[float] = []
    errors = 0
    lock = threading.Lock()

    def loop() -> None:
        nonlocal errors
        while time.monotonic() < stop:
            try:
                status, wall, _ = post(base, clip)
            except OSError:
                status, wall = 0, 0.0
            with lock:
                if status == 200:
                    walls.append(wall)
                else:
                    errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(loop) for _ in range(clients)]:
            f.result()
    elapsed = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(walls),
        "errors": errors,
        "per_second": round(len(walls) / elapsed, 2),
        "p95_ms": pct(walls, 95) if walls else None,
    }


class Indexing:
    """indexer-client runs, one after another into fresh folders, until stopped."""

    def __init__(self, grpc_url: str, folder: Path, work: Path) -> None:
        self.grpc_url, self.folder, self.work = grpc_url, folder, work
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self.runs = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            out = self.work / f"run{self.runs}"
            self._proc = subprocess.Popen(
                [str(BIN / "indexer-client"), "--server", self.grpc_url, "--input",
                 str(self.folder), "--index", str(out), "--hop-seconds", "0.5", "--no-build",
                 "--no-progress"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            self._proc.wait()
            self.runs += 1
            shutil.rmtree(out, ignore_errors=True)

    def __enter__(self) -> Indexing:
        self._thread.start()
        time.sleep(4.0)  # the client is started, decoding and sending
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        self._thread.join(timeout=60)


def synthetic_ivfpq(root: Path, identity: dict[str, Any], windows: int) -> dict[str, Any]:
    emb = SyntheticEmbedder(dim=int(identity["embedding_dim"]), seed=7)
    t = n = 0
    with IndexStore.open(root, identity, create=True) as store:
        while n < windows:
            samples, starts, x = indexed_track(emb, t, 200.0, SR)
            pending = PendingFile(f"synthetic/track{t:06d}.mp3", f"h{t}", 1, 1)
            store.add_track(pending, n_samples=samples, sample_rate=SR, starts=starts, embeddings=x)
            n += len(starts)
            t += 1
            if t % 200 == 0:
                store.commit()
        store.commit()
        return store.build_index(kind="ivfpq")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=60, help="warm queries per index")
    p.add_argument("--seconds", type=float, default=8.0, help="per throughput / priority level")
    p.add_argument("--ivf-windows", type=int, default=100_000)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    results: dict[str, Any] = {"machine": machine(), "cpu_flags": cpu_vector_extensions()}
    try:
        print("exporting the tiny model ...", flush=True)
        repo = export_tiny(tmp / "repo")
        plain = without_priorities(repo, tmp / "repo-no-priorities")
        originals = write_catalogue(tmp / "orig", 6, seconds=(20, 30))
        write_catalogue(tmp / "bulk", 8, seconds=(50, 60), suffixes=(".wav", ".flac"),
                               seed=5)  # fmt: skip
        audio = decode(originals[2], SR)
        clip_path = write(tmp / "clip.wav", audio[3 * SR : int((3 + CLIP_SECONDS) * SR)], SR)
        clip = clip_path.read_bytes()
        with serve(repo) as triton:
            pool = TritonPool(ConnectOptions(servers=(triton.grpc_url,)))
            contract = pool.connect()
            pool.close()
            exact = tmp / "exact"
            run(str(BIN / "indexer-client"), "--server", triton.grpc_url, "--input",
                str(tmp / "orig"), "--index", str(exact), "--no-progress")  # fmt: skip
            exact_info = current_info(exact / INDEX_DIR) or {}
            results["exact_index"] = {k: exact_info.get(k) for k in ("kind", "n_vectors")}
            print(f"building a {args.ivf_windows:,}-window IVF-PQ index ...", flush=True)
            identity = contract.identity() | {"hop_samples": contract.window_samples}
            info = synthetic_ivfpq(tmp / "ivfpq", identity, args.ivf_windows)
            results["ivfpq_index"] = {k: info.get(k) for k in ("kind", "n_vectors", "params")}
            for name, index in (("exact", exact), ("ivfpq_100k", tmp / "ivfpq")):
                print(f"warm latency, {name} ...", flush=True)
                with service(index, triton.grpc_url) as svc:
                    results[f"latency_{name}"] = latency(svc.url, clip, args.queries)
                results[f"cli_{name}"] = cli_latency(triton.grpc_url, index, clip_path)
            with service(exact, triton.grpc_url) as svc:
                results["throughput"] = []
                for clients in (1, 4, 16):
                    print(f"throughput, {clients} client(s) ...", flush=True)
                    results["throughput"].append(throughput(svc.url, clip, clients, args.seconds))
        results["priorities"] = {}
        for label, model_repo in (("with", repo), ("without", plain)):
            print(f"queries while indexing, {label} priorities ...", flush=True)
            with serve(model_repo) as triton, service(exact, triton.grpc_url) as svc:
                idle = latency(svc.url, clip, max(10, args.queries // 3))
                with Indexing(triton.grpc_url, tmp / "bulk", tmp / f"work-{label}") as job:
                    busy = latency(svc.url, clip, max(10, args.queries // 3))
                results["priorities"][label] = {
                    "idle_p95_ms": idle["p95_ms"],
                    "busy_p50_ms": busy["p50_ms"],
                    "busy_p95_ms": busy["p95_ms"],
                    "busy_embed_p50_ms": busy["embed_p50_ms"],
                    "busy_errors": busy["errors"],
                    "indexing_runs": job.runs,
                }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    m = results["machine"]
    cpu = f"{m['cpu']}, {m['cores']} cores, {'/'.join(results['cpu_flags']) or 'no AVX2'}"
    table = [
        "# Search service benchmark",
        "",
        f"Machine: {cpu}; the tiny random-init model (cheap inference) on the bundled",
        f"Triton (CPU), a {CLIP_SECONDS:g} s clip, 0.5 s hop ({int(CLIP_SECONDS * 2 - 9)} windows),"
        " one request a clip.",
        "`python benchmarks/bench_search_service.py`",
        "",
        f"| what | exact index ({results['exact_index']['n_vectors']} windows) | "
        f"IVF-PQ, {results['ivfpq_index']['n_vectors']:,} windows |",
        "|---|---|---|",
    ]
    le, li = results["latency_exact"], results["latency_ivfpq_100k"]
    row = lambda label, key: f"| {label} | {le[key]} | {li[key]} |"  # noqa: E731
    table += [
        row("warm identify p50 (ms)", "p50_ms"),
        row("warm identify p95 (ms)", "p95_ms"),
        row("of it Triton (embed stage) p50 (ms)", "embed_p50_ms"),
        row("of it search p50 (ms)", "search_p50_ms"),
        row("not inference p50 (ms)", "not_inference_p50_ms"),
        row("not inference p95 (ms, goal <= 30)", "not_inference_p95_ms"),
        f"| indexer-query, cold process (ms) | {results['cli_exact']['median_ms']} | "
        f"{results['cli_ivfpq_100k']['median_ms']} |",
        f"| service p50 / CLI | {le['p50_ms'] / results['cli_exact']['median_ms']:.3f} | "
        f"{li['p50_ms'] / results['cli_ivfpq_100k']['median_ms']:.3f} |",
        "",
        "| concurrent clients | requests/s | p95 (ms) | errors |",
        "|---|---|---|---|",
    ]
    table += [
        f"| {t['clients']} | {t['per_second']} | {t['p95_ms']} | {t['errors']} |"
        for t in results["throughput"]
    ]
    pr = results["priorities"]
    table += [
        "",
        "Queries while indexer-client saturates the same Triton (exact index):",
        "",
        "| Triton config | idle p95 (ms) | busy p50 (ms) | busy p95 (ms) | busy embed p50 (ms) "
        "| errors |",
        "|---|---|---|---|---|---|",
    ]
    table += [
        f"| {label} priority levels | {v['idle_p95_ms']} | {v['busy_p50_ms']} | "
        f"{v['busy_p95_ms']} | {v['busy_embed_p50_ms']} | {v['busy_errors']} |"
        for label, v in pr.items()
    ]
    md = write_results("search_service", results, table)
    print("\n".join(table))
    print(f"\nwritten: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
