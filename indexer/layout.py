"""Where each indexed window lives: stable FAISS ids to (track, segment, row).

Every track of an index holds one contiguous range of FAISS ids, one id per
window, in window order. A fresh build numbers the windows consecutively, track
after track in storage order (segment, row), so there an id is also the
window's position; an incremental add gives new tracks the ids after the
highest ever used (``next_id``), and a delete removes a track's range, leaving
a gap. Ids therefore never change while an index lives -- not on adds, not on
deletes, not when a compaction moves the rows in the segments (only the
(segment, row) a range points at changes) -- and ``runs`` is kept sorted by
first id, so a lookup is one binary search.

:class:`Layout` maps an id back to its track, to its row in a segment (how
search finds a hit's start time and how re-ranking reads the exact vector) and
to its *position*: the window's place in the runs' order, which is how
per-window arrays of a generation (the norms) are indexed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mert_indexer.indexer.catalog import TrackRow


@dataclass(frozen=True)
class TrackRun:
    """The contiguous rows of one track in a segment, as the index numbers them."""

    track_id: int
    path: str
    sample_rate: int
    segment: int
    first_row: int
    n_windows: int


def track_runs(tracks: Iterable[TrackRow]) -> list[TrackRun]:
    """Catalog tracks as the index build takes them."""
    return [
        TrackRun(t.id, t.path, t.sample_rate, t.segment, t.first_row, t.n_windows) for t in tracks
    ]


class Layout:
    """Maps FAISS ids to (track index, segment, row) and to positions in runs order.

    ``first_ids`` must increase and the ranges ``[first_id, first_id + n)`` must
    not overlap; gaps between them (deleted tracks) are allowed.
    """

    def __init__(
        self,
        first_ids: np.ndarray | Sequence[int],
        segments: np.ndarray | Sequence[int],
        first_rows: np.ndarray | Sequence[int],
        n_windows: np.ndarray | Sequence[int],
    ) -> None:
        self.first_ids = np.asarray(first_ids, np.int64)
        self.n_windows = np.asarray(n_windows, np.int64)
        self.ends = self.first_ids + self.n_windows
        self.segments = np.asarray(segments, np.int64)
        self.first_rows = np.asarray(first_rows, np.int64)
        self.positions = np.cumsum(self.n_windows) - self.n_windows
        self.n = int(self.n_windows.sum())
        if len(self.first_ids) > 1 and np.any(self.first_ids[1:] < self.ends[:-1]):
            raise ValueError("layout: id ranges must increase and not overlap")

    @classmethod
    def of(cls, ranges: Sequence[tuple[int, int, int]]) -> Layout:
        """Consecutive ids from 0 over (segment, first_row, n_windows) per track, in order."""
        sizes = np.array([r[2] for r in ranges], np.int64)
        firsts = np.cumsum(sizes) - sizes
        return cls(firsts, [r[0] for r in ranges], [r[1] for r in ranges], sizes)

    @property
    def next_id(self) -> int:
        """One past the highest id in use (0 when empty)."""
        return int(self.ends[-1]) if len(self.ends) else 0

    def run_of(self, ids: np.ndarray) -> np.ndarray:
        """Track index of each id (valid ids only: an id in a gap names the run before it)."""
        return np.searchsorted(self.first_ids, ids, side="right") - 1

    def place(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(track index, segment, row) of each id (ids must be valid, >= 0)."""
        run = self.run_of(ids)
        return run, self.segments[run], self.first_rows[run] + (ids - self.first_ids[run])

    def position(self, ids: np.ndarray) -> np.ndarray:
        """Place of each (valid) id in the runs' order: the index of per-window arrays."""
        run = self.run_of(ids)
        return self.positions[run] + (ids - self.first_ids[run])

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """The ids at ``positions`` (0 <= p < n) of the runs' order."""
        run = np.searchsorted(self.positions, positions, side="right") - 1  # runs hold >= 1
        return self.first_ids[run] + (positions - self.positions[run])

    def all_ids(self) -> np.ndarray:
        """Every id, in runs order."""
        if not len(self.first_ids):
            return np.zeros(0, np.int64)
        return np.concatenate(
            [
                np.arange(f, e, dtype=np.int64)
                for f, e in zip(self.first_ids, self.ends, strict=True)
            ]
        )
