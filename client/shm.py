"""POSIX shared-memory regions that hold request batches for a Triton server on this host.

With system shared memory a request carries only a region name and a byte
count; the server reads the samples straight from the region instead of
receiving them over gRPC (measured here: see docs/client.md). Each in-flight
request slot owns one region, created and registered once; the pipeline
writes windows directly into the region's numpy view, so a batch is never
copied on the client.

Regions are files under ``/dev/shm`` mapped with :mod:`mmap`, which is what
``tritonclient.utils.shared_memory`` does through its C helper; that module
is not used because tritonclient 2.51 imports ``pkg_resources`` there, which
setuptools >= 81 no longer ships (the import fails in a fresh environment).
Region names carry the process id: :func:`remove_stale` deletes regions of
processes that died without cleaning up (``kill -9``); anything else is
unlinked by :meth:`ShmRegion.close`, which the sender calls in ``finally``
and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import re
import uuid
import weakref
from pathlib import Path

import numpy as np

from mert_indexer.errors import ConfigError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "mert-indexer-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-[0-9a-f]+-\d+$")
_live: weakref.WeakSet[ShmRegion] = weakref.WeakSet()


class ShmRegion:
    """One named region of ``shape`` elements of ``dtype``, exposed as :attr:`array`."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.name = name
        self.key = "/" + name  # the shm_open name Triton opens
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.byte_size = int(np.prod(shape)) * self.dtype.itemsize
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.byte_size)
            self._map: mmap.mmap | None = mmap.mmap(fd, self.byte_size)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        os.close(fd)
        self.array: np.ndarray = np.frombuffer(self._map, dtype=self.dtype).reshape(shape)
        _live.add(self)

    def close(self) -> None:
        """Unmap and unlink; safe to call twice."""
        if self._map is None:
            return
        self.array = np.zeros((0,), self.dtype)
        with contextlib.suppress(BufferError):  # a view still alive: the OS unmaps at exit
            self._map.close()
        self._map = None
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / self.name).unlink()
        _live.discard(self)


def available() -> bool:
    """True when this host has a writable ``/dev/shm`` (Linux)."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def create_regions(count: int, shape: tuple[int, ...], dtype: str) -> list[ShmRegion]:
    """``count`` fresh regions with unique names; all or none."""
    if not available():
        raise ConfigError(f"system shared memory needs a writable {SHM_DIR} (Linux only)")
    remove_stale()
    tag = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    regions: list[ShmRegion] = []
    try:
        for i in range(count):
            regions.append(ShmRegion(f"{tag}-{i}", shape, dtype))
    except OSError as exc:
        for r in regions:
            r.close()
        raise ConfigError(
            f"cannot create a {np.prod(shape) * np.dtype(dtype).itemsize} byte "
            f"shared-memory region in {SHM_DIR}: {exc.strerror}"
        ) from None
    return regions


def remove_stale() -> list[str]:
    """Delete regions left by client processes that no longer exist."""
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.glob(PREFIX + "*"):
        m = _NAME.match(path.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
    if removed:
        log.info("removed %d shared-memory region(s) left by dead clients", len(removed))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _close_all() -> None:
    for region in list(_live):
        region.close()
