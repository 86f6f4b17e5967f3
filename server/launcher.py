"""Start, watch and stop the bundled Triton server.

Over the ~400-line norm: each of Triton's failure modes (hang, missing stub,
port taken, stale regions) needs its detection next to the start sequence.

Triton's own failure modes are turned into a :class:`ServerStartError` that
names the cause, never a hang: a model that fails to load (Triton exits 1), a
missing stub (a log line), a wrong stub or a missing shared library (Triton
waits for the stub forever: our own ready deadline, then kill and report),
ports already taken, and regions in /dev/shm left by killed servers. Every
process the server starts lives in its process group and dies with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mert_indexer.defaults import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_MODEL_REPOSITORY,
)
from mert_indexer.errors import ServerStartError
from mert_indexer.server import local_repo, preflight
from mert_indexer.server.bundle import check_stub_loads, find_bundle, library_path, prepare_backends

log = logging.getLogger(__name__)

# Log lines that mean the server will never become ready: what to tell the user, and
# whether Triton exits by itself after it (else it waits for the stub forever).
# The first that matches a line names the cause, so the specific come before the general.
FATAL_PATTERNS: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (
        re.compile(r"Unable to find '[^']*stub'|stub is not found"),
        "the Python backend stub is missing",
        True,
    ),
    (
        re.compile(r"error while loading shared libraries"),
        "the Python backend stub cannot start (wrong stub, or a shared library is missing)",
        False,
    ),
    (re.compile(r"failed to load '([^']*)' version (\d+): "), "model '{0}' failed to load", True),
    (
        re.compile(r"'[^']*:(\d+)'.*Address already in use"),
        (
            "port {0} was taken by another process after the start-up check (start again, or "
            "choose other ports)"
        ),
        True,
    ),
    (
        re.compile(r"failed to start [A-Za-z]+ service|already in use"),
        "a server endpoint failed to start",
        True,
    ),
)
# Error lines that every start on a machine without a GPU logs.
BENIGN_ERRORS = (re.compile(r"CudaDriverHelper has not been initialized"),)
LOADING = re.compile(r"loading: ([^:\s\"]+):(\d+)")
LOADED = re.compile(r"successfully loaded '([^']+)'")
# Triton's log prefix: "E1127 21:20:22.214948 7204 file.cc:123] ".
LOG_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+ \d+ [\w.]+:\d+\] ")
PR_SET_PDEATHSIG = 1
FATAL_EXIT_GRACE = 10.0  # seconds Triton may take to exit after a fatal log line


@dataclass(frozen=True)
class ServeOptions:
    """How to serve: which repository, where to listen, which device, how long to wait."""

    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    host: str = "127.0.0.1"  # loopback only: exposing the server is an explicit choice
    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    device: str = "auto"  # auto | cpu | cuda
    ready_timeout: float = 180.0
    log_file: Path | None = None
    log_verbose: int = 0
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    # A prepared --backend-directory (python/ with libtriton_python.so and the
    # stub) instead of the one assembled from the bundle for this Python.
    backend_directory: Path | None = None


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


def describe_exit(code: int) -> str:
    """``exited with code 1``, or ``was killed by SIGSEGV`` for a negative return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _die_with_parent() -> None:
    """In the child: SIGTERM when the launching thread dies: a killed launcher leaves no server."""
    if _PRCTL is not None:
        with contextlib.suppress(Exception):
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


_PRCTL: Callable[..., int] | None
try:  # resolved here, not in the forked child, where loading a library may deadlock
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _PRCTL = None


