"""The decode stage: threads that decode, window and convert files, and the messages they post.

Each thread takes the next file, streams its blocks through the windower
(converting samples to the wire dtype once, in the thread: soundfile and soxr
release the GIL) and posts one :class:`WindowReady` per window, then
:class:`TrackDecoded`, or :class:`TrackFailed` for a file it cannot index.
The queue is bounded, so a slow server slows the decoders instead of filling
memory; :class:`HeldWindows` counts what is held as the evidence.

What goes wrong with one file costs that file only: any ``Exception`` while a
file is decoded, converted or windowed (a decode error, the file removed or
cut while it is read, a ``MemoryError``, a bug that one odd file triggers) is
posted as :class:`TrackFailed` naming the file, and the thread takes the next
one. What is not about one file -- a failure of the thread itself, taking
files or posting messages, or a ``BaseException`` that is no ``Exception``
(``KeyboardInterrupt``, ``SystemExit``) -- is :class:`DecoderCrashed` and
stops the run.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from mert_indexer.client.windows import StreamWindower, to_wire
from mert_indexer.contract import ModelContract
from mert_indexer.errors import DecodeError, IndexerError

Decoder = Callable[[str], Iterator[np.ndarray]]

log = logging.getLogger(__name__)


class SkipTrack(IndexerError):
    """A readable file that has nothing to index (too short, silent)."""


# Messages from the decode threads to the calling thread.


@dataclass(frozen=True)
class WindowReady:
    """Window ``index`` of ``track`` (its index in the run), from sample ``start``, wire dtype."""

    track: int
    index: int
    start: int
    samples: np.ndarray


@dataclass(frozen=True)
class TrackDecoded:
    """``track`` decoded to its end: ``n_windows`` windows, ``n_samples`` samples."""

    track: int
    n_windows: int
    n_samples: int


@dataclass(frozen=True)
class TrackFailed:
    """``track`` is not indexed: a bad file (:class:`DecodeError`) or nothing to index."""

    track: int
    error: DecodeError | SkipTrack


@dataclass(frozen=True)
class DecoderCrashed:
    """A bug in decode thread ``name``: the run stops and ``error`` is raised by the caller."""

    name: str
    error: BaseException


@dataclass(frozen=True)
class DecoderExited:
    """A decode thread is done; always its last message."""


Message: TypeAlias = WindowReady | TrackDecoded | TrackFailed | DecoderCrashed | DecoderExited


class HeldWindows:
    """Windows decoded and not yet answered: the evidence that memory stays bounded."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.count += n


class Decoders:
    """Decode threads that take files in turn and post their windows as messages.

    Each thread ends with :class:`DecoderExited`; a bug in one is posted as
    :class:`DecoderCrashed` for the calling thread to raise. Posting blocks
    while the queue is full, so a slow server slows the decoders down; once
    :attr:`stop` is set, the threads post nothing more but their last message.
    """

    def __init__(
        self,
        contract: ModelContract,
        hop_samples: int,
        decoder: Decoder,
        paths: list[str],
        workers: int,
        queue_windows: int,
        held: HeldWindows,
    ) -> None:
        self.contract = contract
        self.hop_samples = hop_samples
        self.paths = paths
        self.held = held
        self.stop = threading.Event()
        self._decoder = decoder
        self._abandoned: set[int] = set()  # tracks already failed: stop decoding them
        self._files: queue.Queue[int] = queue.Queue()
        for i in range(len(paths)):
            self._files.put(i)
        self._out: queue.Queue[Message] = queue.Queue(maxsize=queue_windows)
        self._threads = [
            threading.Thread(target=self._work, name=f"decode-{n}", daemon=True)
            for n in range(workers)
        ]
        self.live = len(self._threads)  # counted down by the caller at each DecoderExited

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def get(self, timeout: float) -> Message | None:
        """The next message, or ``None`` if none came within ``timeout`` seconds."""
        try:
            return self._out.get(timeout=timeout)
        except queue.Empty:
            return None

    def abandon(self, track: int) -> None:
        """Stop decoding ``track`` (it failed elsewhere); its thread posts nothing more for it."""
        self._abandoned.add(track)

    def close(self) -> None:
        """Stop taking files and wait (briefly) for the threads to end."""
        self.stop.set()
        for t in self._threads:
            t.join(timeout=5.0)

    def _work(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    i = self._files.get_nowait()
                except queue.Empty:
                    break
                path = self.paths[i]
                try:
                    self._decode_one(i, path)
                except (DecodeError, SkipTrack) as exc:
                    self._put(TrackFailed(i, exc))
                except MemoryError:
                    self._put(TrackFailed(i, DecodeError(path, "out of memory while decoding")))
                except Exception as exc:  # this file's trouble, not the run's
                    log.warning("unexpected error decoding %s", path, exc_info=True)
                    reason = f"decoding failed: {type(exc).__name__}: {exc}"
                    self._put(TrackFailed(i, DecodeError(path, reason)))
        except BaseException as exc:  # the thread itself: stop the run, show it in the caller
            self._put(DecoderCrashed(threading.current_thread().name, exc))
        finally:
            self._put(DecoderExited())

    def _decode_one(self, i: int, path: str) -> None:
        c = self.contract
        windower = StreamWindower(c.window_samples, self.hop_samples)
        sound = False

        def wire_blocks() -> Generator[np.ndarray, None, None]:
            nonlocal sound
            for block in self._decoder(path):
                wire = to_wire(block, c.input_dtype)  # once per sample, in this thread
                sound = sound or bool(wire.any())
                yield wire

        n = 0
        blocks = wire_blocks()
        try:
            for start, window in windower.run(blocks):
                if self.stop.is_set() or i in self._abandoned:
                    return
                self.held.add(1)
                self._put(WindowReady(i, n, start, window))
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
        self._put(TrackDecoded(i, n, windower.n_samples))

    def _put(self, msg: Message) -> None:
        while not self.stop.is_set():
            try:
                self._out.put(msg, timeout=0.1)
                return
            except queue.Full:
                continue
        if isinstance(msg, (DecoderExited, DecoderCrashed)):
            try:
                self._out.put_nowait(msg)
            except queue.Full:
                pass
