"""Locate the Triton server bundled in the ``nvidia-pytriton`` wheel and prepare its Python backend.

The wheel ships ``tritonserver`` with only the Python backend, and keeps the
backend's stub (one per Python version) apart from ``libtriton_python.so``.
The backend looks for the stub beside the library, so a backend directory is
assembled once per server start, with the stub that matches this Python.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from indexer.errors import ServerStartError

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
    for src in (bundle.python_backend / "libtriton_python.so",
                bundle.python_backend / "triton_python_backend_utils.py",
                stub):
        shutil.copy2(src, python_dir / src.name)
    return dest
