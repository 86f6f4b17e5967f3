#!/usr/bin/env python3
"""The prepared GPU check: export MERT-v1-95M, serve it with the GPU config, load it, report.

    python3 benchmarks/gpu_check.py --prepare   # here (PyPI reachable): fills .whl/ to carry
    python3 benchmarks/gpu_check.py             # on the GPU machine: report under $OUT
    python3 benchmarks/gpu_check.py --dry-run   # anywhere: tiny model on CPU, every step, ~2 min

The GPU machine has python3 with torch (CUDA), onnx and onnxruntime, but no
Triton container, no tritonclient and no internet. ``--prepare`` therefore
packs what the check needs into ``.whl/`` (git-ignored, ~44 MB, carried with
the run): the tritonclient wheel (client library and perf_analyzer), its
python-rapidjson, a protobuf<5 fallback, and the Triton binary, Python backend
and Python 3.12 stub from the installed nvidia-pytriton. On the machine:

1. environment: GPU (nvidia-smi), torch/CUDA, onnxruntime and its providers;
2. export the 95M random-init model in fp32 and fp16 (in parallel);
3. PyTorch on the GPU, in process: the model's own ceiling, fp32 and fp16;
4. ``indexer-serve`` with the exported (GPU) config: ONNX Runtime CUDA when
   this onnxruntime has the CUDA provider, else ONNX Runtime on the CPU cores,
   said loudly; then a load (perf_analyzer, else our own), with the server's
   statistics and nvidia-smi sampled meanwhile.

Every step has a deadline inside the total budget (7.5 min) and turns a
failure into a line of the report instead of stopping the rest. Output:
``serving_gpu.json`` and ``serving_gpu.md`` (``serving_gpu_dryrun.*`` for a dry
run) in ``$OUT``, else in ``benchmarks/results/``; the table is also printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CARRY = ROOT / ".whl"
BUNDLE_TAR = "triton-bundle.tar.xz"
FALLBACK = "fallback"  # wheels installed only when the machine's own version fails
SITE = Path(tempfile.gettempdir()) / "gpu-check-site"
STUB_PYTHON = "3.12"  # the GPU machine's python3
TRACK_SECONDS = 240.0  # "tracks/hour" for 4-minute tracks
BUDGET_S = 450.0

SOURCE_LINKS = Path(tempfile.gettempdir()) / "gpu-check-src"


def _import_from_checkout() -> None:
    """Make ``mert_indexer`` importable from this checkout without installing it.

    The GPU machine gets the working tree but no install step: a folder of
    symbolic links lays the package out as ``pyproject.toml`` maps it (``core/``
    is ``mert_indexer``, ``client/`` is ``mert_indexer.client``, ...). Where the
    package is installed already (here), that install is used.
    """
    import importlib.util

    import tomllib

    if importlib.util.find_spec("mert_indexer") is None:
        mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ]
        shutil.rmtree(SOURCE_LINKS, ignore_errors=True)
        for package, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
            target = SOURCE_LINKS.joinpath(*package.split("."))
            target.mkdir(parents=True, exist_ok=True)
            for entry in (ROOT / folder).iterdir():
                if not (target / entry.name).exists():
                    (target / entry.name).symlink_to(entry)
        sys.path.insert(0, str(SOURCE_LINKS))
    for p in (str(ROOT), str(BENCH)):
        if p not in sys.path:
            sys.path.insert(0, p)


_import_from_checkout()


class Budget:
    """The time left of the whole check; each step asks for its share."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def take(self, want: float) -> float:
        left = self.left() - 15  # keep time to write the report
        if left < 10:
            raise TimeoutError("out of time budget")
        return min(want, left)


def say(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, **kw)


def env_with_site() -> dict[str, str]:
    """This process's environment with the carried packages and the repository importable."""
    parts = [str(SITE)] if SITE.is_dir() else []
    parts += [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in parts if p),
        "PYTHONUNBUFFERED": "1",
    }


# ---------------------------------------------------------------- --prepare (here)


