"""The service's background loops (index watcher, Triton checker): check, wait, repeat."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def keep_checking(
    check: Callable[[], None], stop: threading.Event, pause: Callable[[], object], what: str
) -> None:
    """Call ``check`` until ``stop`` is set, ``pause()`` between calls.

    An error in one check is logged, never fatal: a watcher must outlive any
    one bad generation or odd answer.
    """
    while not stop.is_set():
        try:
            check()
        except Exception:
            log.exception("%s: unexpected error", what)
        pause()
