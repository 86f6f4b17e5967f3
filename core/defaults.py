"""Defaults that more than one part of the project shares, and how a CLI reads a default.

Each default lives in one place: in the options dataclass of the module that
uses it (argparse reads it from there with :func:`default_of`), or, when the
server and the client must agree on it, here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

DEFAULT_GRPC_PORT = 8001  # Triton's own defaults
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8002
DEFAULT_SERVER = f"localhost:{DEFAULT_GRPC_PORT}"
DEFAULT_MODEL_REPOSITORY = Path("model_repository")
SHM_DIR = Path("/dev/shm")  # POSIX shared memory on Linux: the client's and Triton's regions


def add_defaulted(
    parser: Any, flag: str, options_class: type, name: str, help: str, **kwargs: Any
) -> None:
    """``parser.add_argument(flag, ...)`` defaulting to ``options_class.name``, said in help."""
    kwargs.setdefault("type", type(default_of(options_class, name)))
    parser.add_argument(
        flag,
        default=default_of(options_class, name),
        help=f"{help} (default: %(default)s)",
        **kwargs,
    )


def default_of(options_class: type, name: str) -> Any:
    """The default of field ``name`` of a dataclass, for an argparse ``default=``."""
    for field in dataclasses.fields(options_class):
        if field.name == name:
            if field.default is not dataclasses.MISSING:
                return field.default
            if field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
            raise TypeError(f"{options_class.__name__}.{name} has no default")
    raise TypeError(f"{options_class.__name__} has no field {name!r}")