def prepare() -> int:
    """Fill .whl/ with what the GPU machine lacks; ~44 MB."""
    CARRY.mkdir(exist_ok=True)
    (CARRY / FALLBACK).mkdir(exist_ok=True)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--platform",
        "manylinux_2_28_x86_64",
        "--platform",
        "manylinux_2_24_x86_64",
        "--platform",
        "manylinux_2_17_x86_64",
        "--platform",
        "manylinux2014_x86_64",
        "--platform",
        "manylinux1_x86_64",
        "-q",
    ]
    for dest, wanted in (
        (CARRY, ["tritonclient==2.51.0", "python-rapidjson==1.25"]),
        (CARRY / FALLBACK, ["protobuf==4.25.9"]),
    ):
        proc = run([*pip, "-d", str(dest), *wanted], timeout=600)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
    from mert_indexer.server.bundle import find_bundle

    bundle = find_bundle()
    stub = bundle.root / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub"
    members = [
        bundle.binary,
        bundle.python_backend / "libtriton_python.so",
        bundle.python_backend / "triton_python_backend_utils.py",
        stub,
    ]
    needed: set[str] = set()  # the bundled libraries these three link
    for binary in (bundle.binary, bundle.python_backend / "libtriton_python.so", stub):
        out = run(
            ["ldd", str(binary)],
            timeout=60,
            env={**os.environ, "LD_LIBRARY_PATH": str(bundle.libs)},
        ).stdout
        needed |= {
            str(Path(line.split("=>")[1].split()[0]).resolve())
            for line in out.splitlines()
            if "nvidia_pytriton.libs/" in line and "=>" in line
        }
    site = bundle.root.parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "__init__.py"
        marker.write_text(
            '"""Placeholder: only the Triton binary of nvidia-pytriton is carried."""\n'
        )
        out = CARRY / (BUNDLE_TAR + ".tmp")
        with tarfile.open(out, "w:xz", preset=6) as tar:
            tar.add(marker, arcname="pytriton/__init__.py")
            for path in members + [Path(p) for p in sorted(needed)]:
                tar.add(path, arcname=str(Path(path).resolve().relative_to(site.resolve())))
        os.replace(out, CARRY / BUNDLE_TAR)
    # The packed server must find every library it links in the pack itself.
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(CARRY / BUNDLE_TAR) as tar:
            tar.extractall(tmp)
        libs = Path(tmp) / "nvidia_pytriton.libs"
        for binary in (
            "pytriton/tritonserver/bin/tritonserver",
            "pytriton/tritonserver/backends/python/libtriton_python.so",
        ):
            out = run(
                ["ldd", str(Path(tmp) / binary)],
                timeout=60,
                env={**os.environ, "LD_LIBRARY_PATH": str(libs)},
            ).stdout
            if "not found" in out:
                raise SystemExit(f"the packed {binary} lacks libraries:\n{out}")
    total = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    say(
        f"prepared {CARRY} ({total / 1e6:.0f} MB): run on the GPU machine with carry ['.whl']:"
        " python3 benchmarks/gpu_check.py"
    )
    return 0


# ---------------------------------------------------------------- steps (there)


def install_carried(report: dict) -> None:
    """Unpack .whl/ into SITE; fall back to protobuf<5 only if tritonclient's protos fail."""
    if not CARRY.is_dir():
        report["carried"] = "no .whl/: using what this python3 has"
        return
    SITE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(str(w) for w in CARRY.glob("*.whl"))
    if wheels:
        pip = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            str(SITE),
        ]
        proc = run(pip + wheels, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install of the carried wheels failed: {proc.stderr[-500:]}")
    tar = CARRY / BUNDLE_TAR
    if tar.exists():
        with tarfile.open(tar) as t:
            t.extractall(SITE, filter="tar") if sys.version_info >= (3, 12) else t.extractall(SITE)
    check = [sys.executable, "-c", "import tritonclient.grpc.model_config_pb2, tritonclient.grpc"]
    proc = run(check, timeout=60, env=env_with_site())
    if proc.returncode != 0:
        fallback = sorted(str(w) for w in (CARRY / FALLBACK).glob("*.whl"))
        run(pip + fallback, timeout=120)
        proc = run(check, timeout=60, env=env_with_site())
        report["protobuf_fallback"] = True
        if proc.returncode != 0:
            raise RuntimeError(f"tritonclient does not import: {proc.stderr.strip()[-300:]}")
    sys.path.insert(0, str(SITE))
    what = "the Triton bundle" if tar.exists() else "no Triton bundle"
    report["carried"] = f"{len(wheels)} wheels and {what} from .whl/"


def environment(report: dict, dry_run: bool) -> dict:
    env: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cores": os.cpu_count(),
    }
    smi = shutil.which("nvidia-smi")
    if smi:
        env["gpus"] = run([smi, "-L"], timeout=30).stdout.strip().splitlines()
        q = run(
            [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            timeout=30,
        ).stdout.strip()
        env["gpu_query"] = q
    else:
        env["gpus"] = []
    for mod in ("torch", "onnx", "onnxruntime", "numpy", "transformers"):
        proc = run(
            [sys.executable, "-c", f"import {mod}; print({mod}.__version__)"],
            timeout=120,
            env=env_with_site(),
        )
        env[mod] = proc.stdout.strip() or f"missing ({proc.stderr.strip().splitlines()[-1:]})"
    proc = run(
        [
            sys.executable,
            "-c",
            "import onnxruntime as o; print(','.join(o.get_available_providers()))",
        ],
        timeout=60,
        env=env_with_site(),
    )
    env["onnxruntime_providers"] = proc.stdout.strip().split(",") if proc.returncode == 0 else []
    proc = run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        timeout=120,
        env=env_with_site(),
    )
    env["torch_cuda"] = proc.stdout.strip() == "True"
    if not env["gpus"] and not dry_run:
        say("WARNING: no GPU (nvidia-smi absent): this run measures the CPU only")
    report["environment"] = env
    return env


