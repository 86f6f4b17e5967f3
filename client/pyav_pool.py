"""Run the PyAV fallback decoder in worker processes that stream blocks back.

PyAV holds the GIL while it decodes: measured here, two threads decoding m4a
ran at 0.6x of one, and one PyAV thread next to the soundfile threads slowed
all of them. So files that only FFmpeg reads (m4a/AAC, ...) are decoded in a
small pool of processes, started on first use (a catalogue without such files
never pays for them). Each process decodes one file at a time and sends its
mono 24 kHz blocks back over a pipe; the pipe's fixed buffer is the
backpressure, so memory stays bounded whatever the file's length. A decoder
process that crashes (FFmpeg on a hostile file) costs that file, not the run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.client.decode import NotForThisDecoder, pyav_blocks
from mert_indexer.errors import DecodeError

log = logging.getLogger(__name__)

# One-byte tags, padded to 4 so the float32 payload after them stays aligned.
_DATA, _END, _NOT_FOR_US, _BAD = b"D\0\0\0", b"E\0\0\0", b"N\0\0\0", b"B\0\0\0"
_TAG = 4


class PyAVPool:
    """Up to ``processes`` PyAV decoder processes; :meth:`blocks` is a drop-in fallback.

    Thread-safe: each calling thread borrows one process for one file.
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self._ctx = _context()
        self._free = threading.Semaphore(processes)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.cpu_seconds = 0.0  # reported by workers that stopped in order

    @property
    def started(self) -> int:
        """Processes alive now (started lazily)."""
        with self._lock:
            return len(self._all)

    def blocks(self, path: Path, sample_rate: int) -> Iterator[np.ndarray]:
        """Mono float32 blocks of ``path``, decoded by PyAV in a worker process."""
        self._free.acquire()
        worker: _Worker | None = None
        finished = False
        try:
            worker = self._borrow()
            worker.conn.send((str(path), sample_rate))
            while True:
                try:
                    msg = worker.conn.recv_bytes()
                except (EOFError, OSError):
                    worker.process.join(1.0)
                    code = worker.process.exitcode
                    raise DecodeError(
                        path,
                        f"the PyAV decoder process died while reading this file (exit code {code})",
                    ) from None
                tag = msg[:_TAG]
                if tag == _DATA:
                    yield np.frombuffer(msg, dtype=np.float32, offset=_TAG)
                elif tag == _END:
                    finished = True
                    return
                elif tag == _NOT_FOR_US:
                    finished = True
                    raise NotForThisDecoder(msg[_TAG:].decode("utf-8", "replace"))
                else:
                    finished = True
                    raise DecodeError(path, msg[_TAG:].decode("utf-8", "replace"))
        finally:
            if worker is not None:
                if finished:
                    self._give_back(worker)
                else:  # abandoned mid-file (or crashed): its pipe holds stale blocks
                    self._discard(worker)
            self._free.release()

    def _borrow(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("PyAVPool is closed")
            if self._idle:
                return self._idle.pop()
        worker = _Worker(self._ctx)
        with self._lock:
            self._all.add(worker)
        log.debug("started PyAV decoder process %d", worker.process.pid)
        return worker

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        self._discard(worker)

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
        worker.kill()

    def close(self) -> None:
        """Stop every decoder process (idle ones politely, busy ones by force)."""
        with self._lock:
            self._closed = True
            workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            self.cpu_seconds += worker.stop()

    def __enter__(self) -> PyAVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _context() -> Any:
    """A forkserver context whose server has imported the decoder once.

    ``fork`` is unsafe in a process running gRPC threads; ``spawn`` pays the
    imports (numpy, PyAV, soxr: ~0.3 CPU s) in every worker, which was a third
    of the client's CPU on a 5-minute catalogue. The forkserver is a fresh
    single-threaded process: it imports them once, and each worker is a cheap
    fork of it.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["client.pyav_pool", "av", "soxr"])
    return ctx


class _Worker:
    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True, name="pyav-decoder")
        self.process.start()
        child.close()

    def stop(self, timeout: float = 2.0) -> float:
        """Ask the worker to exit; returns the CPU seconds it reports having used."""
        cpu = 0.0
        try:
            self.conn.send(None)
            if self.conn.poll(timeout):
                cpu = float(self.conn.recv())
        except (OSError, EOFError, TypeError, ValueError):
            pass
        self.process.join(timeout)
        self.kill()
        return cpu

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        self.conn.close()


def _serve(conn: Connection) -> None:
    """Worker process: decode each path it is sent, streaming tagged blocks back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            t = os.times()
            conn.send(t.user + t.system)  # the parent accounts for our CPU (benchmarks)
            return
        path, sample_rate = job
        try:
            for block in pyav_blocks(Path(path), sample_rate):
                conn.send_bytes(_DATA + block.astype(np.float32, copy=False).tobytes())
        except NotForThisDecoder as exc:
            conn.send_bytes(_NOT_FOR_US + str(exc).encode("utf-8", "backslashreplace"))
        except DecodeError as exc:
            conn.send_bytes(_BAD + exc.reason.encode("utf-8", "backslashreplace"))
        except (BrokenPipeError, EOFError):
            return
        except MemoryError:
            conn.send_bytes(_BAD + b"out of memory while decoding")
        except Exception as exc:  # FFmpeg oddities surface as assorted exceptions: cost the file
            text = f"PyAV decoder failed: {type(exc).__name__}: {exc}"
            conn.send_bytes(_BAD + text.encode("utf-8", "backslashreplace"))
        else:
            conn.send_bytes(_END)
