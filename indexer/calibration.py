"""The no-match calibration, shared by the build (which measures it) and the search (which uses it).

A catalogue's *no-match floor* is how similar unrelated content gets in it:
for a seeded sample of indexed windows, the best exact similarity to a window
of another track, at a high quantile. A clip of an un-indexed track meets the
catalogue the same way, so the search counts evidence only above the higher of
that floor and a local background: the similarity of the ``rank``-th most
similar distinct track among a clip window's neighbours
(:func:`background`; :mod:`mert_indexer.indexer.search`).

The same sample sets the catalogue's *threshold*: each sampled window, left
out of its own track, is a window of music this catalogue does not hold; the
evidence its best other track gets above that background is what one pair of
an un-indexed clip reaches, and the search's score is a mean of such pairs.
The threshold is a high quantile of it (``THRESHOLD_QUANTILE``), never below
``MIN_THRESHOLD`` = 0.6, the threshold measured on seeded synthetic
catalogues (``benchmarks/results/index_bench.md``): there a clip's windows are
nearly independent tries at a chance match, and un-indexed clips reached 0.59
where the one-window estimate said less than 0.5. Real music, embedded by a
shift-tolerant model, is the other way round: neighbouring clip windows are
near-copies of each other, a clip gets few tries, and the estimate is what
un-indexed clips reach. Measured on the stand-in model (``export/standin``),
held-apart freedroidrpg tracks, 100 clips of 10 s of un-indexed tracks per
degradation, at a 5 s index hop: estimate 0.664, un-indexed clips at most
0.656 -- above the 0.6 a fixed threshold would have answered at, with the
floor below. The estimate follows the catalogue: 0.51-0.71 for the stand-in's
training and held-apart tracks at 1.25-5 s hops (thresholds 0.6-0.71;
``benchmarks/results/retrieval_standin_*``).

Both are measured against the ``NULL_NEIGHBOURS`` nearest windows of *other*
tracks, as a clip of un-indexed music meets them: a window's own track crowds
its neighbours in an index of overlapping windows, and a floor taken from the
few windows that still had other-track neighbours overstated it (0.87 against
0.81 at a 1.25 s hop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mert_indexer.indexer.kinds import ExactIndex, IvfPqIndex
from mert_indexer.indexer.layout import Layout

BACKGROUND_RANK = 3  # the local background: this most similar distinct track
MAX_OVERLAP = 16  # window / index hop is counted up to this
OVERLAP_TRACKS = 16  # tracks whose window spacing gives the index's hop
NULL_SAMPLE = 2048  # windows whose nearest other-track window sets the no-match floor
NULL_NEIGHBOURS = 32
NULL_BATCH = 256  # sampled windows searched at a time
WITHIN_TRACK_GAP = 2  # windows apart: windows of one track compared with each other
THRESHOLD_QUANTILE = 0.999  # of left-out windows' evidence: the catalogue's threshold
MIN_THRESHOLD = 0.6  # the threshold measured on synthetic catalogues (above)


@dataclass(frozen=True)
class Calibration:
    """What the build measures for the search: the no-match floor and the threshold."""

    null_similarity: float | None  # the floor; None: too few windows to say
    min_score: float | None  # the threshold; None: too few tracks (the search's default)


def index_overlap(track_starts: list[np.ndarray], window: float) -> int:
    """Indexed windows covering a point of a track: ``window`` / the median hop, at least 1.

    ``track_starts``: the window starts of some tracks (``OVERLAP_TRACKS`` are
    plenty), in ``window``'s units.
    """
    steps = (np.diff(np.asarray(t, np.float64)) for t in track_starts)
    gaps = np.concatenate([np.zeros(0), *steps])
    gaps = gaps[gaps > 0]
    if not len(gaps):
        return 1
    return int(np.clip(round(window / float(np.median(gaps))), 1, MAX_OVERLAP))


def track_rank_similarity(sims: np.ndarray, runs: np.ndarray, rank: int) -> np.ndarray:
    """Per row: the best similarity of the ``rank``-th most similar distinct track.

    ``runs`` names each hit's track (< 0: no hit). A row with fewer distinct
    tracks gets its lowest similarity: an upper bound, hence the stricter value.
    """
    order = np.argsort(-np.where(runs >= 0, sims, -np.inf), axis=1, kind="stable")
    sims = np.take_along_axis(sims, order, axis=1)
    runs = np.take_along_axis(runs, order, axis=1)
    k = sims.shape[1]
    earlier = np.tril(np.ones((k, k), bool), -1)
    seen = ((runs[:, :, None] == runs[:, None, :]) & earlier).any(axis=2)
    new_track = ~seen & (runs >= 0)
    at = new_track & (np.cumsum(new_track, axis=1) == rank)
    last = np.maximum((runs >= 0).sum(axis=1) - 1, 0)
    pos = np.where(at.any(axis=1), np.argmax(at, axis=1), last)
    result: np.ndarray = sims[np.arange(len(sims)), pos].astype(np.float64)
    return result


def background(sims: np.ndarray, runs: np.ndarray, rank: int, floor: float | None) -> np.ndarray:
    """Per clip window: what mere resemblance reaches, at least the catalogue's floor.

    The best similarity of its ``rank``-th most similar track (same style, same
    instrument), measured where the clip is; a copy of the clip stands far
    above it. ``floor=None`` (no calibration, or ranking without a threshold):
    the local part alone.
    """
    local = track_rank_similarity(sims, runs, rank)
    return local if floor is None else np.maximum(local, floor)


def pair_evidence(sims: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """How far each similarity stands above its row's background, on the way to 1.

    ``sims[j, :]`` against background ``bg[j]``: ``(sim - bg) / (1 - bg)``,
    clipped to [0, 1].
    """
    out: np.ndarray = np.clip((sims - bg[:, None]) / np.maximum(1.0 - bg, 1e-6)[:, None], 0.0, 1.0)
    return out


def calibrate(
    index: ExactIndex | IvfPqIndex,
    layout: Layout,
    vectors: Callable[[np.ndarray], np.ndarray],
    seed: int,
    quantile: float,
    overlap: int = 1,
) -> Calibration:
    """The catalogue's no-match floor (a ``quantile`` of unrelated best similarities) and threshold.

    ``vectors(ids)`` gives prepared (centred, normalised) stored vectors; hits
    are re-scored exactly, also for IVF-PQ. A copy of the same music under
    another path (another encoding, another album) must not set either: when
    the best other track also matches the sampled window's neighbour at the
    same offset, it is taken for a copy and the next track's similarity is used
    instead. One track: the floor from its own distant windows (``overlap``,
    window / index hop, says how far apart windows share no audio), no threshold.
    """
    n = layout.n
    if len(layout.first_ids) < 2:
        return Calibration(_within_track_floor(layout, vectors, seed, quantile, overlap), None)
    run_of = layout.run_of
    sample = layout.ids_at(  # ids, drawn by position: ids may have gaps (deleted tracks)
        np.sort(np.random.default_rng(seed + 1).choice(n, size=min(NULL_SAMPLE, n), replace=False))
    )
    values, local = [], []
    for lo in range(0, len(sample), NULL_BATCH):
        pos = sample[lo : lo + NULL_BATCH]
        own = run_of(pos)
        q = vectors(pos)
        ids, other = _other_track_hits(index, q, own, run_of, n)
        hit_run = run_of(np.maximum(ids, 0))
        sims = np.full(ids.shape, -np.inf, np.float32)  # exact, also for IVF-PQ hits
        sims[other] = np.einsum(
            "nd,nd->n", np.repeat(q, other.sum(axis=1), axis=0), vectors(ids[other])
        )
        runs = np.where(other, hit_run, -1)
        first, second = (track_rank_similarity(sims, runs, r) for r in (1, 2))
        # Copy test: the best other window's neighbour against the sample's neighbour.
        best = ids[np.arange(len(pos)), np.argmax(sims, axis=1)]
        step = np.where(pos + 1 < layout.ends[own], 1, -1)
        nb_own, nb_hit = pos + step, best + step
        ok = (nb_own >= layout.first_ids[own]) & (nb_own < layout.ends[own]) & np.isfinite(first)
        hit_own = run_of(best)
        ok &= (nb_hit >= layout.first_ids[hit_own]) & (nb_hit < layout.ends[hit_own])
        copy = np.zeros(len(pos), bool)
        if ok.any():
            nb_sims = np.einsum("nd,nd->n", vectors(nb_own[ok]), vectors(nb_hit[ok]))
            copy[ok] = nb_sims > second[ok]
        values.append(np.where(copy, second, first))
        # The background such a window meets as a clip of un-indexed music; with
        # a copy left out, its next track is one rank further.
        local.append(
            np.where(
                copy,
                track_rank_similarity(sims, runs, BACKGROUND_RANK + 1),
                track_rank_similarity(sims, runs, BACKGROUND_RANK),
            )
        )
    v, loc = np.concatenate(values), np.concatenate(local)
    keep = np.isfinite(v)
    if not keep.any():
        return Calibration(None, None)
    v, loc = v[keep], loc[keep]
    floor = round(float(np.quantile(v, quantile)), 4)
    chance = pair_evidence(v[:, None], np.maximum(loc, floor))[:, 0]
    threshold = max(MIN_THRESHOLD, float(np.quantile(chance, THRESHOLD_QUANTILE)))
    return Calibration(floor, round(threshold, 4))


def _other_track_hits(
    index: ExactIndex | IvfPqIndex,
    q: np.ndarray,
    own: np.ndarray,
    run_of: Callable[[np.ndarray], np.ndarray],
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask): each row's ``NULL_NEIGHBOURS`` nearest windows of other tracks.

    What a clip of un-indexed music meets among its neighbours. A window's own
    track crowds its nearest neighbours (all of them in a catalogue indexed with
    overlapping windows), so rows short of other-track hits are asked again with
    four times the neighbours, until they have enough or hold the whole index.
    """
    k = min(n, NULL_NEIGHBOURS)
    out = np.full((len(q), k), -1, np.int64)
    todo = np.arange(len(q))
    ask = k
    while len(todo):
        _, ids = index.candidates(q[todo], ask)
        other = (ids >= 0) & (run_of(np.maximum(ids, 0)) != own[todo, None])
        enough = (other.sum(axis=1) >= k) | (ask >= n)
        for row in np.flatnonzero(enough):
            found = ids[row][other[row]][:k]
            out[todo[row], : len(found)] = found
        todo = todo[~enough]
        ask = min(n, ask * 4)
    return out, out >= 0


