"""Locate the Triton server bundled in the ``nvidia-pytriton`` wheel and prepare its Python backend.

The wheel ships ``tritonserver`` with only the Python backend, and keeps the
backend's stub (one per Python version) apart from ``libtriton_python.so``.
The backend looks for the stub beside the library, so a backend directory is
assembled once per server start, with the stub that matches this Python.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from mert_indexer.errors import ServerStartError

STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonBundle:
    root: Path  # .../site-packages/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def libs(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def stub_for(self, version: tuple[int, int]) -> Path:
        return self.root / "python_backend_stubs" / f"{version[0]}.{version[1]}" / STUB_NAME

    def available_stubs(self) -> list[str]:
        stubs = self.root / "python_backend_stubs"
        return sorted(p.parent.name for p in stubs.glob(f"*/{STUB_NAME}"))


def find_bundle() -> TritonBundle:
    """The bundled Triton, or a ServerStartError that names the install command."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServerStartError(
            "the local Triton server is not installed: pip install 'mert-indexer[server]' "
            "(it brings nvidia-pytriton, which ships the tritonserver binary)"
        )
    bundle = TritonBundle(Path(spec.origin).parent / "tritonserver")
    if not bundle.binary.is_file():
        raise ServerStartError(f"tritonserver binary missing at {bundle.binary}")
    return bundle


def prepare_backends(bundle: TritonBundle, dest: Path) -> Path:
    """Assemble ``dest/python`` with the backend library, its utils and the matching stub.

    Returns the directory to pass as ``--backend-directory``.
    """
    version = sys.version_info[:2]
    stub = bundle.stub_for(version)
    if not stub.is_file():
        raise ServerStartError(
            f"the bundled Triton has no Python backend stub for Python "
            f"{version[0]}.{version[1]} (it has: {', '.join(bundle.available_stubs())}); "
            "run indexer-serve from one of those Python versions"
        )
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (
        bundle.python_backend / "libtriton_python.so",
        bundle.python_backend / "triton_python_backend_utils.py",
        stub,
    ):
        shutil.copy2(src, python_dir / src.name)
    return dest


def python_libdir() -> str | None:
    """The folder holding this interpreter's ``libpython`` (the stub links against it)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = sysconfig.get_config_var("LIBDIR")
    return libdir if libdir and os.path.isdir(libdir) else None


def library_path(bundle: TritonBundle, inherited: str = "") -> str:
    """``LD_LIBRARY_PATH`` for the server and its stubs: bundled libs, then this Python's."""
    parts = [str(bundle.libs), python_libdir() or "", inherited]
    return os.pathsep.join(p for p in parts if p)


def missing_libraries(binary: Path, ld_library_path: str) -> list[str]:
    """Shared libraries ``binary`` cannot find, by ``ldd``; [] when ldd itself is unavailable.

    A stub that cannot load leaves Triton waiting for it until our ready
    deadline; naming the library before the start is quicker and clearer.
    """
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    try:
        out = subprocess.run(
            [ldd, str(binary)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "LD_LIBRARY_PATH": ld_library_path},
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def check_stub_loads(backends: Path, ld_library_path: str) -> None:
    """Raise :class:`ServerStartError` naming the libraries the prepared stub lacks."""
    stub = backends / "python" / STUB_NAME
    missing = missing_libraries(stub, ld_library_path) if stub.is_file() else []
    if missing:
        raise ServerStartError(
            f"the Python backend stub {stub} cannot load {', '.join(missing)} "
            "(install the shared library, e.g. libpython for this Python version, "
            "or run indexer-serve from a Python built with --enable-shared)"
        )
