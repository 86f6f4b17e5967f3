"""A built index generation loaded for search: k-NN over it, and ids mapped back to tracks.

Read-only once loaded, and safe to share between threads: FAISS's CPU
indexes answer concurrent searches (its documented guarantee), the search
parameters (``nprobe``) are set once at load, and the segment maps are created
under a lock (:class:`mert_indexer.indexer.segments.SegmentReader`). Safe to
use while a writer appends to the store or builds a newer generation: it keeps
its own files open and sees only the rows its generation names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.errors import StoreError
from mert_indexer.indexer.generation import Generation, read_current, read_generation
from mert_indexer.indexer.kinds import prepare
from mert_indexer.indexer.layout import Layout
from mert_indexer.indexer.segments import SegmentReader
from mert_indexer.indexer.similarity import TrackIndex, load_track_index


class LoadedIndex:
    """The live generation of ``index_root``, ready for k-NN."""

    def __init__(
        self, index_root: Path, segments_root: Path, *, use_gpu: bool | None = None
    ) -> None:
        gen = self._read(index_root)
        self.index_root = index_root
        self.generation: str = gen.path.name
        self.info: dict[str, Any] = gen.info
        self.kind: str = gen.info["kind"]
        self.params: dict[str, Any] = gen.info["params"]
        self.identity: dict[str, Any] = gen.info["identity"]
        self.runs = gen.runs
        self.mean = gen.mean
        self.norms = gen.norms
        self.paths = gen.paths
        self.sample_rates = gen.sample_rates
        self.layout: Layout = gen.layout
        segs, ends = self.runs[:, 1], self.runs[:, 2] + self.runs[:, 3]
        rows = {int(s): int(ends[segs == s].max()) for s in np.unique(segs)}
        self.segments = SegmentReader(segments_root, int(self.info["dim"]), rows)
        # Map every segment now: a compaction may delete the files this generation
        # names once a newer one is live; a mapping made before keeps them readable.
        for seg in rows:
            self.segments.vectors(seg)
            self.segments.starts(seg)
        self.index = gen.index
        self.index.ready_for_search(use_gpu)
        # Track similarity (indexer/similarity.py); None for a generation built without it.
        self.tracks: TrackIndex | None = load_track_index(gen.path, gen.info)

    @staticmethod
    def _read(index_root: Path) -> Generation:
        for attempt in range(2):  # a concurrent build may retire the generation we just named
            generation = read_current(index_root)
            if generation is None:
                raise StoreError(f"{index_root}: no index has been built (run the indexer first)")
            try:
                return read_generation(index_root / generation)
            except FileNotFoundError:
                if attempt:
                    raise StoreError(f"{index_root / generation}: index files vanished") from None
        raise AssertionError("unreachable")

    def is_live(self) -> bool:
        """Whether this is still the live generation (one read of ``CURRENT``).

        A loaded generation is a snapshot: tracks removed after it was loaded
        (``indexer-admin remove``) are still in it. A long-running service
        checks this and swaps in a new :class:`LoadedIndex` when it is not.
        """
        return read_current(self.index_root) == self.generation

    @property
    def ntotal(self) -> int:
        return int(self.info["n_vectors"])

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(run index, segment, row) of each FAISS id (ids must be valid, >= 0)."""
        return self.layout.place(ids)

    def start_seconds(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(run index, window start in seconds) of each FAISS id."""
        run, segs, rows = self.locate(ids)
        starts = np.empty(len(ids), np.float64)
        for seg in np.unique(segs):
            sel = segs == seg
            starts[sel] = self.segments.starts(int(seg))[rows[sel]]
        return run, starts / self.sample_rates[run]

    def track_windows(self, run: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS ids and window starts (seconds, increasing) of one track."""
        first_id, seg, first_row, n, _ = (int(v) for v in self.runs[run])
        starts = self.segments.starts(seg)[first_row : first_row + n] / self.sample_rates[run]
        return np.arange(first_id, first_id + n), starts

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Centred, normalised float32 copies of the stored windows ``ids``."""
        _, segs, rows = self.locate(ids)
        return self.prepare(self.segments.gather(segs, rows))

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Vectors as the index compares them: centred on the catalogue mean, normalised."""
        return prepare(x, self.mean)

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and ids of each query's ``k`` nearest windows (id -1: none)."""
        q = prepare(queries, self.mean)
        return self.index.search(q, min(k, self.ntotal), self.rerank_scores)

    def rerank_scores(self, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Exact similarities of prepared queries to candidate ids, from the float16 segments.

        Uses the stored norms of the centred vectors, so what is read needs no
        normalising: ``(x - mean) . q / |x - mean|``. Candidates < 0 get -inf.
        """
        valid = cand >= 0
        ids = cand[valid]
        _, segs, rows = self.locate(ids)
        raw = self.segments.gather(segs, rows)  # float32, neither centred nor normalised
        counts = valid.sum(axis=1)
        ends = np.cumsum(counts)  # rows of ``raw`` are grouped by query, in order
        dots = np.concatenate(
            [raw[e - c : e] @ q[i] for i, (e, c) in enumerate(zip(ends, counts, strict=True))]
        ) - np.repeat(q @ self.mean, counts)
        norms = self.norms[self.layout.position(ids)]
        sims = np.full(cand.shape, -np.inf, np.float32)
        sims[valid] = np.where(norms > 0, dots / np.maximum(norms, 1e-30), 0.0)
        return sims

    def close(self) -> None:
        self.segments.close()
