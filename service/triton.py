"""The service's link to Triton: connect in the background, watch health, infer at query priority.

The service starts whether or not Triton is up. A checker thread connects
(reading the served model's contract, :meth:`TritonPool.connect`) and then
re-reads it every ``health_seconds``: a server that stops answering marks the
link down (queries get a 503 at once instead of waiting), one that comes back
-- even restarted with another model -- is picked up by the next check. A
query whose inference fails as unavailable marks the link down too.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from mert_indexer.client.triton_io import ConnectOptions, TritonPool
from mert_indexer.contract import ModelContract
from mert_indexer.errors import IndexerError
from mert_indexer.service.periodic import keep_checking

log = logging.getLogger(__name__)


class TritonLink:
    """A :class:`TritonPool` kept connected, with the served contract and whether it is up."""

    def __init__(self, options: ConnectOptions, *, health_seconds: float, priority: int) -> None:
        self.options = options
        self.priority = priority
        self._health_seconds = health_seconds
        self._pool = TritonPool(options)
        self._contract: ModelContract | None = None
        self._up = False
        self.problem: str | None = "not connected to Triton yet"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def contract(self) -> ModelContract | None:
        """The served model's contract while Triton answers, else ``None``."""
        return self._contract if self._up else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="triton-checker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.options.deadline_seconds + 10)
        self._pool.close()

    def check(self) -> None:
        """Read the served model's contract once (waits up to the pool's retry deadline)."""
        try:
            contract = self._pool.connect()
        except IndexerError as exc:
            if self._up or self.problem != str(exc):
                log.warning("Triton is unavailable: %s", exc)
            self._up, self.problem = False, str(exc)
            return
        if not self._up:
            log.info(
                "Triton at %s serves %s (%s)",
                ", ".join(self.options.servers),
                contract.model_id,
                contract.fingerprint(),
            )
        self._contract, self._up, self.problem = contract, True, None

    def mark_down(self, reason: str) -> None:
        """A query found Triton unavailable: fail fast until the next check finds it back."""
        self._up, self.problem = False, reason
        self._wake.set()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Embed a batch of wire-dtype windows at the query priority."""
        return self._pool.infer(batch, priority=self.priority)

    def _watch(self) -> None:
        keep_checking(self.check, self._stop, self._pause, "Triton checker")

    def _pause(self) -> None:
        self._wake.wait(self._health_seconds)
        self._wake.clear()
