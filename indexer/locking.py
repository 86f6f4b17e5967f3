"""The one-writer lock of a store: ``LOCK``, flock()ed, with an owner record.

One process at a time may hold a store open for writing. ``flock`` is what
excludes a second writer on a local filesystem; the owner record (host, pid,
a random token) written into ``LOCK`` lets a writer notice, at its next
commit, that a lock which only excludes within one machine let another
machine's writer in (:meth:`mert_indexer.indexer.store.IndexStore.commit`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from mert_indexer.errors import StoreError

LOCK_FILE = "LOCK"
# Set to 1 only where one writer per store is guaranteed otherwise: opens a store on a
# filesystem whose flock() excludes nothing (the owner record still fences commits).
UNSAFE_LOCK_ENV = "MERT_INDEXER_UNSAFE_NO_FLOCK"


def take_lock(root: Path) -> tuple[int, str]:
    """Hold ``root/LOCK`` for this process: one writer per store; (descriptor, owner token).

    ``flock`` first. A filesystem where it excludes nothing (some NFS, SMB and
    FUSE mounts) is caught by a second descriptor that must fail to lock, and
    refused. Then the owner record (host, pid, a random token) is written into
    ``LOCK``; :meth:`IndexStore.commit` checks it is still ours (locks that
    exclude on one machine only let a writer on another one in: the older
    writer then stops). Git guards its ``index.lock`` by exclusive creation
    instead; that needs a crashed writer's lock removed by hand, this does not.
    """
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the store for writing: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            record = read_owner(path)
            who = f" (host {record['host']}, pid {record['pid']})" if "pid" in record else ""
            raise StoreError(
                f"{root}: another process is writing this store{who} ({path} is locked)"
            ) from exc
        if not flock_excludes(path) and os.environ.get(UNSAFE_LOCK_ENV) != "1":
            raise StoreError(
                f"{root}: this filesystem's flock() does not exclude a second writer, so two "
                "writers could interleave their rows; use a local filesystem, or one that "
                f"supports locks (one writer per store; {UNSAFE_LOCK_ENV}=1 overrides)"
            )
        token = uuid.uuid4().hex
        record_bytes = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "at": time.time()}
        ).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record_bytes, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, token


def flock_excludes(path: Path) -> bool:
    """Whether a second open file description fails to lock ``path`` (it must)."""
    probe = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(probe)
    return False


def read_owner(path: Path) -> dict[str, Any]:
    """The owner record in ``LOCK`` (read anew: a network filesystem revalidates on open)."""
    try:
        record = json.loads(path.read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
