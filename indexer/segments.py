"""Append-only embedding segments: the vectors and window starts of every track.

A segment is two raw, header-less files side by side in ``segments/``:

    000001.f16      float16 [rows, dim]   the embeddings, as the model gave them
    000001.starts   int64   [rows]        each window's start, in samples

Raw files (not ``.npy``) because a segment grows by appending one commit after
another; a ``.npy`` header would have to be rewritten in place. The catalog is
the only record of how many rows of a segment are committed: rows beyond that
count are the leftovers of a crash or of a failed write, invisible to every
reader, overwritten by the next append and cut off by :meth:`SegmentWriter.recover`.

float16, not float32: it halves the store (1.5 KB per window at D = 768) and
costs nothing measurable in retrieval -- on the benchmark's 100k windows, exact
top-10 from the float16 store agree with exact top-10 from the float32
originals at recall 0.9994 (``benchmarks/results/index_bench.md``); the
relative rounding error (~3e-4) is far below the distance between two
neighbouring windows of a track. Values beyond float16's range are refused at
``add_track``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mert_indexer.atomic import fsync_dir
from mert_indexer.errors import StoreError
from mert_indexer.indexer import faults

SEGMENTS_DIR = "segments"  # inside a store's folder
VECTOR_DTYPE = np.dtype("<f2")
START_DTYPE = np.dtype("<i8")
DEFAULT_SEGMENT_BYTES = 1 << 30  # ~700k windows of D = 768 per segment


def vectors_path(root: Path, segment: int) -> Path:
    return root / f"{segment:06d}.f16"


def starts_path(root: Path, segment: int) -> Path:
    return root / f"{segment:06d}.starts"


def segment_ids_on_disk(root: Path) -> set[int]:
    """Segment numbers that have at least one file in ``root``."""
    ids = set()
    for p in root.iterdir():
        stem, _, ext = p.name.partition(".")
        if ext in ("f16", "starts") and stem.isdigit():
            ids.add(int(stem))
    return ids


class SegmentWriter:
    """Writes rows at a given position of a segment and makes them durable.

    Not thread-safe: the store has one writer. Durability order is the caller's
    business: :meth:`write` returns only after the bytes are fsynced, and the
    caller then records them in the catalog.
    """

    def __init__(self, root: Path, dim: int) -> None:
        self.root = root
        self.dim = dim
        root.mkdir(parents=True, exist_ok=True)

    def write(self, segment: int, first_row: int, vectors: np.ndarray, starts: np.ndarray) -> None:
        """Write ``vectors``/``starts`` at ``first_row`` of ``segment`` and fsync them.

        Raises ``OSError`` (ENOSPC and friends) with nothing made visible: the
        rows beyond the committed count stay unrecorded until the catalog says so.
        """
        assert vectors.dtype == VECTOR_DTYPE and vectors.shape[1:] == (self.dim,)
        assert starts.dtype == START_DTYPE and len(starts) == len(vectors)
        created = False
        for path, data, row_bytes in (
            (vectors_path(self.root, segment), vectors, self.dim * VECTOR_DTYPE.itemsize),
            (starts_path(self.root, segment), starts, START_DTYPE.itemsize),
        ):
            created |= not path.exists()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.lseek(fd, first_row * row_bytes, os.SEEK_SET)
                    faults.point("segment.write")
                    _write_all(fd, np.ascontiguousarray(data).data.cast("B"))
                    faults.point("segment.fsync")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:  # name the file: os.write's errors do not
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
        if created:
            faults.point("segment.dir_fsync")
            fsync_dir(self.root)

    def truncate(self, segment: int, rows: int) -> None:
        """Cut ``segment`` back to ``rows`` committed rows (0: remove its files)."""
        for path, row_bytes in (
            (vectors_path(self.root, segment), self.dim * VECTOR_DTYPE.itemsize),
            (starts_path(self.root, segment), START_DTYPE.itemsize),
        ):
            if rows == 0:
                if path.exists():
                    faults.point("segment.truncate")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            elif path.exists() and path.stat().st_size > rows * row_bytes:
                faults.point("segment.truncate")
                os.truncate(path, rows * row_bytes)

    def recover(self, committed: dict[int, int]) -> None:
        """Drop what no commit recorded: uncommitted tails and unrecorded segments."""
        for segment in segment_ids_on_disk(self.root) | set(committed):
            self.truncate(segment, committed.get(segment, 0))


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


class SegmentReader:
    """Read-only, memory-mapped view of the committed rows of every segment.

    Rows appended after the reader was made are not seen: each map covers the
    row count the caller passed, which is what a built index refers to. Safe to
    share between threads: maps are made once, under a lock, and only read.
    """

    def __init__(self, root: Path, dim: int, rows: dict[int, int]) -> None:
        self.root = root
        self.dim = dim
        self.rows = dict(rows)
        self._vectors: dict[int, np.ndarray] = {}
        self._starts: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def vectors(self, segment: int) -> np.ndarray:
        """float16 [rows, dim] map of one segment."""
        mm = self._vectors.get(segment)
        if mm is None:
            with self._lock:
                mm = self._vectors.get(segment)
                if mm is None:
                    mm = self._vectors[segment] = self._map(
                        vectors_path(self.root, segment),
                        VECTOR_DTYPE,
                        (self.rows[segment], self.dim),
                    )
        return mm

    def starts(self, segment: int) -> np.ndarray:
        """int64 [rows] map of one segment's window starts."""
        mm = self._starts.get(segment)
        if mm is None:
            with self._lock:
                mm = self._starts.get(segment)
                if mm is None:
                    mm = self._starts[segment] = self._map(
                        starts_path(self.root, segment), START_DTYPE, (self.rows[segment],)
                    )
        return mm

    def _map(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        need = int(np.prod(shape)) * dtype.itemsize
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise StoreError(f"{path}: segment file unreadable: {exc.strerror}") from exc
        if size < need:
            raise StoreError(f"{path}: segment file holds {size} bytes, the catalog expects {need}")
        if need == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)

    def gather(self, segments: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32 [n, dim] copies of the rows ``(segments[i], rows[i])``, in that order."""
        out = np.empty((len(rows), self.dim), np.float32)
        for seg in np.unique(segments):
            sel = np.flatnonzero(segments == seg)
            order = np.argsort(rows[sel], kind="stable")  # sorted reads: fewer page faults
            out[sel[order]] = self.vectors(int(seg))[rows[sel][order]]
        return out

    def iter_chunks(
        self, ranges: list[tuple[int, int, int]], chunk_rows: int
    ) -> Iterator[np.ndarray]:
        """float32 chunks of at most ``chunk_rows`` over ``(segment, first_row, n)`` ranges.

        What lets the index build stream a store bigger than memory: only one
        chunk is materialised at a time.
        """
        parts: list[np.ndarray] = []
        held = 0
        for seg, first, n in ranges:
            mm = self.vectors(seg)
            pos = first
            while pos < first + n:
                take = min(first + n - pos, chunk_rows - held)
                parts.append(mm[pos : pos + take])
                held += take
                pos += take
                if held == chunk_rows:
                    yield np.concatenate(parts).astype(np.float32)
                    parts, held = [], 0
        if held:
            yield np.concatenate(parts).astype(np.float32)

    def close(self) -> None:
        self._vectors.clear()
        self._starts.clear()
