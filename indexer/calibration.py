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

That threshold is what one pair needs. A clip placed by several aligned pairs
(an index of overlapping windows: 6-7 in a 10 s clip at a 1.25 s hop) meets
chance far less, and a catalogue of ``PAIR_MIN_TRACKS`` tracks or more also
calibrates a threshold per number of pairs (:func:`_pair_thresholds`: runs
of its own windows scored as the search scores a clip), which the search
applies by the pairs of a clip's best offset. Fewer tracks sample too few
ways for a whole track to resemble another: one threshold then holds.

A *reference* -- another index of music known not to be in the catalogue,
embedded by the same model at the same hop (``indexer-client
--calibrate-with``) -- is such music itself: its windows meet the index as
clips of un-indexed music do, and they calibrate the floor, the threshold and
(with the catalogue's tracks, from ``PAIR_MIN_TRACKS`` tracks over both) the
thresholds by pairs beside the catalogue's own windows; the stricter estimate
holds. It is what a one-track catalogue needs: no statistic of one track says
how near other music comes (:func:`_within_track_floor`). Measured with the
stand-in at a 1.25 s hop, against a reference of 257 game-music tracks: 10 s
excerpts of one freedroidrpg track placed 0.96-0.97 (alone: none), of one
wesnoth track 1.00 (alone: 0.58-0.65), no clip of other music of either game
answered (``benchmarks/results/retrieval_standin_one_track*_reference*``).

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

from mert_indexer.indexer.hypothesis import best_hypothesis, candidate_tracks
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
PAIR_CLIPS = 512  # clips of consecutive indexed windows that set the thresholds by pairs
PAIR_MIN_TRACKS = 200  # fewer tracks: one threshold, whatever the pairs
MAX_PAIRS = 8  # thresholds for 1 .. MAX_PAIRS aligned pairs; more pairs use the last
PAIR_CANDIDATES = 3  # other tracks verified per such clip


@dataclass(frozen=True)
class Calibration:
    """What the build measures for the search: the no-match floor and the threshold."""

    null_similarity: float | None  # the floor; None: too few windows to say
    min_score: float | None  # the threshold; None: too few tracks (the search's default)
    # thresholds for a clip placed by 1, 2, ... aligned pairs (the first: min_score)
    pair_thresholds: tuple[float, ...] | None = None


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


@dataclass(frozen=True)
class Windows:
    """Stored windows as the calibration reads them: the catalogue's, or a reference's.

    ``vectors(ids)`` gives prepared vectors (centred on the catalogue's mean,
    normalised), ``starts(ids)`` where the windows start in their track, both
    by the ids of ``layout``.
    """

    layout: Layout
    vectors: Callable[[np.ndarray], np.ndarray]
    starts: Callable[[np.ndarray], np.ndarray]

    @property
    def tracks(self) -> int:
        return len(self.layout.first_ids)


def calibrate(
    index: ExactIndex | IvfPqIndex,
    catalogue: Windows,
    seed: int,
    quantile: float,
    overlap: int = 1,
    reference: Windows | None = None,
) -> Calibration:
    """The catalogue's no-match floor (a ``quantile`` of unrelated best similarities), thresholds.

    Unrelated content comes from two places. Each sampled catalogue window,
    left out of its own track, stands for music the catalogue does not hold;
    and a ``reference`` (windows of music known not to be in the catalogue,
    embedded by the same model at the same hop) meets the index exactly as a
    clip of un-indexed music does. Where both exist, the stricter estimate
    holds; the thresholds by pairs need ``PAIR_MIN_TRACKS`` tracks sampled
    over both. Hits are re-scored exactly, also for IVF-PQ. A copy of the same
    music under another path (another encoding, another album; a reference
    that holds a catalogue track) must not set either: when the best
    catalogue track also matches the sampled window's neighbour at the same
    offset, it is taken for a copy and the next track's similarity is used
    instead. One track and no reference: the floor from its own distant
    windows (``overlap``, window / index hop, says how far apart windows
    share no audio), no threshold.
    """
    sources = []
    if catalogue.tracks >= 2:
        sources.append(catalogue)
    if reference is not None and reference.layout.n:
        sources.append(reference)
    if not sources:
        floor = _within_track_floor(catalogue, seed, quantile, overlap)
        return Calibration(floor, None)
    nulls = [_null_sample(index, catalogue, s, seed) for s in sources]
    nulls = [(v, loc) for v, loc in nulls if len(v)]
    if not nulls:
        return Calibration(None, None)
    floor = round(max(float(np.quantile(v, quantile)) for v, _ in nulls), 4)
    chance = max(
        float(
            np.quantile(pair_evidence(v[:, None], np.maximum(loc, floor))[:, 0], THRESHOLD_QUANTILE)
        )
        for v, loc in nulls
    )
    threshold = round(max(MIN_THRESHOLD, chance), 4)
    if sum(s.tracks for s in sources) < PAIR_MIN_TRACKS:
        return Calibration(floor, threshold)
    found = [
        highest
        for s in sources
        if (highest := _pair_chance(index, catalogue, s, seed, floor, threshold)) is not None
    ]
    if not found:
        return Calibration(floor, threshold, None)
    highest = np.max(found, axis=0)  # over both sources' runs
    by_pairs = [threshold]
    for p in range(2, MAX_PAIRS + 1):
        later = highest[p:][highest[p:] >= 0]
        by_pairs.append(round(min(threshold, float(later.max())), 4) if len(later) else threshold)
    return Calibration(floor, threshold, tuple(by_pairs))


def _sample_ids(layout: Layout, size: int, seed: int) -> np.ndarray:
    """A seeded draw of up to ``size`` ids, in id order, drawn by position (ids may have gaps)."""
    rng = np.random.default_rng(seed)
    return layout.ids_at(np.sort(rng.choice(layout.n, size=min(size, layout.n), replace=False)))


def _null_sample(
    index: ExactIndex | IvfPqIndex, catalogue: Windows, queries: Windows, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(best, background) per sampled window of ``queries``, as un-indexed music meets the index.

    ``best``: the similarity of its best catalogue track, or of the next where
    the best is a copy; ``background``: the local background it meets (the
    ``BACKGROUND_RANK``-th track, one further past a copy). Where ``queries``
    is the catalogue itself, each window's own track is left out.
    """
    layout, run_of = queries.layout, queries.layout.run_of
    cat = catalogue.layout
    sample = _sample_ids(layout, NULL_SAMPLE, seed + 1)
    values, local = [], []
    for lo in range(0, len(sample), NULL_BATCH):
        pos = sample[lo : lo + NULL_BATCH]
        own_run = run_of(pos)
        own = own_run if queries is catalogue else np.full(len(pos), -1)
        q = queries.vectors(pos)
        ids, sims, runs = _other_track_sims(index, catalogue, q, own)
        first, second = (track_rank_similarity(sims, runs, r) for r in (1, 2))
        # Copy test: the best other window's neighbour against the sample's neighbour.
        best = ids[np.arange(len(pos)), np.argmax(sims, axis=1)]
        step = np.where(pos + 1 < layout.ends[own_run], 1, -1)
        nb_own, nb_hit = pos + step, best + step
        ok = (nb_own >= layout.first_ids[own_run]) & (nb_own < layout.ends[own_run])
        ok &= np.isfinite(first)
        hit_own = cat.run_of(np.maximum(best, 0))
        ok &= (nb_hit >= cat.first_ids[hit_own]) & (nb_hit < cat.ends[hit_own])
        # A copy stands out from the next track. Where one track holds every hit,
        # ``second`` is merely its lowest: the next track is looked for further out,
        # and without one (a catalogue of one other track) there is no copy to tell.
        lone = ~((runs >= 0) & (runs != hit_own[:, None])).any(axis=1) & np.isfinite(first)
        if lone.any():
            second[lone] = _next_track_sim(index, catalogue, q[lone], own[lone], hit_own[lone])
        ok &= np.isfinite(second)
        copy = np.zeros(len(pos), bool)
        if ok.any():
            nb_sims = np.einsum(
                "nd,nd->n", queries.vectors(nb_own[ok]), catalogue.vectors(nb_hit[ok])
            )
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
    return v[keep], loc[keep]


def _pair_chance(
    index: ExactIndex | IvfPqIndex,
    catalogue: Windows,
    queries: Windows,
    seed: int,
    floor: float,
    threshold: float,
) -> np.ndarray | None:
    """What chance scores at 2 .. ``MAX_PAIRS`` aligned pairs: the thresholds by pairs.

    A clip's score is the mean evidence of the pairs aligned at its best
    offset, so chance reaches less the more pairs there are (at a 1.25 s index
    hop a 10 s clip holds 6-7 indexed windows). Measured as the search scores
    a clip: ``PAIR_CLIPS`` runs of up to ``MAX_PAIRS`` consecutive windows of
    ``queries`` (the catalogue, each run's own track left out; or a
    reference), each a clip of music the catalogue does not hold, are
    verified against their ``PAIR_CANDIDATES`` strongest catalogue tracks;
    each prefix's best score counts at its number of aligned pairs. A
    score at or above the one-pair ``threshold`` is music the catalogue holds
    twice (a shared passage, another version), not chance: the next track's is
    used. Returns chance's highest score by number of pairs (-1: none seen);
    the threshold for ``p`` pairs is the highest at ``p`` or more pairs, never
    above ``threshold`` (:func:`calibrate`). ``None`` when no track of
    ``queries`` has two windows.

    Chance at several pairs is mostly a whole track resembling another, so the
    runs sample it once per track: only from ``PAIR_MIN_TRACKS`` tracks
    (:func:`calibrate`) is that enough. On seeded synthetic catalogues of
    alike tracks at a 1.25 s hop, clips of other music scored up to 0.31-0.56
    at 4 pairs: with 100 tracks the thresholds were below that and answered
    3-5 of 300 such clips; with 200 (five catalogues), 1 of 1,500, while
    excerpts cleared them 1.03-3x as often as the one-pair threshold. On 293
    real game-music tracks at a 1.25 s hop, with the stand-in model: 0.23 for
    the 6-7 pairs of a 10 s clip against 0.6 for one, 1 of 400 clips of
    un-indexed tracks answered (score 0.39), and 10 s excerpts placed
    0.87-0.90 against 0.68-0.76 at the one-pair threshold, judged strictly
    (``benchmarks/results/retrieval_standin_hundreds_hop1.25.md``).
    """
    layout, cat = queries.layout, catalogue.layout
    firsts = _sample_ids(layout, PAIR_CLIPS, seed + 3)
    own = layout.run_of(firsts)
    lengths = np.minimum(layout.ends[own] - firsts, MAX_PAIRS)
    keep = lengths >= 2
    if not keep.any():
        return None
    firsts, own, lengths = firsts[keep], own[keep], lengths[keep]
    clip_ids = np.concatenate([np.arange(f, f + m) for f, m in zip(firsts, lengths, strict=True)])
    q = queries.vectors(clip_ids)
    left_out = np.repeat(own, lengths) if queries is catalogue else np.full(len(clip_ids), -1)
    _, sims, runs = _other_track_sims(index, catalogue, q, left_out)
    bg = np.maximum(track_rank_similarity(sims, runs, BACKGROUND_RANK), floor)
    evidence = np.where(runs >= 0, pair_evidence(sims, bg), 0.0)
    clip_starts = queries.starts(clip_ids).astype(np.float64)

    highest = np.full(MAX_PAIRS + 1, -1.0)  # chance's highest score, by aligned pairs
    row = 0
    for length in lengths.tolist():
        at = slice(row, row + length)
        row += length
        # Per candidate track: the whole run's similarities and evidence, its starts;
        # each prefix takes its first rows.
        tracks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for m in range(2, length + 1):
            cs = clip_starts[at][:m] - clip_starts[at][0]
            hop = float(np.median(np.diff(cs)))
            found = []
            for r in candidate_tracks(runs[at][:m], evidence[at][:m], PAIR_CANDIDATES):
                if r not in tracks:
                    ids = np.arange(cat.first_ids[r], cat.ends[r])
                    s = q[at] @ catalogue.vectors(ids).T
                    tracks[r] = (
                        s,
                        pair_evidence(s, bg[at]),
                        catalogue.starts(ids).astype(np.float64),
                    )
                s, e, track_starts = tracks[r]
                found.append(best_hypothesis(s[:m], cs, track_starts, hop, e[:m]))
            chance = sorted((h for h in found if h.score < threshold), key=lambda h: -h.score)
            if chance:
                p = min(chance[0].pairs, MAX_PAIRS)
                highest[p] = max(highest[p], chance[0].score)
    return highest


def _next_track_sim(
    index: ExactIndex | IvfPqIndex,
    catalogue: Windows,
    q: np.ndarray,
    own: np.ndarray,
    best: np.ndarray,
) -> np.ndarray:
    """Each row's exact similarity to its nearest window of a track neither ``own`` nor ``best``.

    ``-inf`` where the catalogue holds no such track.
    """
    layout = catalogue.layout
    ids, found = _other_track_hits(
        index, q, np.stack([own, best], axis=1), layout.run_of, layout.n, k=1
    )
    out = np.full(len(q), -np.inf)
    hit = found[:, 0]
    if hit.any():
        out[hit] = np.einsum("nd,nd->n", q[hit], catalogue.vectors(ids[hit, 0]))
    return out


def _other_track_sims(
    index: ExactIndex | IvfPqIndex, catalogue: Windows, q: np.ndarray, own: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, sims, runs) of each row's nearest windows of other tracks (:func:`_other_track_hits`).

    Similarities are exact, also for IVF-PQ hits; ``-inf`` and run ``-1`` where
    a row has fewer hits.
    """
    layout = catalogue.layout
    ids, other = _other_track_hits(index, q, own[:, None], layout.run_of, layout.n)
    sims = np.full(ids.shape, -np.inf, np.float32)
    sims[other] = np.einsum(
        "nd,nd->n", np.repeat(q, other.sum(axis=1), axis=0), catalogue.vectors(ids[other])
    )
    return ids, sims, np.where(other, layout.run_of(np.maximum(ids, 0)), -1)


def _other_track_hits(
    index: ExactIndex | IvfPqIndex,
    q: np.ndarray,
    left_out: np.ndarray,
    run_of: Callable[[np.ndarray], np.ndarray],
    n: int,
    k: int = NULL_NEIGHBOURS,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask): each row's ``k`` nearest windows of tracks other than its ``left_out``.

    ``left_out[row]``: the tracks a row does not count (-1: none). What a clip
    of un-indexed music meets among its neighbours. A window's own
    track crowds its nearest neighbours (all of them in a catalogue indexed with
    overlapping windows), so rows short of other-track hits are asked again with
    four times the neighbours, until they have enough or hold the whole index.
    """
    k = min(n, k)
    out = np.full((len(q), k), -1, np.int64)
    todo = np.arange(len(q))
    ask = k
    while len(todo):
        _, ids = index.candidates(q[todo], ask)
        hit_runs = run_of(np.maximum(ids, 0))
        other = (ids >= 0) & (hit_runs[:, :, None] != left_out[todo, None, :]).all(axis=2)
        enough = (other.sum(axis=1) >= k) | (ask >= n)
        for row in np.flatnonzero(enough):
            found = ids[row][other[row]][:k]
            out[todo[row], : len(found)] = found
        todo = todo[~enough]
        ask = min(n, ask * 4)
    return out, out >= 0


def _within_track_floor(
    catalogue: Windows, seed: int, quantile: float, overlap: int
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

    No statistic of the track itself says how near other music comes: that
    depends on the music the catalogue does not hold. At a 1.25 s hop, one
    freedroidrpg track (Hyperbattle) places 0.99-1.00 of its 10 s excerpts
    with a floor at 0.75 or below and no clip of other freedroidrpg music
    clears it; one wesnoth track (knolls) answers 3 of 100 10 s clips of other
    wesnoth tracks at 0.62 and none from 0.8. The 95th percentile of all
    distant pairs (0.74 and 0.62 there) answered 1-2 of 100 for another
    freedroidrpg track at the default hop. Two tracks are enough: each is
    the other's other music (10 s excerpts of two freedroidrpg tracks placed
    0.97-0.98, no clip of four other tracks answered,
    ``retrieval_standin_two_tracks_hop1.25.md``), and so is a reference
    (:func:`calibrate`): music known not to be in the catalogue.
    """
    layout = catalogue.layout
    n = layout.n
    gap = WITHIN_TRACK_GAP * overlap
    if n <= gap:
        return None
    ids = layout.ids_at(np.arange(n))
    every = catalogue.vectors(ids)
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