def _within_track_floor(
    layout: Layout,
    vectors: Callable[[np.ndarray], np.ndarray],
    seed: int,
    quantile: float,
    overlap: int,
) -> float | None:
    """The floor of a one-track catalogue: how alike its own distant windows are.

    For a sample of windows, the best similarity to a window of the same track
    at least ``WITHIN_TRACK_GAP`` windows away (``overlap`` positions a window:
    no shared audio). Music resembles itself more than it resembles
    other music, so this floor is stricter than one measured against other
    tracks: with one indexed track, a clip of other music is answered "no
    match" rather than matched to the only candidate (without a floor, 46 of
    100 synthetic clips matched, tests/test_search.py; 90 of 100 with the tiny
    random model); a track that repeats itself then rejects its own excerpts,
    the safe way to fail. Real music repeats: one freedroidrpg track with the
    stand-in model has its floor at 0.99 (its distant windows' best match is a
    repeat), and 93 of 100 10 s excerpts get no match, while no clip of other
    music is answered (``benchmarks/results/retrieval_standin_one_track*.md``;
    ranked without the threshold, 0.84 are placed within 0.5 s). A lower
    quantile would answer other music: on other seeds of the synthetic
    catalogue, 10-29 of 100 clips of other music matched at the median or
    below, 2-3 at the 95th percentile.
    """
    n = layout.n
    gap = WITHIN_TRACK_GAP * overlap
    if n <= gap:
        return None
    ids = layout.ids_at(np.arange(n))
    every = vectors(ids)
    rng = np.random.default_rng(seed + 2)
    sample = np.sort(rng.choice(n, size=min(NULL_SAMPLE, n), replace=False))
    best = []
    for lo in range(0, len(sample), NULL_BATCH):
        pos = sample[lo : lo + NULL_BATCH]
        sims = every[pos] @ every.T
        near = np.abs(pos[:, None] - np.arange(n)[None, :]) < gap
        sims[near] = -np.inf
        best.append(sims.max(axis=1))
    v = np.concatenate(best)
    v = v[np.isfinite(v)]
    return round(float(np.quantile(v, quantile)), 4) if len(v) else None
