"""The near-duplicate report: pairs of catalogue tracks that contain the same recording.

The search's verification (:mod:`mert_indexer.indexer.search`), applied track
against track over the window index:

1. *candidates*: every indexed window asks the window index for its ``k``
   nearest windows (IVF-PQ: a fixed, small ``nprobe``, the hits re-scored
   exactly from the store); a hit in another track above the catalogue's
   no-match floor (:mod:`mert_indexer.indexer.calibration`, measured by the
   build) proposes the hypothesis (track A, track B, offset difference
   d = start in B - start in A);
2. *hypotheses*: per pair of tracks, the hits are grouped by d on the index's
   hop grid (neighbouring grid steps together: a copy shifted by a fraction
   of the hop matches on the two steps either side of its shift); a group
   whose hits name at least ``min_windows`` distinct windows of A is verified;
3. *verification*: every window of A is paired with the window of B nearest to
   where the hypothesis puts it; the pair's evidence is its exact similarity
   above the floor, ``e = (sim - floor) / (1 - floor)`` clipped to [0, 1], as
   for a query. The best run of consecutive pairs with evidence (one window of
   no evidence bridged) is the shared recording: its start in A and in B are
   the aligned offsets, its span the overlap, its mean evidence the score.

A pair is reported when its run has ``min_windows`` windows spanning as many
hops (10 s) and a score of at least ``min_score`` = 0.1; one row per pair of
tracks (its best run). Measured like the query's no-match floor, on a seeded
synthetic catalogue of 103k windows (D = 768, untrained-like vectors) with 60
planted pairs (``benchmarks/bench_duplicates.py``,
``benchmarks/results/duplicates_bench.md``): the best unplanted pair scored
0.08, the weakest planted pair found 0.29; precision 1.0, recall 1.0 for
re-encodes and excerpts, 0.2 for copies shifted by 2 s (off the 5 s index
grid: their best-aligned windows share 60 % of their audio). Files with
identical bytes (the catalog's recorded content-hash duplicates) are listed
too, as ``identical``.

Cost: one k-NN per indexed window, so N queries for N windows. An exact index
(at most 30k windows by default) makes that N² · D multiply-adds, in blocked
matrix products; IVF-PQ with nlist ≈ 2√N lists and a fixed ``nprobe`` scans
nprobe/nlist of the codes per query: N^1.5 growth. The verification is
linear in the candidate hypotheses. At 103k windows (IVF-PQ, 2 shared cores): 71 s,
770 MB peak.
Memory is bounded by ``batch`` windows at a time plus the candidate hits
above the floor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mert_indexer.errors import StoreError
from mert_indexer.indexer.kinds import IvfPqIndex, load_faiss
from mert_indexer.indexer.loaded import LoadedIndex
from mert_indexer.progress import progress_bar

log = logging.getLogger(__name__)

DEFAULT_MIN_SCORE = 0.1


@dataclass(frozen=True)
class DuplicateOptions:
    k: int = 16  # neighbours per window
    nprobe: int = 16  # IVF lists visited per window (IVF-PQ only): near-duplicates lie close
    min_windows: int = 2  # aligned window pairs a shared run needs, and as many hops of overlap
    min_score: float = DEFAULT_MIN_SCORE  # mean evidence of the run
    max_gap: int = 1  # windows without evidence bridged inside a run
    batch: int = 2048  # windows searched at a time

    def __post_init__(self) -> None:
        if self.k < 1 or self.nprobe < 1 or self.min_windows < 1 or self.batch < 1:
            raise ValueError("k, nprobe, min_windows and batch must be at least 1")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score is between 0 and 1, got {self.min_score}")


@dataclass(frozen=True)
class DuplicatePair:
    """Two tracks sharing a recording: where it starts in each, how long, how sure."""

    track_a: str
    track_b: str
    track_id_a: int
    track_id_b: int
    offset_a_seconds: float
    offset_b_seconds: float
    overlap_seconds: float
    score: float
    windows: int  # aligned window pairs in the run
    match: str = "audio"  # "audio" | "identical" (same bytes: the catalog's duplicates)

    def as_dict(self) -> dict[str, Any]:
        return {
            "track_a": self.track_a,
            "track_b": self.track_b,
            "track_id_a": self.track_id_a,
            "track_id_b": self.track_id_b,
            "offset_a_seconds": round(self.offset_a_seconds, 3),
            "offset_b_seconds": round(self.offset_b_seconds, 3),
            "overlap_seconds": round(self.overlap_seconds, 3),
            "score": round(self.score, 4),
            "windows": self.windows,
            "match": self.match,
        }


def find_duplicates(
    loaded: LoadedIndex,
    options: DuplicateOptions = DuplicateOptions(),
    *,
    progress: bool = False,
) -> list[DuplicatePair]:
    """Every pair of tracks of ``loaded`` that shares a recording, best score first."""
    n = loaded.ntotal
    floor = loaded.params.get("null_similarity")
    if n == 0 or len(loaded.runs) < 2:
        return []
    if floor is None:
        raise StoreError(
            f"index generation {loaded.generation} records no no-match floor: rebuild the index"
        )
    floor = float(floor)
    hop = _hop_seconds(loaded)
    window = int(loaded.identity["window_samples"]) / int(loaded.identity["sample_rate"])
    a, b, d, e = _candidates(loaded, options, floor, progress)
    pairs: list[DuplicatePair] = []
    if len(a) == 0:
        return pairs
    run_a, run_b = loaded.layout.run_of(a), loaded.layout.run_of(b)
    order = np.lexsort((d, run_b, run_a))
    run_a, run_b, a, d, e = run_a[order], run_b[order], a[order], d[order], e[order]
    key = run_a * len(loaded.runs) + run_b
    bounds = np.flatnonzero(np.diff(key)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(key)], strict=True):
        ra, rb = int(run_a[lo]), int(run_b[lo])
        best: DuplicatePair | None = None
        for group in _offset_groups(d[lo:hi], hop):
            if len(np.unique(a[lo:hi][group])) < options.min_windows:
                continue
            w = e[lo:hi][group]
            offset = float(np.sum(d[lo:hi][group] * w) / max(float(w.sum()), 1e-12))
            found = _verify(loaded, ra, rb, offset, floor, hop, window, options)
            if found is not None and (best is None or found.score > best.score):
                best = found
        if best is not None and best.score >= options.min_score:
            pairs.append(best)
    pairs.sort(key=lambda p: (-p.score, p.track_a, p.track_b))
    return pairs


def identical_pairs(
    loaded: LoadedIndex,
    hashes: dict[int, str],
    duplicates: dict[str, str],
    seconds: dict[int, float],
) -> list[DuplicatePair]:
    """Files with the same bytes as an indexed track (the catalog's content-hash duplicates).

    ``hashes``: track id -> content hash; ``duplicates``: path -> content hash;
    ``seconds``: track id -> duration.
    """
    by_hash: dict[str, tuple[str, int]] = {}
    for path, track_id in zip(loaded.paths, loaded.runs[:, 4], strict=True):
        h = hashes.get(int(track_id))
        if h is not None:
            by_hash.setdefault(h, (path, int(track_id)))
    out = []
    for path, h in sorted(duplicates.items()):
        if h in by_hash:
            track, track_id = by_hash[h]
            length = seconds.get(track_id, 0.0)
            out.append(
                DuplicatePair(track, path, track_id, -1, 0.0, 0.0, length, 1.0, 0, "identical")
            )
    return out


def _hop_seconds(loaded: LoadedIndex) -> float:
    ident = loaded.identity
    hop = ident.get("hop_samples") or ident["window_samples"]
    return int(hop) / int(ident["sample_rate"])


def _candidates(
    loaded: LoadedIndex, options: DuplicateOptions, floor: float, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(window a, window b, start_b - start_a, evidence) of every hit above the floor.

    Each unordered pair of windows once, with ``a`` in the track stored first.
    """
    n = loaded.ntotal
    k = min(options.k + 1, n)
    params = None
    index = loaded.index
    if isinstance(index, IvfPqIndex):
        faiss = load_faiss()
        params = faiss.SearchParametersIVF(nprobe=min(options.nprobe, int(index.params["nlist"])))
    run_of = loaded.layout.run_of
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bar = progress_bar(progress, n, "duplicates: k-NN")
    for ids in _id_batches(loaded, options.batch):
        q = loaded.vectors(ids)
        if params is None:  # exact: FAISS's flat search (BLAS and heaps), exact similarities
            sims_all, hits = index.candidates(q, k)
        else:
            sims_all, hits = index.index.search(q, k, params=params)
        own = run_of(ids)
        other = (hits >= 0) & (run_of(np.maximum(hits, 0)) != own[:, None])
        rows = np.repeat(np.arange(len(ids)), other.sum(axis=1))
        hi = hits[other]
        if len(hi):
            if params is None:
                sims = sims_all[other].astype(np.float64)
            else:  # PQ's estimates re-scored exactly from the store
                sims = np.einsum("nd,nd->n", q[rows], loaded.vectors(hi))
            keep = sims > floor
            found.append((ids[rows][keep], hi[keep], sims[keep]))
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    if not found:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0), np.zeros(0)
    qa = np.concatenate([f[0] for f in found])
    qb = np.concatenate([f[1] for f in found])
    s = np.concatenate([f[2] for f in found]).astype(np.float64)
    a, b = np.minimum(qa, qb), np.maximum(qa, qb)
    span = int(max(a.max(), b.max())) + 1
    _, first = np.unique(a * span + b, return_index=True)
    a, b, s = a[first], b[first], s[first]
    _, ta = loaded.start_seconds(a)
    _, tb = loaded.start_seconds(b)
    return a, b, tb - ta, np.clip((s - floor) / max(1.0 - floor, 1e-6), 0.0, 1.0)


