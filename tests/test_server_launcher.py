"""The launcher's failure modes, each made to happen for real, and clean stops.

Every case starts the real bundled ``tritonserver`` (or the real
``indexer-serve`` console script) and breaks one real thing: the stub is
absent, the stub hangs, the stub is for another Python, the model file is
corrupt, a port is taken, a killed server left its shared memory behind.
"""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from mert_indexer.errors import ServerStartError
from mert_indexer.server import preflight
from mert_indexer.server.bundle import STUB_NAME, find_bundle, missing_libraries
from mert_indexer.server.launcher import LocalTriton
from tests.conftest import BIN, free_port, serve_options


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(text in arg for arg in (p.info["cmdline"] or [])):
            found.append(p)
    return found


def backend_dir(root: Path, stub: Path | str | None) -> Path:
    """A --backend-directory: the real backend library, and ``stub`` (a file or a script)."""
    bundle = find_bundle()
    python = root / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(bundle.python_backend / name, python / name)
    if isinstance(stub, Path):
        shutil.copy2(stub, python / STUB_NAME)
    elif isinstance(stub, str):
        (python / STUB_NAME).write_text(stub)
        (python / STUB_NAME).chmod(0o755)
    return root


def start_fails(options) -> tuple[str, float]:
    """Start, expect :class:`ServerStartError`; its message and how long it took."""
    server = LocalTriton(options)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        server.start()
    elapsed = time.monotonic() - t0
    assert server.process is None
    return str(info.value), elapsed


def test_missing_stub_is_named(tiny_repo, tmp_path):
    backends = backend_dir(tmp_path / "backends", stub=None)
    message, elapsed = start_fails(replace(serve_options(tiny_repo), backend_directory=backends))
    assert "the Python backend stub is missing" in message
    assert str(backends) in message and "full log:" in message
    assert elapsed < 30
    assert not processes_mentioning(str(backends))


