"""Request slots: one reusable batch buffer per request in flight, and how it is sent.

The pipeline fills a slot's ``[batch, window]`` buffer in place and hands the
slot back here to be sent; a slot is reused once its answer is in. Over gRPC
the buffer is ordinary memory and the samples travel inside the message; with
system shared memory each slot's buffer *is* a region registered with every
endpoint once, so a request carries only the region's name (the server must
be on this host).
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from mert_indexer.client.triton_io import TritonPool
from mert_indexer.contract import ModelContract


class BatchSender(Protocol):
    """What the pipeline needs from a transport."""

    slots: int
    batch_size: int

    def buffer(self, slot: int) -> np.ndarray:
        """The ``[batch_size, window]`` wire-dtype buffer of ``slot``."""

    def send(self, slot: int, n: int) -> np.ndarray:
        """Embed the first ``n`` windows of ``slot``'s buffer; ``[n, dim]`` float32."""

    def cancel(self) -> None:
        """Stop retrying: the run is ending."""

    def confirm_model(self) -> None:
        """Raise :class:`ModelChangedError` if a server answered with another model since the
        last check; called before each commit."""

    def close(self) -> None:
        """Release the slots (unregister and unlink shared memory)."""


class GrpcSender:
    """Slots in process memory; each batch is copied into its gRPC message."""

    def __init__(self, pool: TritonPool, slots: int, batch_size: int) -> None:
        contract = _contract(pool)
        self.pool = pool
        self.slots = slots
        self.batch_size = batch_size
        self._buffers = [
            np.zeros((batch_size, contract.window_samples), contract.input_dtype)
            for _ in range(slots)
        ]

    def buffer(self, slot: int) -> np.ndarray:
        return self._buffers[slot]

    def send(self, slot: int, n: int) -> np.ndarray:
        return self.pool.infer(self._buffers[slot][:n])

    def cancel(self) -> None:
        self.pool.cancel()

    def confirm_model(self) -> None:
        self.pool.confirm_model()

    def close(self) -> None:
        self._buffers = []


class ShmSender:
    """Slots in system shared memory, registered once with every endpoint."""

    def __init__(self, pool: TritonPool, slots: int, batch_size: int) -> None:
        from mert_indexer.client.shm import create_regions

        contract = _contract(pool)
        self.pool = pool
        self.slots = slots
        self.batch_size = batch_size
        self._regions = create_regions(
            slots, (batch_size, contract.window_samples), contract.input_dtype
        )
        self._lock = threading.Lock()
        try:
            pool.register_shm(self._regions)
        except BaseException:
            self.close()
            raise

    def buffer(self, slot: int) -> np.ndarray:
        return self._regions[slot].array

    def send(self, slot: int, n: int) -> np.ndarray:
        return self.pool.infer_shm(self._regions[slot], n)

    def cancel(self) -> None:
        self.pool.cancel()

    def confirm_model(self) -> None:
        self.pool.confirm_model()

    def close(self) -> None:
        """Unregister from every server, then unmap and unlink; also after errors."""
        with self._lock:
            regions, self._regions = self._regions, []
        try:
            self.pool.unregister_shm()
        finally:
            for r in regions:
                r.close()


def make_sender(pool: TritonPool, *, slots: int, batch_size: int, shm: bool) -> BatchSender:
    """A :class:`ShmSender` when ``shm``, else a :class:`GrpcSender`."""
    if shm:
        return ShmSender(pool, slots, batch_size)
    return GrpcSender(pool, slots, batch_size)


def _contract(pool: TritonPool) -> ModelContract:
    if pool.contract is None:
        raise RuntimeError("TritonPool.connect() first")
    return pool.contract
