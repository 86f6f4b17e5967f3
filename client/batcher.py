"""The send stage: windows into the sender's slot buffers, slots to the server, answers back.

Runs in the calling thread; only the requests themselves run in a pool of
``sender.slots`` threads. When every slot is in flight, :meth:`Batcher.add`
waits for one (gathering answers meanwhile), which is what stops the
decoders from running ahead of a slow server.
"""

from __future__ import annotations

import functools
import queue
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from mert_indexer.client.decoders import HeldWindows
from mert_indexer.client.transport import BatchSender
from mert_indexer.errors import IndexerError

Row = tuple[int, int]  # (track, window index) of one window in a request


class Batcher:
    """Fills the sender's slots in the calling thread and gathers their answers.

    A slot is free again once its answer is in (the answer is a new array).
    Every gathered answer goes to ``on_answer``; a request's error, or an
    answer of the wrong length, is raised from :meth:`gather`.
    """

    def __init__(
        self,
        sender: BatchSender,
        held: HeldWindows,
        on_answer: Callable[[list[Row], np.ndarray], None],
    ) -> None:
        self.sender = sender
        self.held = held
        self.on_answer = on_answer
        self.outstanding = 0  # requests submitted and not yet gathered
        self.peak_in_flight = 0
        self._free: queue.Queue[int] = queue.Queue()
        for s in range(sender.slots):
            self._free.put(s)
        self._done: queue.Queue[tuple[list[Row], Future[np.ndarray]]] = queue.Queue()
        self._executor = ThreadPoolExecutor(max_workers=sender.slots, thread_name_prefix="infer")
        self._slot: int | None = None  # the slot being filled
        self._fill: list[Row] = []  # the row of each filled window

    @property
    def filling(self) -> bool:
        return bool(self._fill)

    def add(self, row: Row, window: np.ndarray) -> None:
        """Copy ``window`` into the slot being filled; send the slot once it is full."""
        if self._slot is None:
            self._slot = self._take_slot()
        self.sender.buffer(self._slot)[len(self._fill)] = window
        self._fill.append(row)
        if len(self._fill) >= self.sender.batch_size:
            self.flush()

    def flush(self) -> None:
        """Send the slot being filled, full or not."""
        if self._slot is None or not self._fill:
            return
        slot, rows = self._slot, self._fill
        self._slot, self._fill = None, []
        self.outstanding += 1
        self.peak_in_flight = max(self.peak_in_flight, self.outstanding)
        fut = self._executor.submit(self.sender.send, slot, len(rows))
        fut.add_done_callback(functools.partial(self._answered, slot, rows))

    def gather(self, block: bool) -> None:
        """Hand every answer already in to ``on_answer``; with ``block``, wait briefly for one."""
        while True:
            try:
                rows, fut = self._done.get(timeout=0.05) if block else self._done.get_nowait()
            except queue.Empty:
                return
            block = False
            self.outstanding -= 1
            emb = fut.result()  # raises the request's error: the run stops
            self.held.add(-len(rows))
            if len(emb) != len(rows):
                raise IndexerError(
                    f"the server answered {len(emb)} embeddings for a "
                    f"request of {len(rows)} windows"
                )
            self.on_answer(rows, emb)

    def close(self, wait: bool) -> None:
        """Stop the request threads; without ``wait``, requests in flight are abandoned."""
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def _answered(self, slot: int, rows: list[Row], fut: Future[np.ndarray]) -> None:
        # In a request thread: free the slot first, then queue the answer for gather().
        self._free.put(slot)
        self._done.put((rows, fut))

    def _take_slot(self) -> int:
        while True:  # wait for a free slot, still gathering answers (and their errors)
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                self.gather(block=False)
