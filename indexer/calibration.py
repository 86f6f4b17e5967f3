"""The no-match calibration, shared by the build (which measures it) and the search (which uses it).

A catalogue's *no-match floor* is how similar unrelated content gets in it:
for a seeded sample of indexed windows, the best exact similarity to a window
of another track, at a high quantile. A clip of an un-indexed track meets the
catalogue the same way, so the search counts evidence only above the higher of
that floor and a local background: the similarity of the ``rank``-th most
similar distinct track among a clip window's neighbours
(:func:`background`; :mod:`mert_indexer.indexer.search`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mert_indexer.indexer.kinds import ExactIndex, IvfPqIndex
from mert_indexer.indexer.layout import Layout

NULL_SAMPLE = 2048  # windows whose nearest other-track window sets the no-match floor
NULL_NEIGHBOURS = 32
NULL_BATCH = 256  # sampled windows searched at a time
WITHIN_TRACK_GAP = 2  # positions apart: windows of one track compared with each other


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


def null_similarity(
    index: ExactIndex | IvfPqIndex,
    layout: Layout,
    vectors: Callable[[np.ndarray], np.ndarray],
    seed: int,
    quantile: float,
) -> float | None:
    """The catalogue's no-match floor: a ``quantile`` of unrelated best similarities.

    ``vectors(ids)`` gives prepared (centred, normalised) stored vectors; hits
    are re-scored exactly, also for IVF-PQ. ``None`` with fewer than two tracks.
    A copy of the same music under another path (another encoding, another
    album) must not set the floor: when the best other track also matches the
    sampled window's neighbour at the same offset, it is taken for a copy and
    the next track's similarity is used instead.
    """
    n = layout.n
    if len(layout.first_ids) < 2:
        return _within_track_floor(layout, vectors, seed, quantile)
    run_of = layout.run_of
    sample = layout.ids_at(  # ids, drawn by position: ids may have gaps (deleted tracks)
        np.sort(np.random.default_rng(seed + 1).choice(n, size=min(NULL_SAMPLE, n), replace=False))
    )
    values = []
    for lo in range(0, len(sample), NULL_BATCH):
        pos = sample[lo : lo + NULL_BATCH]
        own = run_of(pos)
        q = vectors(pos)
        _, ids = index.candidates(q, min(n, NULL_NEIGHBOURS))
        hit_run = run_of(np.maximum(ids, 0))
        other = (ids >= 0) & (hit_run != own[:, None])
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
    v = np.concatenate(values)
    v = v[np.isfinite(v)]
    return round(float(np.quantile(v, quantile)), 4) if len(v) else None


def _within_track_floor(
    layout: Layout,
    vectors: Callable[[np.ndarray], np.ndarray],
    seed: int,
    quantile: float,
) -> float | None:
    """The floor of a one-track catalogue: how alike its own distant windows are.

    For a sample of windows, the best similarity to a window of the same track
    at least ``WITHIN_TRACK_GAP`` positions away (no shared audio at the
    default hop of one window). Music resembles itself more than it resembles
    other music, so this floor is stricter than one measured against other
    tracks: with one indexed track, a clip of other music is answered "no
    match" rather than matched to the only candidate (without a floor, 46 of
    100 synthetic clips matched, tests/test_search.py; 90 of 100 with the tiny
    random model); a track that repeats itself literally may then
    reject some of its own excerpts, the safe way to fail.
    """
    n = layout.n
    if n <= WITHIN_TRACK_GAP:
        return None
    ids = layout.ids_at(np.arange(n))
    every = vectors(ids)
    rng = np.random.default_rng(seed + 2)
    sample = np.sort(rng.choice(n, size=min(NULL_SAMPLE, n), replace=False))
    best = []
    for lo in range(0, len(sample), NULL_BATCH):
        pos = sample[lo : lo + NULL_BATCH]
        sims = every[pos] @ every.T
        near = np.abs(pos[:, None] - np.arange(n)[None, :]) < WITHIN_TRACK_GAP
        sims[near] = -np.inf
        best.append(sims.max(axis=1))
    v = np.concatenate(best)
    v = v[np.isfinite(v)]
    return round(float(np.quantile(v, quantile)), 4) if len(v) else None