def _group_regions(pgid: int) -> set[str]:
    """Shared-memory regions mapped by, or named to, the processes of group ``pgid``."""
    regions: set[str] = set()
    prefix = preflight.SHM_PREFIX
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            if os.getpgid(int(proc.name)) != pgid:
                continue
            for arg in (proc / "cmdline").read_bytes().split(b"\0"):
                if arg.startswith(prefix.encode()):
                    regions.add(arg.decode())
            for line in (proc / "maps").read_text(errors="replace").splitlines():
                if prefix in line:
                    regions.add(line.rsplit("/", 1)[-1].split(" ")[0])
    return regions


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LogWatch:
    """Reads the server log as it grows and keeps the lines that explain a failure."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = ""
        self.fatal = ""
        self.exits = False  # Triton exits by itself after the fatal line
        self.errors: list[str] = []
        self.tail: list[str] = []
        self.loading: dict[str, str] = {}  # model -> version, loading and not yet loaded

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except OSError:
            return
        self._offset += len(chunk)
        lines = (self._partial + chunk.decode(errors="replace")).split("\n")
        self._partial = lines.pop()
        for raw in lines:
            raw = raw.strip()
            self._line(_strip(raw), is_error=bool(LOG_PREFIX.match(raw)) and raw[0] in "EF")

    def _line(self, line: str, *, is_error: bool) -> None:
        if not line or line[0] in "+|":  # Triton's option tables
            return
        self.tail = ([*self.tail, line])[-3:]
        if m := LOADING.search(line):
            self.loading[m.group(1)] = m.group(2)
        elif m := LOADED.search(line):
            self.loading.pop(m.group(1), None)
        if is_error and not any(p.search(line) for p in BENIGN_ERRORS):
            self.errors = ([*self.errors, line])[-3:]
        for pattern, meaning, exits in FATAL_PATTERNS:
            if not self.fatal and (m := pattern.search(line)):
                self.exits = exits
                if "port {0}" in meaning:  # gRPC's own line is a long nested dump
                    self.fatal = meaning.format(*m.groups())
                    break
                # "model 'x' failed to load" is said already: keep only Triton's reason.
                detail = line[m.end() :] if m.groups() else line
                self.fatal = f"{meaning.format(*m.groups())}: {_first_line(detail)}"
                break

    def excerpt(self) -> str:
        """The error lines, else the last lines, as one line."""
        lines = self.errors or self.tail
        return " | ".join(_first_line(ln) for ln in lines) if lines else "(the log is empty)"

    def still_loading(self) -> str:
        return ", ".join(f"{m}:{v}" for m, v in sorted(self.loading.items()))


def _strip(line: str) -> str:
    """A log line without Triton's prefix and quotes."""
    text = LOG_PREFIX.sub("", line.strip())
    if len(text) > 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return text