def test_hanging_stub_hits_our_ready_timeout_and_is_killed(tiny_repo, tmp_path):
    # A stub that never connects: what a wrong stub or a missing library looks like to Triton.
    hang = f"#!{sys.executable}\nimport time\ntime.sleep(600)\n"
    backends = backend_dir(tmp_path / "backends", stub=hang)
    options = replace(serve_options(tiny_repo), backend_directory=backends, ready_timeout=5)
    message, elapsed = start_fails(options)
    assert "not ready after 5 s (model mert:1 still loading), stopped it" in message
    assert "loading: mert:1" in message  # the log excerpt
    log = Path(message.rsplit("full log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "loading: mert:1" in log.read_text()
    log.unlink()
    assert 5 <= elapsed < 30
    assert not processes_mentioning(str(backends)), "the hanging stub outlived the server"


def test_stub_for_another_python_names_the_missing_library(tiny_repo, tmp_path):
    bundle = find_bundle()
    other = [
        v
        for v in bundle.available_stubs()
        if v != f"{sys.version_info[0]}.{sys.version_info[1]}"
        and missing_libraries(
            bundle.root / "python_backend_stubs" / v / STUB_NAME, str(bundle.libs)
        )
    ]
    if not other:
        pytest.skip("every bundled stub's libpython is installed here")
    stub = bundle.root / "python_backend_stubs" / other[0] / STUB_NAME
    backends = backend_dir(tmp_path / "backends", stub=stub)
    message, elapsed = start_fails(
        replace(serve_options(tiny_repo), backend_directory=backends, ready_timeout=60)
    )
    assert "the Python backend stub cannot start" in message
    assert f"libpython{other[0]}" in message
    assert elapsed < 30  # found in the log, not by waiting for the deadline


def test_corrupt_model_makes_triton_exit_1_with_the_reason(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    for onnx_file in repo.glob("mert/*/model.onnx"):
        onnx_file.write_bytes(b"\x08\x07this is not an ONNX protobuf")
    message, _ = start_fails(serve_options(repo))
    assert "exited with code 1" in message
    assert "model 'mert' failed to load" in message and "model.onnx" in message
    assert "Traceback" not in message and "\\n" not in message


@pytest.mark.parametrize("flag", ["grpc_port", "http_port", "metrics_port"])
def test_port_in_use_is_named_before_anything_starts(tiny_repo, flag):
    options = serve_options(tiny_repo)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", getattr(options, flag)))
        taken.listen()
        message, elapsed = start_fails(options)
    assert f"port {getattr(options, flag)} (--{flag.replace('_', '-')})" in message
    assert "not available" in message
    assert elapsed < 5


def test_port_shared_with_so_reuseport_is_refused(tiny_repo):
    # gRPC listens with SO_REUSEPORT: a second Triton on the same gRPC port would
    # start and silently share it. Our check binds without it, so it is refused.
    options = serve_options(tiny_repo)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", options.grpc_port))
        taken.listen()
        message, _ = start_fails(options)
    assert f"port {options.grpc_port} (--grpc-port)" in message


def test_port_taken_after_the_check_is_named(tiny_repo, monkeypatch):
    # The race the check cannot close: another process binds between check and start.
    monkeypatch.setattr(preflight, "check_ports", lambda host, ports: None)
    options = serve_options(tiny_repo)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", options.grpc_port))
        taken.listen()
        message, elapsed = start_fails(options)
    assert f"port {options.grpc_port} was taken by another process" in message
    assert "exited with code 1" in message and elapsed < 30


def test_shared_memory_of_a_killed_server_is_removed_at_the_next_start(tiny_repo):
    first = LocalTriton(serve_options(tiny_repo))
    first.start()
    pgid = first.process.pid
    regions = [
        p
        for p in preflight.SHM_DIR.glob(preflight.SHM_PREFIX + "*")
        if any(
            p.name in " ".join(q.info["cmdline"] or [])
            for q in psutil.process_iter(["cmdline"])
            if _pgid(q) == pgid
        )
    ]
    assert regions, "the Python backend stub names its region on its command line"
    os.killpg(pgid, signal.SIGKILL)  # kill -9 everything: nothing gets to clean up
    first.process.wait()
    first.process = None
    first.stop()
    time.sleep(0.5)
    assert all(r.exists() for r in regions), "a killed server leaves its regions behind"
    old = time.time() - 3600
    for r in regions:
        os.utime(r, (old, old))
    # Our own decoys: one mapped by a live process (this one), one too young to judge.
    mapped = preflight.SHM_DIR / f"{preflight.SHM_PREFIX}test-mapped-{uuid.uuid4()}"
    young = preflight.SHM_DIR / f"{preflight.SHM_PREFIX}test-young-{uuid.uuid4()}"
    mapped.write_bytes(b"\0" * 4096)
    young.write_bytes(b"\0" * 4096)
    os.utime(mapped, (old, old))
    with open(mapped, "r+b") as fh, mmap.mmap(fh.fileno(), 4096) as _held:
        second = LocalTriton(serve_options(tiny_repo))
        try:
            second.start()
            assert not any(r.exists() for r in regions)
            assert mapped.exists() and young.exists()
        finally:
            second.stop()
            mapped.unlink()
            young.unlink()


def _pgid(p: psutil.Process) -> int:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return -1


def test_stop_leaves_no_process_region_or_file(tiny_repo):
    server = LocalTriton(serve_options(tiny_repo))
    server.start()
    pgid = server.process.pid
    group = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    assert len(group) >= 2  # the server and at least one stub
    from mert_indexer.server.launcher import _group_regions

    regions = _group_regions(pgid)
    log, workdir = server.log_path, server._workdir
    server.stop()
    server.stop()  # idempotent
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert regions and not any((preflight.SHM_DIR / r).exists() for r in regions)
    assert not workdir.exists() and not log.exists()


def test_killed_launcher_takes_the_server_down(tiny_repo, tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from mert_indexer.server.launcher import LocalTriton\n"
        "from tests.conftest import serve_options\n"
        f"s = LocalTriton(serve_options(Path({str(tiny_repo)!r})))\n"
        "s.start()\n"
        "print(s.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    server_pid = 0
    try:
        server_pid = int(proc.stdout.readline())
        server = psutil.Process(server_pid)
        proc.kill()  # kill -9: no finally, no atexit in the launcher
        proc.wait()
        server.wait(timeout=30)  # PR_SET_PDEATHSIG delivered SIGTERM
        deadline = time.monotonic() + 15
        while _group_members(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_members(server_pid), "stubs outlived their server"
    finally:
        if proc.poll() is None:
            proc.kill()
        if server_pid and _group_members(server_pid):  # the test failed: clean up after it
            os.killpg(server_pid, signal.SIGKILL)


def _group_members(pgid: int) -> list[psutil.Process]:
    return [
        p for p in psutil.process_iter() if _pgid(p) == pgid and p.status() != psutil.STATUS_ZOMBIE
    ]


def serve_cmd(repo: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "indexer-serve"),
        "--model-repository",
        str(repo),
        "--device",
        "cpu",
        "--grpc-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        *extra,
    ]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_indexer_serve_stops_cleanly_on_signal(tiny_repo, sig):
    proc = subprocess.Popen(
        serve_cmd(tiny_repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready: gRPC 127.0.0.1:"), line + proc.stderr.read()
        children = psutil.Process(proc.pid).children(recursive=True)
        names = {c.name() for c in children}
        assert "tritonserver" in names and any("stub" in n for n in names), names
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        time.sleep(0.2)
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left running: {alive}"
        assert "error" not in proc.stderr.read().lower()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_indexer_serve_reports_a_server_that_dies_under_it(tiny_repo):
    proc = subprocess.Popen(
        serve_cmd(tiny_repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().startswith("ready:")
        children = psutil.Process(proc.pid).children(recursive=True)
        (server,) = [c for c in children if c.name() == "tritonserver"]
        server.kill()
        assert proc.wait(timeout=60) == 1
        errors = [
            ln for ln in proc.stderr.read().splitlines() if ln.startswith("indexer-serve: error:")
        ]
        assert len(errors) == 1 and "tritonserver was killed by SIGKILL" in errors[0], errors
        time.sleep(0.2)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        log = Path(errors[0].rsplit("full log: ", 1)[1].rstrip(")"))
        assert log.is_file()
        log.unlink()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_indexer_serve_failure_is_one_clear_line(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    for onnx_file in repo.glob("mert/*/model.onnx"):
        onnx_file.write_bytes(b"garbage")
    proc = subprocess.run(serve_cmd(repo), check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("indexer-serve: error:")]
    assert len(errors) == 1, proc.stderr
    assert "model 'mert' failed to load" in errors[0] and "Traceback" not in proc.stderr
    log = Path(errors[0].rsplit("full log: ", 1)[1].rstrip(")"))
    assert log.is_file()
    log.unlink()


def test_indexer_serve_refuses_a_taken_port(tiny_repo):
    cmd = serve_cmd(tiny_repo)
    port = int(cmd[cmd.index("--http-port") + 1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"indexer-serve: error: port {port} (--http-port)" in proc.stderr