def export(precision: str, size: str, dest: Path, timeout: float) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "export" / "to_onnx.py"),
        "--random-init",
        "--size",
        size,
        "--precision",
        precision,
        "--validation-windows",
        "8",
        "--output",
        str(dest),
        "-q",
    ]
    t0 = time.monotonic()
    proc = run(cmd, timeout=timeout, env=env_with_site(), cwd=ROOT)
    out = {"precision": precision, "seconds": round(time.monotonic() - t0, 1), "repo": str(dest)}
    if proc.returncode != 0:
        out["error"] = ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1]
    else:
        onnx_file = next(dest.glob("*/1/model.onnx"))
        out["model_mb"] = round(sum(f.stat().st_size for f in onnx_file.parent.iterdir()) / 1e6, 1)
    return out


TORCH_REFERENCE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from export.mert import random_model
from export.graph import PooledMert
size, device, seconds, batch = sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
window = int(sys.argv[6])
lm = random_model(size, 0)
out = {}
for precision in ("fp32", "fp16"):
    if precision == "fp16" and device == "cpu":
        continue
    m = PooledMert(lm.model, tuple(range(lm.num_layers + 1)), "int16").eval().to(device)
    x = torch.randint(-8000, 8000, (batch, window), dtype=torch.int16, device=device)
    ctx = torch.autocast("cuda", dtype=torch.float16) if precision == "fp16" else torch.no_grad()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), ctx:
        for _ in range(2):
            m(x)
        if device == "cuda":
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            m(x); n += 1
            if device == "cuda":
                torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    out[precision] = {"batch": batch, "windows_per_s": round(n * batch / dt, 1),
                      "x_realtime": round(n * batch / dt * window / lm.sample_rate, 1),
                      "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2**20)
                                      if device == "cuda" else None)}
