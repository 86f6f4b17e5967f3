"""Start, watch and stop the bundled Triton server.

Known failure modes it turns into a clear :class:`ServerStartError` rather
than a hang: a model that fails to load (Triton exits 1), a missing stub (a
log line), a wrong stub or a missing shared library (Triton sits in "loading"
forever: our own ready deadline, then kill and report), and ports already
taken. Shared-memory regions left in /dev/shm by killed servers are removed
before start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from indexer.errors import ServerStartError
from server import local_repo
from server.bundle import find_bundle, prepare_backends

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
# Log lines that mean the server will never become ready.
FATAL_PATTERNS = (
    re.compile(r"failed to load", re.I),
    re.compile(r"Unable to find '.*stub'", re.I),
    re.compile(r"error while loading shared libraries", re.I),
    re.compile(r"failed to start .* service", re.I),
    re.compile(r"Address already in use", re.I),
    re.compile(r"Invalid argument", re.I),
)


@dataclass(frozen=True)
class ServeOptions:
    model_repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    device: str = "auto"  # auto | cpu | cuda
    ready_timeout: float = 120.0
    log_file: Path | None = None
    log_verbose: int = 0
    ssl_cert: Path | None = None
    ssl_key: Path | None = None


def resolve_provider(device: str) -> str:
    """``cuda`` when asked for (or ``auto`` and ONNX Runtime sees CUDA), else ``cpu``."""
    if device == "cpu":
        return "cpu"
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ServerStartError(
            "onnxruntime is not installed: pip install 'mert-indexer[server]'"
        ) from exc
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise ServerStartError(
            "--device cuda: this onnxruntime has no CUDAExecutionProvider "
            "(pip install 'mert-indexer[gpu]')"
        )
    return "cuda" if has_cuda else "cpu"


def remove_stale_shm() -> list[str]:
    """Delete Python-backend shared-memory regions no live process maps."""
    regions = [p for p in SHM_DIR.glob(SHM_PREFIX + "*")] if SHM_DIR.is_dir() else []
    if not regions:
        return []
    in_use: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            for line in maps.read_text(errors="replace").splitlines():
                if SHM_PREFIX in line:
                    in_use.add(line.rsplit("/", 1)[-1].split(" ")[0])
    removed = []
    for region in regions:
        if region.name not in in_use:
            with contextlib.suppress(OSError):
                region.unlink()
                removed.append(region.name)
    if removed:
        log.info("removed %d stale Triton shared-memory region(s)", len(removed))
    return removed


class LocalTriton:
    """The bundled ``tritonserver`` serving a derived Python-backend repository.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.models: list[local_repo.LocalModel] = []
        self._workdir: Path | None = None
        self._log_path: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.options.host}:{self.options.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def start(self) -> None:
        opts = self.options
        bundle = find_bundle()
        provider = resolve_provider(opts.device)
        self._workdir = Path(tempfile.mkdtemp(prefix="indexer-serve-"))
        backends = prepare_backends(bundle, self._workdir / "backends")
        repo = self._workdir / "repository"
        self.models = local_repo.derive(opts.model_repository, repo, provider=provider)
        remove_stale_shm()
        self._log_path = opts.log_file or (self._workdir / "tritonserver.log")
        cmd = [
            str(bundle.binary),
            f"--model-repository={repo}",
            f"--backend-directory={backends}",
            f"--grpc-address={opts.host}", f"--grpc-port={opts.grpc_port}",
            f"--http-address={opts.host}", f"--http-port={opts.http_port}",
            f"--metrics-address={opts.host}", f"--metrics-port={opts.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            f"--log-verbose={opts.log_verbose}",
            "--exit-timeout-secs=10",
        ]
        if opts.ssl_cert and opts.ssl_key:
            cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={opts.ssl_cert}",
                    f"--grpc-server-key={opts.ssl_key}"]
        env = dict(os.environ)
        # The stub runs the first python3 on PATH: make it this interpreter's environment.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(bundle.libs), env.get("LD_LIBRARY_PATH", "")) if p)
        log.info("starting %s", " ".join(cmd))
        with open(self._log_path, "ab") as log_fh:
            self.process = subprocess.Popen(
                cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        assert self.process is not None
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"tritonserver exited with code {code} before it was ready: "
                    f"{self._log_reason()}")
            fatal = self._fatal_log_line()
            if fatal:
                raise ServerStartError(f"tritonserver cannot start: {fatal}")
            if self.is_ready():
                log.info("tritonserver ready: gRPC %s, HTTP %s, metrics %s",
                         self.grpc_url, self.http_url, self.metrics_url)
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"tritonserver not ready after {self.options.ready_timeout:.0f} s "
                    f"(a wrong stub or a missing shared library hangs model loading): "
                    f"{self._log_reason()}")
            time.sleep(0.2)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + "/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _log_lines(self) -> list[str]:
        if not self._log_path or not self._log_path.exists():
            return []
        return self._log_path.read_text(errors="replace").splitlines()

    def _fatal_log_line(self) -> str:
        for line in self._log_lines():
            if any(p.search(line) for p in FATAL_PATTERNS):
                return line.strip()
        return ""

    def _log_reason(self) -> str:
        fatal = self._fatal_log_line()
        if fatal:
            return fatal
        tail = [ln.strip() for ln in self._log_lines() if ln.strip()][-3:]
        return " | ".join(tail) + f" (log: {self._log_path})" if tail else f"log: {self._log_path}"

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self, timeout: float = 20.0, *, keep_log: bool = False) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout``; clean its leftovers.

        ``keep_log`` keeps the working folder (and the log in it) for a failed start.
        """
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None:
            # Stubs live in the server's process group; make sure none outlives it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            remove_stale_shm()
        if self._workdir is not None and not (keep_log and self.options.log_file is None):
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "LocalTriton":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
