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
Liveness is a lock, not a process id: the owner holds an exclusive
``flock`` on each region file for as long as it lives, and the kernel drops
it when the owner dies, however it dies (``kill -9`` included).
:func:`remove_stale` deletes only regions whose lock it can take. A process
id would be wrong twice over: ids are reused, and containers sharing
``/dev/shm`` have separate id namespaces, so the id in a name can belong to
nobody, or to somebody else, here. A flock is on the file itself, so a live
owner in another namespace still holds it. (The id stays in the name, for
people.) Anything else is unlinked by :meth:`ShmRegion.close`, which the
sender calls in ``finally`` and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import mmap
import os
import re
import uuid
import weakref

import numpy as np

from mert_indexer.defaults import SHM_DIR
from mert_indexer.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "mert-indexer-"
_NAME = re.compile(re.escape(PREFIX) + r"\d+-[0-9a-f]+-\d+$")
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
        for _attempt in range(3):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # Held until close() or death: what remove_stale() reads as alive. A
                # cleaner may take the lock and unlink the file between its creation and
                # this line (it holds the lock only for that): then make it again.
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not _same_file(fd, path):
                    os.close(fd)
                    continue
                os.ftruncate(fd, self.byte_size)
                self._map: mmap.mmap | None = mmap.mmap(fd, self.byte_size)
                break
            except OSError:
                with contextlib.suppress(OSError):
                    if _same_file(fd, path):
                        path.unlink()
                os.close(fd)
                raise
        else:
            raise FileExistsError(f"{path} was removed three times while it was created")
        self._fd: int | None = fd
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
        if self._fd is not None:
            os.close(self._fd)  # releases the lock, after the unlink
            self._fd = None
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
    """Delete regions whose owner is gone: those whose lock nobody holds."""
    removed: list[str] = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.glob(PREFIX + "*"):
        if _NAME.match(path.name) and _remove_if_unowned(path):
            removed.append(path.name)
    if removed:
        log.info("removed %d shared-memory region(s) left by dead clients", len(removed))
    return removed


def _remove_if_unowned(path: os.PathLike[str]) -> bool:
    """Unlink ``path`` if its lock can be taken (its owner died); True if it was."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # gone already, or not ours to open (another user's)
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live owner, in whatever PID namespace
            return False
        if not _same_file(fd, path):  # not one made since under the same name
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _same_file(fd: int, path: os.PathLike[str]) -> bool:
    """True when ``path`` still names the file open at ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@atexit.register
def _close_all() -> None:
    for region in list(_live):
        region.close()
