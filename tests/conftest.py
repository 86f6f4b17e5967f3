"""Shared fixtures: a tiny exported model, a real Triton serving it, generated audio."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_tiny(output: Path, *extra: str) -> Path:
    """Run the real exporter on the tiny random-init model into ``output``."""
    cmd = [
        sys.executable,
        str(ROOT / "export" / "to_onnx.py"),
        "--random-init",
        "--size",
        "tiny",
        "--output",
        str(output),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return output


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("repo") / "model_repository")


def serve_options(repo: Path, **kw):
    from mert_indexer.server.launcher import ServeOptions

    return ServeOptions(
        model_repository=repo,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        device="cpu",
        ready_timeout=120,
        **kw,
    )


@pytest.fixture(scope="session")
def triton(tiny_repo: Path):
    """The bundled Triton server serving the tiny model (one per test session)."""
    from mert_indexer.server.launcher import LocalTriton

    server = LocalTriton(serve_options(tiny_repo))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six generated tracks, 16-30 s, in wav, flac, ogg and mp3."""
    from mert_indexer.client.synth import write_catalogue

    return write_catalogue(tmp_path_factory.mktemp("originals"), 6, seconds=(16, 30))


def run_cli(
    name: str, *args: str, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts."""
    return subprocess.run(
        [str(BIN / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def window_set(index: Path) -> list[tuple[str, int]]:
    """Every committed (track path, window start) of the store at ``index``, sorted."""
    from mert_indexer.indexer.store import IndexStore

    with IndexStore.open(index, None, create=False) as store:
        return sorted((t.path, int(s)) for t, starts, _ in store.iter_windows() for s in starts)
