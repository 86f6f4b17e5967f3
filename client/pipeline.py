"""The indexing pipeline: decode -> window -> batch -> infer -> gather -> store.

Stages are joined by bounded queues so memory stays flat whatever the
catalogue: decoders block when the window queue is full, and the batcher
blocks when ``in_flight`` requests are outstanding (backpressure from the
server reaches the decoders). Decoding runs in threads (soundfile and soxr
release the GIL). The store is touched from the calling thread only.

A bad file is recorded and skipped; the run goes on. An error that stops the
run (no server within the deadline, a worker crash, Ctrl-C) first commits
every track already complete, so a rerun only does the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from client.contract import ModelContract
from client.decode import decode_blocks
from client.windows import StreamWindower, to_wire
from indexer.errors import DecodeError, IndexerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    hop_samples: int
    decode_workers: int = 2
    batch_size: int = 16
    in_flight: int = 4
    commit_every_tracks: int = 64
    commit_every_seconds: float = 30.0
    progress: bool = True


@dataclass
class RunSummary:
    indexed: int = 0
    unchanged: int = 0
    renamed: int = 0
    duplicates: int = 0
    pruned: int = 0
    windows: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.failed

    @property
    def tracks_per_hour(self) -> float:
        return self.indexed / self.wall_seconds * 3600 if self.wall_seconds else 0.0


class SkipTrack(IndexerError):
    """A readable file that has nothing to index (too short, silent)."""


@dataclass
class _Track:
    path: str
    pending: object  # the store's PendingFile
    starts: list[int] = field(default_factory=list)
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)
    n_windows: int | None = None  # known once decoding ended
    n_samples: int = 0


# Messages from decoders to the main thread.
_WIN, _END, _BAD, _CRASH = "win", "end", "bad", "crash"


class Pipeline:
    """Runs one indexing pass of ``pending`` files into ``store`` through ``infer``."""

    def __init__(self, contract: ModelContract, infer: Callable[[np.ndarray], np.ndarray],
                 store: object, options: PipelineOptions) -> None:
        self.contract = contract
        self.infer = infer
        self.store = store
        self.options = options
        self._stop = threading.Event()

    def run(self, pending: Sequence[object], summary: RunSummary) -> RunSummary:
        opts = self.options
        start_time = time.monotonic()
        tracks = {i: _Track(p.path, p) for i, p in enumerate(pending)}  # type: ignore[attr-defined]
        files_q: queue.Queue[int] = queue.Queue()
        for i in tracks:
            files_q.put(i)
        win_q: queue.Queue[tuple] = queue.Queue(maxsize=opts.batch_size * (opts.in_flight + 2))
        done_q: queue.Queue[tuple] = queue.Queue()
        slots = threading.Semaphore(opts.in_flight)
        workers = [threading.Thread(target=self._decode_worker, args=(files_q, win_q, tracks),
                                    name=f"decode-{n}", daemon=True)
                   for n in range(max(1, min(opts.decode_workers, len(tracks))))]
        sender = ThreadPoolExecutor(max_workers=opts.in_flight, thread_name_prefix="infer")
        progress = _Progress(len(tracks), self.contract.window_seconds, opts.progress)
        batch: list[tuple[int, int, np.ndarray]] = []
        live_workers = len(workers)
        outstanding = 0
        uncommitted = 0
        last_commit = time.monotonic()

        def submit() -> None:
            nonlocal batch, outstanding
            if not batch:
                return
            items, batch = batch, []
            slots.acquire()
            outstanding += 1
            arr = np.stack([w for _, _, w in items])
            fut = sender.submit(self.infer, arr)
            keys = [(t, k) for t, k, _ in items]

            def on_done(f: Future, keys: list = keys) -> None:
                slots.release()
                done_q.put((keys, f))

            fut.add_done_callback(on_done)

        def finish_track(i: int) -> None:
            nonlocal uncommitted
            tr = tracks.pop(i)
            emb = np.stack([tr.embeddings[k] for k in range(tr.n_windows or 0)]).astype(np.float32)
            self.store.add_track(tr.pending, n_samples=tr.n_samples,  # type: ignore[attr-defined]
                                 sample_rate=self.contract.sample_rate,
                                 starts=np.asarray(tr.starts, dtype=np.int64), embeddings=emb)
            summary.indexed += 1
            summary.windows += len(emb)
            summary.audio_seconds += tr.n_samples / self.contract.sample_rate
            uncommitted += 1
            progress.track_done(tr.n_samples / self.contract.sample_rate)

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
                for (t, k), e in zip(keys, emb):
                    tr = tracks.get(t)
                    if tr is not None:  # None: the track failed to decode after this batch left
                        tr.embeddings[k] = e
                progress.windows(len(keys))
                for t in {t for t, _ in keys}:
                    tr = tracks.get(t)
                    if tr is not None and tr.n_windows is not None \
                            and len(tr.embeddings) == tr.n_windows:
                        finish_track(t)

        def maybe_commit(force: bool = False) -> None:
            nonlocal uncommitted, last_commit
            due = uncommitted >= opts.commit_every_tracks or \
                time.monotonic() - last_commit > opts.commit_every_seconds
            if uncommitted and (force or due):
                self.store.commit()  # type: ignore[attr-defined]
                uncommitted = 0
                last_commit = time.monotonic()

        for w in workers:
            w.start()
        try:
            while live_workers or outstanding or batch:
                try:
                    msg = win_q.get(timeout=0.05)
                except queue.Empty:
                    msg = None
                if msg is None:
                    submit()  # nothing new is coming soon: send what we have
                elif msg[0] == _WIN:
                    _, t, k, start, w = msg
                    tracks[t].starts.append(start)
                    batch.append((t, k, w))
                    if len(batch) >= opts.batch_size:
                        submit()
                elif msg[0] == _END:
                    _, t, n_windows, n_samples = msg
                    tr = tracks[t]
                    tr.n_windows, tr.n_samples = n_windows, n_samples
                    if len(tr.embeddings) == n_windows:
                        finish_track(t)
                elif msg[0] == _BAD:
                    _, t, exc = msg
                    tr = tracks.pop(t)
                    if isinstance(exc, SkipTrack):
                        summary.skipped.append((tr.path, str(exc)))
                    else:
                        summary.failed.append((tr.path, exc.reason))
                        self.store.record_failure(tr.path, exc.reason)  # type: ignore[attr-defined]
                    batch = [b for b in batch if b[0] != t]
                    progress.track_done(0.0, failed=True)
                elif msg[0] == "exit":
                    live_workers -= 1
                elif msg[0] == _CRASH:
                    raise msg[1]
                drain_done(block=False)
                maybe_commit()
                if not live_workers and not batch and outstanding:
                    drain_done(block=True)
            maybe_commit(force=True)
        except BaseException:
            self._stop.set()
            # Keep what is complete: a rerun does only the rest.
            try:
                maybe_commit(force=True)
            except Exception:  # the original error matters more
                log.exception("could not commit completed tracks")
            raise
        finally:
            self._stop.set()
            sender.shutdown(wait=False, cancel_futures=True)
            progress.close()
            summary.wall_seconds += time.monotonic() - start_time
        return summary

    def _decode_worker(self, files_q: queue.Queue, win_q: queue.Queue,
                       tracks: dict[int, _Track]) -> None:
        c, hop = self.contract, self.options.hop_samples
        try:
            while not self._stop.is_set():
                try:
                    i = files_q.get_nowait()
                except queue.Empty:
                    break
                path = tracks[i].path
                try:
                    self._decode_one(i, path, win_q, c, hop)
                except (DecodeError, SkipTrack) as exc:
                    self._put(win_q, (_BAD, i, exc))
                except MemoryError as exc:
                    self._put(win_q, (_BAD, i, DecodeError(path, f"out of memory: {exc}")))
        except BaseException as exc:  # a bug: stop the run and show it in the main thread
            self._put(win_q, (_CRASH, exc))
        finally:
            self._put(win_q, ("exit",))

    def _decode_one(self, i: int, path: str, win_q: queue.Queue, c: ModelContract,
                    hop: int) -> None:
        windower = StreamWindower(c.window_samples, hop)
        n = 0
        peak = 0.0
        for start, window in windower.run(decode_blocks(path, c.sample_rate)):
            if self._stop.is_set():
                return
            peak = max(peak, float(np.abs(window).max()))
            self._put(win_q, (_WIN, i, n, start, to_wire(window, c.input_dtype)))
            n += 1
        if n == 0:
            raise SkipTrack(
                f"shorter than one window ({windower.n_samples / c.sample_rate:.2f} s "
                f"< {c.window_seconds:.2f} s)")
        if peak == 0.0:
            raise SkipTrack("digital silence: nothing to index")
        self._put(win_q, (_END, i, n, windower.n_samples))

    def _put(self, q: queue.Queue, item: tuple) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        if item[0] in ("exit", _CRASH):
            try:
                q.put_nowait(item)
            except queue.Full:
                pass


class _Progress:
    """Files done, windows/s, x realtime and ETA; silent when disabled."""

    def __init__(self, total: int, window_seconds: float, enabled: bool) -> None:
        self.bar = None
        self.start = time.monotonic()
        self.audio = 0.0
        self.n_windows = 0
        self.window_seconds = window_seconds
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="file", dynamic_ncols=True, smoothing=0.1)

    def windows(self, n: int) -> None:
        self.n_windows += n

    def track_done(self, audio_seconds: float, failed: bool = False) -> None:
        self.audio += audio_seconds
        if self.bar is not None:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            self.bar.set_postfix_str(
                f"{self.n_windows / elapsed:.1f} win/s, {self.audio / elapsed:.0f}x realtime",
                refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