def _first_line(text: str) -> str:
    """Drop the Python traceback Triton appends (escaped newlines) and trailing noise."""
    return text.split("\\n")[0].strip()


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
        self._keep_log = False
        self._lease: preflight.ShmLease | None = None  # marks our regions live (preflight)

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
        """Start the server and return once every model is loaded (and warmed up)."""
        if self.process is not None:
            raise ServerStartError("this server is already running")
        opts = self.options
        self._keep_log = False
        preflight.check_ports(
            opts.host,
            {
                "--grpc-port": opts.grpc_port,
                "--http-port": opts.http_port,
                "--metrics-port": opts.metrics_port,
            },
        )
        bundle = find_bundle()
        provider = resolve_provider(opts.device)
        self._workdir = Path(tempfile.mkdtemp(prefix="indexer-serve-"))
        try:
            ld_path = library_path(bundle, os.environ.get("LD_LIBRARY_PATH", ""))
            if opts.backend_directory is not None:
                backends = opts.backend_directory
            else:
                backends = prepare_backends(bundle, self._workdir / "backends")
                check_stub_loads(backends, ld_path)
            repo = self._workdir / "repository"
            self.models = local_repo.derive(opts.model_repository, repo, provider=provider)
            preflight.remove_stale_shm()
            self._lease = preflight.ShmLease.acquire()
            self._log_path = opts.log_file or self._temp_log()
            cmd = [
                str(bundle.binary),
                f"--model-repository={repo}",
                f"--backend-directory={backends}",
                f"--grpc-address={opts.host}",
                f"--grpc-port={opts.grpc_port}",
                f"--http-address={opts.host}",
                f"--http-port={opts.http_port}",
                f"--metrics-address={opts.host}",
                f"--metrics-port={opts.metrics_port}",
                # GPU metrics go through DCGM, which the bundle cannot count on; nvidia-smi can.
                "--allow-metrics=true",
                "--allow-gpu-metrics=false",
                f"--log-verbose={opts.log_verbose}",
                "--exit-timeout-secs=10",
                f"--backend-config=python,shm-region-prefix-name={self._lease.prefix}",
            ]
            if opts.ssl_cert and opts.ssl_key:
                cmd += [
                    "--grpc-use-ssl=true",
                    f"--grpc-server-cert={opts.ssl_cert}",
                    f"--grpc-server-key={opts.ssl_key}",
                ]
            env = dict(os.environ)
            # The stub runs the first python3 on PATH: make it this interpreter's environment.
            env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
            env["LD_LIBRARY_PATH"] = ld_path
            log.info("starting %s", " ".join(cmd))
            in_main = threading.current_thread() is threading.main_thread()
            with open(self._log_path, "ab") as log_fh:
                self.process = subprocess.Popen(
                    cmd,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # its own group: Ctrl-C reaches us, we stop it in order
                    # The death signal follows the forking thread: only tie it to the main one.
                    preexec_fn=_die_with_parent if (_PRCTL and in_main) else None,
                    pass_fds=(self._lease.fd,) if self._lease.fd is not None else (),
                )
            self._wait_ready()
        except BaseException as exc:
            # Keep the log for a failure, not for Ctrl-C during the start.
            self.stop(keep_log=isinstance(exc, Exception))
            raise

    def _wait_ready(self) -> None:
        assert self.process is not None and self._log_path is not None
        watch = _LogWatch(self._log_path)
        timeout = self.options.ready_timeout
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            watch.poll()
            if code is not None:
                reason = watch.fatal or watch.excerpt()
                raise ServerStartError(
                    f"tritonserver {describe_exit(code)} before it was ready: {reason}"
                    f"{self._log_hint()}"
                )
            if watch.fatal:
                # Triton exits by itself once loading is over (1 when a model failed);
                # give it a moment so that the message can say so, then stop it.
                try:
                    self.process.wait(timeout=FATAL_EXIT_GRACE if watch.exits else 0.5)
                except subprocess.TimeoutExpired:
                    raise ServerStartError(
                        f"tritonserver cannot start: {watch.fatal}{self._log_hint()}"
                    ) from None
                continue
            if self.is_ready():
                log.info(
                    "tritonserver ready: gRPC %s, HTTP %s, metrics %s",
                    self.grpc_url,
                    self.http_url,
                    self.metrics_url,
                )
                return
            if time.monotonic() > deadline:
                loading = watch.still_loading()
                state = f"model {loading} still loading" if loading else "not ready"
                raise ServerStartError(
                    f"tritonserver not ready after {timeout:g} s ({state}), stopped it: "
                    f"a wrong Python backend stub or a missing shared library makes loading "
                    f"wait forever; a slow model needs a longer --ready-timeout; last log: "
                    f"{watch.excerpt()}{self._log_hint()}"
                )
            time.sleep(0.2)

    def _log_hint(self) -> str:
        return f" (full log: {self._log_path})" if self._log_path else ""

    @staticmethod
    def _temp_log() -> Path:
        """A log outside the work folder, so that it can outlive a failed start."""
        fd, path = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(fd)
        return Path(path)

    def is_ready(self) -> bool:
        """``/v2/health/ready``: every model loaded (Triton runs with strict readiness)."""
        try:
            with urllib.request.urlopen(self.http_url + "/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        assert self.process is not None
        return self.process.wait()

    def log_excerpt(self) -> str:
        """The log lines that explain why the server stopped (after :meth:`wait`)."""
        if self._log_path is None:
            return ""
        watch = _LogWatch(self._log_path)
        watch.poll()
        return watch.fatal or watch.excerpt()

    def stop(self, timeout: float = 20.0, *, keep_log: bool = False) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; no process, region or temp folder left.

        Idempotent, and safe after a failed start. ``keep_log`` keeps a log we
        chose the path of (an error message names it); a ``log_file`` always stays.
        """
        proc, self.process = self.process, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the group is the server's pid
            regions = _group_regions(pgid)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver ignored SIGTERM for %.0f s: killing it", timeout)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    proc.wait()
            # Stubs (and anything they started) share the group: none outlives the server.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            for _ in range(50):
                if not _group_alive(pgid):
                    break
                time.sleep(0.1)
            for name in regions:
                with contextlib.suppress(OSError):
                    (preflight.SHM_DIR / name).unlink()
        if self._lease is not None:  # after the server and its regions are gone
            self._lease.release()
            self._lease = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._keep_log = self._keep_log or keep_log
        if self._log_path and self.options.log_file is None and not self._keep_log:
            with contextlib.suppress(OSError):
                self._log_path.unlink()

    def __enter__(self) -> LocalTriton:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