print(json.dumps(out))
"""


def torch_reference(size: str, cuda: bool, seconds: float, timeout: float) -> dict:
    device = "cuda" if cuda else "cpu"
    batch = 32 if cuda else 2
    from mert_indexer.contract import DEFAULT_SAMPLE_RATE, DEFAULT_WINDOW_SECONDS

    window = int(DEFAULT_WINDOW_SECONDS * DEFAULT_SAMPLE_RATE)
    proc = run(
        [
            sys.executable,
            "-c",
            TORCH_REFERENCE,
            str(ROOT),
            size,
            device,
            str(seconds),
            str(batch),
            str(window),
        ],
        timeout=timeout,
        env=env_with_site(),
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "device": device}
    return {"device": device, **json.loads(proc.stdout.strip().splitlines()[-1])}


class SmiSampler:
    """nvidia-smi every half second while a load runs: peak memory, mean utilisation."""

    def __init__(self) -> None:
        self.smi = shutil.which("nvidia-smi")
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.smi and not self._stop.is_set():
            with_timeout = run(
                [
                    self.smi,
                    "--query-gpu=memory.used,memory.total,utilization.gpu",
                    "--format=csv,noheader,nounits",
                ],
                timeout=10,
            )
            for line in with_timeout.stdout.strip().splitlines()[:1]:
                used, total, util = (float(v) for v in line.split(","))
                self.samples.append((used, total, util))
            self._stop.wait(0.5)

    def __enter__(self) -> SmiSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu": "no nvidia-smi samples"}
        return {
            "gpu_memory_used_mb_max": max(s[0] for s in self.samples),
            "gpu_memory_total_mb": self.samples[0][1],
            "gpu_util_percent_mean": round(sum(s[2] for s in self.samples) / len(self.samples), 1),
        }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_load(repo: Path, device: str, seconds: float, timeout: float, label: str) -> dict:
    """``indexer-serve`` (as ``python3 -m server.cli``) on ``repo``, one load, then SIGTERM."""
    import load as loadtool

    ports = [free_port() for _ in range(3)]
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "--model-repository",
        str(repo),
        "--device",
        device,
        "--grpc-port",
        str(ports[0]),
        "--http-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--ready-timeout",
        str(int(max(30, timeout * 0.5))),
        "-q",
    ]
    out: dict = {"label": label, "device": device}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with_site(),
        cwd=ROOT,
    )
    t0 = time.monotonic()
    try:
        line = proc.stdout.readline()
        if not line.startswith("ready:"):
            proc.wait(timeout=30)
            err = [ln for ln in proc.stderr.read().splitlines() if "error" in ln]
            out["error"] = (err or ["indexer-serve exited without a ready line"])[-1]
            return out
        out["ready_s"] = round(time.monotonic() - t0, 1)
        url = f"127.0.0.1:{ports[0]}"
        driver = "perf_analyzer" if _perf_analyzer_works() else "python"
        load = loadtool.Load(
            concurrency=8,
            batch=8,
            shm=True,
            seconds=seconds,
            warmup=min(5.0, seconds / 2),
            driver=driver,
        )
        with SmiSampler() as smi:
            res = loadtool.measure(url, "mert", load)
        contract = loadtool.contract_of(url, "mert")
        windows_per_s = res.windows_per_s
        per_track = math.ceil(TRACK_SECONDS / contract.window_seconds)
        out.update(
            {
                "driver": driver,
                "load": f"{load.concurrency} clients x {load.batch} windows, system shared memory",
                "windows_per_s": windows_per_s,
                "x_realtime": round(windows_per_s * contract.window_seconds, 1),
                "tracks_per_hour_4min": round(windows_per_s * 3600 / per_track),
                "avg_batch_per_execution": round(res.avg_batch, 2),
                "server_compute_ms_per_execution": res.server_compute_ms,
                "server_queue_ms": res.server_queue_ms,
                "latency_ms_p50": res.latency_ms_p50,
                "latency_ms_p99": res.latency_ms_p99,
                **smi.summary(),
            }
        )
        return out
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                out["stop_exit_code"] = proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                out["stop_exit_code"] = "killed"


def _perf_analyzer_works() -> bool:
    import load as loadtool

    binary = loadtool.perf_analyzer_binary()
    if binary is None:
        candidate = SITE / "bin" / "perf_analyzer"
        if not candidate.exists():
            return False
        os.environ["PATH"] = f"{candidate.parent}{os.pathsep}{os.environ['PATH']}"
        binary = candidate
    with loadtool.perf_analyzer_libs() as libdir:
        proc = run(
            [str(binary), "--help"], timeout=30, env={**os.environ, "LD_LIBRARY_PATH": libdir}
        )
    return "concurrency-range" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- report


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [
        "# GPU check ("
        + ("dry run, tiny model on CPU" if report["dry_run"] else "MERT-v1-95M random-init")
        + ")",
        "",
        (
            f"- machine: {env.get('gpu_query') or 'no GPU'}; {env.get('cores')} cores; "
            f"python {env.get('python')}, torch {env.get('torch')}, "
            f"onnxruntime {env.get('onnxruntime')} "
            f"({', '.join(env.get('onnxruntime_providers', []))})"
        ),
    ]
    for note in report.get("notes", []):
        lines.append(f"- **{note}**")
    lines += ["", "| step | result |", "|---|---|"]
    for e in report.get("exports", []):
        lines.append(
            f"| export {e['precision']} | "
            + (
                f"error: {e['error']}"
                if "error" in e
                else f"{e['model_mb']} MB in {e['seconds']} s"
            )
            + " |"
        )
    ref = report.get("torch_reference", {})
    for precision in ("fp32", "fp16"):
        if precision in ref:
            r = ref[precision]
            lines.append(
                f"| PyTorch in-process {precision} on {ref['device']} "
                f"(batch {r['batch']}, not served) | "
                f"{r['windows_per_s']} windows/s = {r['x_realtime']}x realtime"
                + (f", peak {r['peak_gpu_mb']} MB" if r.get("peak_gpu_mb") else "")
                + " |"
            )
    if "error" in ref:
        lines.append(f"| PyTorch reference | error: {ref['error']} |")
    for s in report.get("served", []):
        if "error" in s:
            lines.append(f"| served {s['label']} ({s['device']}) | error: {s['error']} |")
            continue
        lines.append(
            f"| served {s['label']} via indexer-serve, ONNX Runtime {s['device'].upper()} "
            f"({s['driver']}, {s['load']}) | "
            f"**{s['windows_per_s']} windows/s** = {s['x_realtime']}x realtime = "
            f"{s['tracks_per_hour_4min']} four-minute tracks/hour; avg batch/execution "
            f"{s['avg_batch_per_execution']}; "
            f"compute {s['server_compute_ms_per_execution']} ms/execution; "
            f"p50 {s['latency_ms_p50']} ms; GPU memory max "
            f"{s.get('gpu_memory_used_mb_max', '-')} of {s.get('gpu_memory_total_mb', '-')} MB, "
            f"util {s.get('gpu_util_percent_mean', '-')} %; stop exit {s.get('stop_exit_code')} |"
        )
    for step, err in report.get("errors", {}).items():
        lines.append(f"| {step} | error: {err} |")
    lines.append("")
    lines.append(f"Total {report.get('wall_s')} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="fill .whl/ here (needs PyPI)")
    mode.add_argument("--dry-run", action="store_true", help="tiny model on CPU: prove the steps")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or BENCH / "results"),
        help="report folder (default: $OUT, else benchmarks/results)",
    )
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything")
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare()

    budget = Budget(args.budget)
    started = time.monotonic()
    size = "tiny" if args.dry_run else "95m"
    report: dict = {"dry_run": args.dry_run, "size": size, "notes": [], "errors": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    args.out.mkdir(parents=True, exist_ok=True)

    def step(name: str, fn, *a):
        say(f"{name} ...")
        try:
            return fn(*a)
        except Exception as exc:
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
            say(f"{name} FAILED: {exc}")
            if os.environ.get("GPU_CHECK_DEBUG"):
                traceback.print_exc()
            return None

    if not args.dry_run:
        step("install carried packages", install_carried, report)
    env = step("environment", environment, report, args.dry_run) or {}
    has_gpu = bool(env.get("gpus")) and not args.dry_run
    cuda_ep = "CUDAExecutionProvider" in env.get("onnxruntime_providers", [])
    serve_device = "cuda" if (cuda_ep and has_gpu) else "cpu"
    if has_gpu and serve_device == "cpu":
        report["notes"].append(
            "this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed and "
            "too large to carry): the served numbers are ONNX Runtime on the CPU cores; the GPU "
            "numbers are PyTorch in-process"
        )

    say(f"exporting {size} fp32 and fp16 (random init) ...")
    try:
        with ThreadPoolExecutor(2) as pool:
            jobs = [
                pool.submit(export, p, size, work / p, budget.take(240)) for p in ("fp32", "fp16")
            ]
            report["exports"] = [j.result() for j in jobs]
    except Exception as exc:
        report["errors"]["export"] = f"{type(exc).__name__}: {exc}"
    exports = {
        e["precision"]: Path(e["repo"]) for e in report.get("exports", []) if "error" not in e
    }

    ref = step(
        "PyTorch reference",
        lambda: torch_reference(
            size,
            env.get("torch_cuda", False) and has_gpu,
            2.0 if args.dry_run else 8.0,
            budget.take(90),
        ),
    )
    if ref:
        report["torch_reference"] = ref

    report["served"] = []
    load_s = 5.0 if args.dry_run else 20.0
    for precision in ("fp32", "fp16"):
        if precision not in exports:
            continue
        if precision == "fp16" and serve_device == "cpu":
            report["notes"].append(
                "fp16 not served: ONNX Runtime runs fp16 slower than fp32 on CPUs"
            )
            continue
        res = step(
            f"serve {precision}",
            lambda p=precision: serve_and_load(
                exports[p], serve_device, load_s, budget.take(150), f"{size} {p}"
            ),
        )
        if res:
            report["served"].append(res)
            say(json.dumps(res))

    report["wall_s"] = round(time.monotonic() - started)
    text = markdown(report)
    from mert_indexer.atomic import atomic_write_text

    name = "serving_gpu_dryrun" if args.dry_run else "serving_gpu"
    atomic_write_text(args.out / f"{name}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    served_ok = any("error" not in s for s in report["served"])
    return 0 if served_ok and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
