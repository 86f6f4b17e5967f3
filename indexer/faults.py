"""Fault injection at the store's write steps, for crash-consistency tests.

Every step that changes a store on disk calls :func:`point` with the step's
name just before it acts (``faults.point("segment.fsync")``: the bytes are
written, the fsync comes next). Unarmed, a point is one global lookup. Tests
arm one point at its *n*-th hit with one fault, the way database test suites
place faults at every step instead of at random times:

    kill        SIGKILL this process there (a crash, a power cut seen by SQLite)
    interrupt   raise KeyboardInterrupt there (Ctrl-C surfacing at that instant)
    error       raise :class:`InjectedFault`, an ``OSError`` (EIO) there

In-process with :func:`inject`; in a child process with the environment
variable ``MERT_INDEXER_FAULT=NAME[:N][:ACTION]`` (default hit 1, action kill),
read at import. :func:`record` counts the hits of a run, and
:func:`declared_points` reads every point name from the package's source, so
a suite can enumerate all of them and notice a point no scenario reaches. Hence
names must be string literals at the call site. A fault fires once, then the
point is disarmed (a handler that commits again after Ctrl-C is not hit twice).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENV = "MERT_INDEXER_FAULT"
ACTIONS = ("kill", "interrupt", "error")
_POINT_CALL = re.compile(r"""faults\.point\(\s*["']([\w.\-]+)["']\s*\)""")


class InjectedFault(OSError):
    """The error an ``error`` fault raises: an I/O error at that step."""

    def __init__(self, name: str) -> None:
        super().__init__(errno.EIO, f"injected fault at {name}")
        self.point = name


@dataclass
class Armed:
    """One armed point; ``fired`` tells a test whether the run reached it."""

    name: str
    nth: int = 1
    action: str = "kill"
    seen: int = 0
    fired: bool = False


_lock = threading.Lock()
_armed: Armed | None = None
_hits: collections.Counter[str] | None = None


def point(name: str) -> None:
    """A write step is about to happen; a fault armed here fires. No-op unless armed."""
    if _armed is None and _hits is None:
        return
    _hit(name)


def _hit(name: str) -> None:
    global _armed
    with _lock:
        if _hits is not None:
            _hits[name] += 1
        armed = _armed
        if armed is None or armed.name != name:
            return
        armed.seen += 1
        if armed.seen != armed.nth:
            return
        armed.fired = True
        _armed = None
    if armed.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if armed.action == "interrupt":
        raise KeyboardInterrupt(f"injected at {name}")
    raise InjectedFault(name)


@contextlib.contextmanager
def inject(name: str, nth: int = 1, action: str = "error") -> Iterator[Armed]:
    """Arm ``name`` at its ``nth`` hit with ``action`` for the ``with`` block."""
    global _armed
    if action not in ACTIONS:
        raise ValueError(f"fault action {action!r}: one of {', '.join(ACTIONS)}")
    armed = Armed(name, nth, action)
    with _lock:
        _armed = armed
    try:
        yield armed
    finally:
        with _lock:
            if _armed is armed:
                _armed = None


@contextlib.contextmanager
def record() -> Iterator[collections.Counter[str]]:
    """Count every point hit in the ``with`` block: name -> hits."""
    global _hits
    hits: collections.Counter[str] = collections.Counter()
    with _lock:
        _hits = hits
    try:
        yield hits
    finally:
        with _lock:
            _hits = None


def declared_points(root: Path | None = None) -> set[str]:
    """Every point name called in the package's source (``root``: the package folder)."""
    if root is None:
        root = Path(__file__).parents[1]  # the package (a link tree in strict editable mode)
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if path.name == "faults.py":  # its docstring's example is not a point
            continue
        with contextlib.suppress(OSError, UnicodeDecodeError):
            names.update(_POINT_CALL.findall(path.read_text()))
    return names


def _from_env() -> None:
    global _armed
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, *rest = spec.split(":")
    nth = int(rest[0]) if rest and rest[0] else 1
    action = rest[1] if len(rest) > 1 else "kill"
    if action not in ACTIONS:
        raise ValueError(f"{ENV}={spec!r}: action must be one of {', '.join(ACTIONS)}")
    _armed = Armed(name, nth, action)


_from_env()
