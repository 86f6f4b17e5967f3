"""The indexing pipeline: decode -> window -> batch -> infer -> gather -> store.

Stages are joined by bounded queues so memory stays flat whatever the
catalogue: decoders block when the window queue is full, and the batcher
blocks when every request slot is in flight, so a slow server slows the
decoders instead of filling memory. Decoding runs in threads (soundfile and
soxr release the GIL); files only PyAV reads go to a pool of decoder
processes (PyAV holds the GIL). The store is touched from the calling thread
only.

A bad file is recorded and skipped; the run goes on. An error that stops the
run (no server within the deadline, a worker crash, Ctrl-C) first commits
every track already complete, so a rerun only does the rest, and is then
raised in the calling thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mert_indexer.client.decode import decode_blocks
from mert_indexer.client.report import Progress, RunSummary
from mert_indexer.client.transport import BatchSender
from mert_indexer.client.windows import StreamWindower, to_wire
from mert_indexer.contract import ModelContract
from mert_indexer.errors import DecodeError, IndexerError

__all__ = ["Pipeline", "PipelineOptions", "RunSummary", "SkipTrack"]

log = logging.getLogger(__name__)

Decoder = Callable[[str], Iterator[np.ndarray]]


@dataclass(frozen=True)
class PipelineOptions:
    hop_samples: int
    decode_workers: int = 2
    # Processes for files only PyAV reads; 0 decodes them in the decode threads.
    pyav_processes: int = 2
    commit_every_tracks: int = 64
    commit_every_seconds: float = 30.0
    # Windows queued between decoders and batcher; default two batches.
    queue_windows: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.hop_samples < 1 or self.decode_workers < 1 or self.pyav_processes < 0:
            raise ValueError("hop_samples and decode_workers must be >= 1, pyav_processes >= 0")


class SkipTrack(IndexerError):
    """A readable file that has nothing to index (too short, silent)."""


@dataclass
class _Track:
    path: str
    pending: Any  # the store's PendingFile
    nbytes: int
    starts: list[int] = field(default_factory=list)
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)
    n_windows: int | None = None  # known once decoding ended
    n_samples: int = 0


# Messages from decoders to the main thread.
_WIN, _END, _BAD, _CRASH, _EXIT = "win", "end", "bad", "crash", "exit"


class Pipeline:
    """Runs one indexing pass of ``pending`` files into ``store`` through ``sender``.

    ``decoder`` (a path to float32 blocks at the model's rate) replaces the
    default soundfile/PyAV decoding; tests use it to inject failures.
    """

    def __init__(
        self,
        contract: ModelContract,
        sender: BatchSender,
        store: Any,
        options: PipelineOptions,
        decoder: Decoder | None = None,
    ) -> None:
        self.contract = contract
        self.sender = sender
        self.store = store
        self.options = options
        self._decoder = decoder
        self._stop = threading.Event()
        self._held = 0  # windows decoded and not yet answered (bounded-memory evidence)
        self._held_lock = threading.Lock()

    def run(self, pending: Sequence[Any], summary: RunSummary) -> RunSummary:
        opts, sender, contract = self.options, self.sender, self.contract
        start_time = time.monotonic()
        paths = [str(p.path) for p in pending]
        # Tracks being worked on, created at their first message: a million-file run
        # holds state for the files in flight only.
        tracks: dict[int, _Track] = {}

        def track(i: int) -> _Track:
            tr = tracks.get(i)
            if tr is None:
                tr = tracks[i] = _Track(paths[i], pending[i], _size(pending[i]))
            return tr

        files_q: queue.Queue[int] = queue.Queue()
        for i in range(len(paths)):
            files_q.put(i)
        win_q: queue.Queue[tuple] = queue.Queue(maxsize=opts.queue_windows or 2 * sender.batch_size)
        done_q: queue.Queue[tuple[list[tuple[int, int]], Future]] = queue.Queue()
        free_slots: queue.Queue[int] = queue.Queue()
        for s in range(sender.slots):
            free_slots.put(s)
        pyav = None
        decoder = self._decoder
        if decoder is None:
            if opts.pyav_processes:  # its processes start only if a file needs PyAV
                from mert_indexer.client.pyav_pool import PyAVPool

                pyav = PyAVPool(opts.pyav_processes)
            fallback = pyav.blocks if pyav is not None else None
            rate = contract.sample_rate

            def decoder(path: str) -> Iterator[np.ndarray]:
                return decode_blocks(path, rate, fallback=fallback)

        n_workers = max(1, min(opts.decode_workers, len(paths)))
        workers = [
            threading.Thread(
                target=self._decode_worker,
                args=(decoder, files_q, win_q, paths),
                name=f"decode-{n}",
                daemon=True,
            )
            for n in range(n_workers)
        ]
        executor = ThreadPoolExecutor(max_workers=sender.slots, thread_name_prefix="infer")
        progress = Progress(len(paths), sum(_size(p) for p in pending), opts.progress)
        slot: int | None = None  # the slot being filled
        fill: list[tuple[int, int]] = []  # (track, window index) of each filled row
        live_workers = len(workers)
        outstanding = 0
        uncommitted = 0
        last_commit = time.monotonic()
        failed_run = False

        def drain_done(block: bool) -> None:
            nonlocal outstanding
            while True:
                try:
                    keys, fut = done_q.get(timeout=0.05) if block else done_q.get_nowait()
                except queue.Empty:
                    return
                block = False
                outstanding -= 1
                emb = fut.result()  # raises the request's error: the run stops
                self._release(len(keys))
                if len(emb) != len(keys):
                    raise IndexerError(
                        f"the server answered {len(emb)} embeddings for a "
                        f"request of {len(keys)} windows"
                    )
                for (t, k), e in zip(keys, emb, strict=True):
                    tr = tracks.get(t)
                    if tr is not None:  # None: the track failed after this batch left
                        tr.embeddings[k] = e
                progress.windows(len(keys))
                for t in {t for t, _ in keys}:
                    tr = tracks.get(t)
                    if (
                        tr is not None
                        and tr.n_windows is not None
                        and len(tr.embeddings) == tr.n_windows
                    ):
                        finish_track(t)

        def take_slot() -> int:
            while True:  # wait for a free slot, still gathering answers (and their errors)
                try:
                    return free_slots.get(timeout=0.05)
                except queue.Empty:
                    drain_done(block=False)

        def submit() -> None:
            nonlocal slot, fill, outstanding
            if slot is None or not fill:
                return
            s, keys = slot, fill
            slot, fill = None, []
            outstanding += 1
            summary.peak_in_flight = max(summary.peak_in_flight, outstanding)
            fut = executor.submit(sender.send, s, len(keys))

            def on_done(f: Future, s: int = s, keys: list = keys) -> None:
                free_slots.put(s)  # the answer is a new array: the buffer is free again
                done_q.put((keys, f))

            fut.add_done_callback(on_done)

        def finish_track(i: int) -> None:
            nonlocal uncommitted
            tr = tracks.pop(i)
            emb = np.stack([tr.embeddings[k] for k in range(tr.n_windows or 0)])
            self.store.add_track(
                tr.pending,
                n_samples=tr.n_samples,
                sample_rate=contract.sample_rate,
                starts=np.asarray(tr.starts, dtype=np.int64),
                embeddings=emb.astype(np.float32, copy=False),
            )
            summary.indexed += 1
            summary.windows += len(emb)
            summary.audio_seconds += tr.n_samples / contract.sample_rate
            uncommitted += 1
            progress.track_done(tr.n_samples / contract.sample_rate, tr.nbytes)

        def maybe_commit(force: bool = False) -> None:
            nonlocal uncommitted, last_commit
            due = (
                uncommitted >= opts.commit_every_tracks
                or time.monotonic() - last_commit > opts.commit_every_seconds
            )
            if uncommitted and (force or due):
                self.store.commit()
                uncommitted = 0
                last_commit = time.monotonic()

        for w in workers:
            w.start()
        try:
            while live_workers or outstanding or fill:
                try:
                    msg = win_q.get(timeout=0.05)
                except queue.Empty:
                    msg = None
                if msg is None:
                    submit()  # nothing new is coming soon: send what we have
                elif msg[0] == _WIN:
                    _, t, k, start, window = msg
                    track(t).starts.append(start)
                    if slot is None:
                        slot = take_slot()
                    sender.buffer(slot)[len(fill)] = window
                    fill.append((t, k))
                    if len(fill) >= sender.batch_size:
                        submit()
                elif msg[0] == _END:
                    _, t, n_windows, n_samples = msg
                    tr = track(t)
                    tr.n_windows, tr.n_samples = n_windows, n_samples
                    if len(tr.embeddings) == n_windows:
                        finish_track(t)
                elif msg[0] == _BAD:
                    _, t, exc = msg
                    tr = track(t)
                    del tracks[t]
                    if isinstance(exc, SkipTrack):
                        summary.skipped.append((tr.path, str(exc)))
                    else:
                        summary.failed.append((tr.path, exc.reason))
                        self.store.record_failure(tr.path, exc.reason)
                    # Its windows already batched come back and are dropped.
                    progress.track_done(0.0, tr.nbytes)
                elif msg[0] == _EXIT:
                    live_workers -= 1
                elif msg[0] == _CRASH:
                    _, name, exc = msg
                    log.error("decoder thread %s crashed; stopping the run", name)
                    raise exc
                drain_done(block=False)
                maybe_commit()
                summary.peak_windows_held = max(summary.peak_windows_held, self._held)
                if not live_workers and not fill and outstanding:
                    drain_done(block=True)
            maybe_commit(force=True)
        except BaseException:
            failed_run = True
            self._stop.set()
            sender.cancel()
            # Keep what is complete: a rerun does only the rest.
            try:
                maybe_commit(force=True)
            except IndexerError as exc:  # the original error matters more
                log.warning("could not commit the completed tracks either: %s", exc)
            except Exception:
                log.exception("could not commit the completed tracks")
            raise
        finally:
            self._stop.set()
            # After a failure, requests still in flight are abandoned (closing the
            # connection cancels them); on success there are none left.
            executor.shutdown(wait=not failed_run, cancel_futures=True)
            for w in workers:
                w.join(timeout=5.0)
            if pyav is not None:
                pyav.close()
                summary.decoder_process_cpu_seconds += pyav.cpu_seconds
            progress.close()
            summary.wall_seconds += time.monotonic() - start_time
        return summary

    def _release(self, n: int) -> None:
        with self._held_lock:
            self._held -= n

    def _decode_worker(
        self, decoder: Decoder, files_q: queue.Queue, win_q: queue.Queue, paths: list[str]
    ) -> None:
        try:
            while not self._stop.is_set():
                try:
                    i = files_q.get_nowait()
                except queue.Empty:
                    break
                path = paths[i]
                try:
                    self._decode_one(decoder, i, path, win_q)
                except (DecodeError, SkipTrack) as exc:
                    self._put(win_q, (_BAD, i, exc))
                except MemoryError as exc:
                    self._put(win_q, (_BAD, i, DecodeError(path, f"out of memory: {exc}")))
        except BaseException as exc:  # a bug: stop the run and show it in the main thread
            self._put(win_q, (_CRASH, threading.current_thread().name, exc))
        finally:
            self._put(win_q, (_EXIT,))

    def _decode_one(self, decoder: Decoder, i: int, path: str, win_q: queue.Queue) -> None:
        c = self.contract
        windower = StreamWindower(c.window_samples, self.options.hop_samples)
        sound = False

        def wire_blocks() -> Iterator[np.ndarray]:
            nonlocal sound
            for block in decoder(path):
                wire = to_wire(block, c.input_dtype)  # once per sample, in this thread
                sound = sound or bool(wire.any())
                yield wire

        n = 0
        blocks = wire_blocks()
        try:
            for start, window in windower.run(blocks):
                if self._stop.is_set():
                    return
                with self._held_lock:
                    self._held += 1
                self._put(win_q, (_WIN, i, n, start, window))
                n += 1
        finally:
            blocks.close()  # a PyAV decoder process abandoned mid-file is recycled
        if n == 0:
            raise SkipTrack(
                f"shorter than one window ({windower.n_samples / c.sample_rate:.2f} s "
                f"< {c.window_seconds:.2f} s): not indexed, since padding changes MERT's "
                "embedding"
            )
        if not sound:
            raise SkipTrack("digital silence: nothing to index")
        self._put(win_q, (_END, i, n, windower.n_samples))

    def _put(self, q: queue.Queue, item: tuple) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        if item[0] in (_EXIT, _CRASH):
            try:
                q.put_nowait(item)
            except queue.Full:
                pass


def _size(pending: Any) -> int:
    """Bytes of a pending file, for the ETA: the store's plan knows them, else stat."""
    size = getattr(pending, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.stat(pending.path).st_size
    except OSError:
        return 0