def _id_batches(loaded: LoadedIndex, batch: int) -> Iterator[np.ndarray]:
    """The FAISS ids of every indexed window, track after track, about ``batch`` at a time."""
    held: list[np.ndarray] = []
    count = 0
    for run in range(len(loaded.runs)):
        ids, _ = loaded.track_windows(run)
        held.append(ids)
        count += len(ids)
        if count >= batch:
            yield np.concatenate(held)
            held, count = [], 0
    if held:
        yield np.concatenate(held)


def _offset_groups(d: np.ndarray, hop: float) -> list[np.ndarray]:
    """Indices of ``d`` (sorted) grouped by hop-grid step, neighbouring steps together."""
    steps = np.round(d / hop).astype(np.int64)
    bounds = np.flatnonzero(np.diff(steps) > 1) + 1
    return [
        np.arange(lo, hi) for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(d)], strict=True)
    ]


def _verify(
    loaded: LoadedIndex,
    ra: int,
    rb: int,
    offset: float,
    floor: float,
    hop: float,
    window: float,
    options: DuplicateOptions,
) -> DuplicatePair | None:
    """The best run of track ``ra`` aligned with ``rb`` at ``offset``, or ``None``."""
    ids_a, t_a = loaded.track_windows(ra)
    ids_b, t_b = loaded.track_windows(rb)
    want = t_a + offset
    j = np.searchsorted(t_b, want)
    before, after = np.clip(j - 1, 0, len(t_b) - 1), np.clip(j, 0, len(t_b) - 1)
    j = np.where(np.abs(t_b[after] - want) < np.abs(t_b[before] - want), after, before)
    aligned = np.abs(t_b[j] - want) <= hop / 2 + 1e-6
    if aligned.sum() < options.min_windows:
        return None
    ia = np.flatnonzero(aligned)
    va, vb = loaded.vectors(ids_a[ia]), loaded.vectors(ids_b[j[ia]])
    sims = np.einsum("nd,nd->n", va, vb)
    ev = np.clip((sims - floor) / max(1.0 - floor, 1e-6), 0.0, 1.0)
    run = _best_run(ia, ev, options.max_gap)
    if run is None:
        return None
    lo, hi = run  # positions in ``ia``, inclusive
    count = hi - lo + 1
    first, last = ia[lo], ia[hi]
    start_a = float(t_a[first])
    overlap = float(t_a[last]) + window - start_a
    # In seconds, not windows alone: a track's last window (aligned to its end)
    # mostly repeats the one before it, so two windows may be one window's content.
    if count < options.min_windows or overlap < options.min_windows * hop - 1e-6:
        return None
    return DuplicatePair(
        loaded.paths[ra],
        loaded.paths[rb],
        int(loaded.runs[ra, 4]),
        int(loaded.runs[rb, 4]),
        start_a,
        max(0.0, start_a + offset),
        overlap,
        float(ev[lo : hi + 1].mean()),
        int(count),
    )


def _best_run(positions: np.ndarray, evidence: np.ndarray, max_gap: int) -> tuple[int, int] | None:
    """(first, last) index of the run of evidence with the largest sum.

    A run is consecutive aligned windows (``positions`` one apart) with
    evidence, bridging at most ``max_gap`` windows without.
    """
    best: tuple[float, int, int] | None = None
    start = None
    total = 0.0
    gap = 0
    last_good = -1
    for i, (p, e) in enumerate(zip(positions, evidence, strict=True)):
        broken = i > 0 and p != positions[i - 1] + 1
        if start is not None and (broken or (e <= 0 and gap >= max_gap)):
            if best is None or total > best[0]:
                best = (total, start, last_good)
            start, total, gap = None, 0.0, 0
        if e > 0:
            if start is None:
                start = i
            total += float(e)
            gap = 0
            last_good = i
        elif start is not None:
            gap += 1
    if start is not None and (best is None or total > best[0]):
        best = (total, start, last_good)
    return None if best is None else (best[1], best[2])
