"""Answer "which track, and where in it, does this clip come from?".

The catalogue is indexed with hop = window (5 s) plus a last window aligned to
the track's end (or, ``indexer-client --hop-seconds``, with overlapping
windows); a clip is windowed with a dense hop (e.g. 0.5 s). So, whatever the
clip's offset, every indexed window lying inside the clip has one clip window
within half a hop of it -- a near-duplicate of it -- while the other clip
windows only partly overlap indexed windows. The search is built on that:

1. each clip window asks for its ``k`` nearest indexed windows (cosine around
   the catalogue mean, see :mod:`mert_indexer.indexer.kinds`), ``k`` times the
   index's overlap (window / index hop): a clip window's own track fills that
   many more of its nearest neighbours;
2. a hit's *evidence* is how far its similarity stands above a background, on
   the way to 1: ``e = (sim - b) / (1 - b)``, clipped to [0, 1]. The background
   ``b`` of a clip window is the higher of (a) the best similarity of its 3rd
   most similar distinct track -- what mere resemblance reaches where the clip
   is -- and (b) the catalogue's no-match floor, measured at build time: the
   95th percentile, over indexed windows, of the best similarity to another
   track (:mod:`mert_indexer.indexer.calibration`). Relative, so it means the
   same whether raw cosines sit near 0.3 (a trained model) or all above 0.95
   (an untrained one), and whatever the catalogue's size and density; the 3rd
   track, not the 2nd, so that a track indexed twice (two encodings) still
   matches;
3. the ``candidates`` tracks with the strongest hits are verified exactly:
   every clip window against every window of the track. Each (clip window,
   indexed window) pair implies an offset; every implied offset is a
   hypothesis, scored by the mean evidence of its *aligned pairs* -- each
   indexed window the clip contains, with its nearest clip window (within half
   a hop). Near-duplicates count; partial overlaps and runs of overlapping
   clip windows that fall on one random window do not add up. All offsets are
   tried, not only those of the k-NN hits: in a track whose places resemble
   each other (music repeats itself), the aligned window need not be among a
   clip window's ``k`` nearest;
4. the offset is read to a fraction of a hop by every indexed window aligned
   at the winning hypothesis: where its similarity to the clip windows peaks
   (a parabola through the aligned clip window's neighbourhood), averaged
   over those windows, weighted by their evidence (:func:`refine_offset`).
   One window's peak is blurred by the model's tolerance to small shifts;
   the indexed windows of a clip sit at different phases of the clip's hop,
   so their mean is closer than any one of them. On real music with the
   trained stand-in model, at a 1.25 s index hop, 10 s clips of held-apart
   tracks are placed within 0.5 s 0.99 / 0.99 / 0.98 / 0.95 (clean, mp3,
   20 and 10 dB SNR; 0.95 / 0.94 / 0.95 / 0.90 read from the best pair
   alone; ``benchmarks/results/retrieval_standin_hop1.25_cat_held_apart.md``).

No match (empty list) when the best score is below the index's threshold
(:attr:`Searcher.threshold`), calibrated at build time on the catalogue itself
and never below 0.6 (:mod:`mert_indexer.indexer.calibration`: the evidence
windows of one track get from the other tracks, as clips of un-indexed music
would); an index built without one uses ``DEFAULT_MIN_SCORE`` = 0.6. Measured
on seeded synthetic catalogues (``benchmarks/results/index_bench.md``,
"no-match calibration"; ``tests/test_search.py``) and on real music with the
trained stand-in model (``benchmarks/results/retrieval_standin_*``: 10 s clips
of held-apart tracks, clean, mp3 and noisy, excerpts at 0.70 or more,
un-indexed clips at most 0.66 at a 5 s index hop and 0.27 at 1.25 s, against
thresholds of 0.66 and 0.6). A catalogue of hundreds of tracks also calibrates
a threshold per number of aligned pairs (:attr:`Searcher.thresholds`): the
score of a clip whose best offset rests on several pairs is held to what
chance reaches with as many.

The threshold can only separate what the model separates: with the project's
tiny random-init test model, on a 29-window catalogue, 8 s excerpts and clips
of other tracks score alike (its windows 0.25 s apart are less alike than
windows of different tracks), so there about half of random excerpts get no
match; ``min_score=None`` ranks without the floor and the threshold (best
guesses, the right track first in the end-to-end tests' three excerpts), at the
price of answering for unknown clips too. A clip needs window + hop seconds
(5.5 s) to contain an indexed window whatever its offset; shorter ones are
scored by their best pair alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.errors import QueryError
from mert_indexer.indexer.calibration import (
    BACKGROUND_RANK,
    MIN_THRESHOLD,
    OVERLAP_TRACKS,
    background,
    index_overlap,
    pair_evidence,
)
from mert_indexer.indexer.generation import INDEX_DIR
from mert_indexer.indexer.hypothesis import best_hypothesis, candidate_tracks
from mert_indexer.indexer.loaded import LoadedIndex
from mert_indexer.indexer.segments import SEGMENTS_DIR

DEFAULT_MIN_SCORE = MIN_THRESHOLD  # the threshold of an index built without calibrating one


@dataclass(frozen=True)
class Match:
    """A track the clip comes from, where in it the clip starts, and how sure."""

    track: str  # the path as indexed
    offset_seconds: float
    score: float
    track_id: int  # the catalog's id of the track (never reused)


@dataclass(frozen=True)
class SearchOptions:
    k: int = 32  # neighbours per clip window, times the index's overlap (Searcher.overlap)
    background_rank: int = BACKGROUND_RANK  # the background: this most similar distinct track
    candidates: int = 10  # tracks whose hypotheses are verified
    # None: rank only -- no no-match floor, no threshold: best guesses for any clip
    min_score: float | None = DEFAULT_MIN_SCORE
    # The index's own thresholds by aligned pairs (1, 2, ...; the last for more), in
    # place of a min_score that is not None; None: min_score whatever the pairs
    pair_thresholds: tuple[float, ...] | None = None


class Searcher:
    """Loads the built index of ``index_dir`` once and answers queries.

    Safe to share between threads: after construction it holds only read-only
    state (the loaded generation, see :class:`mert_indexer.indexer.loaded.LoadedIndex`,
    and frozen options); :meth:`search` keeps its working arrays local.

    Raises :class:`mert_indexer.errors.StoreError` when no index has been built.
    """

    def __init__(
        self,
        index_dir: str | Path,
        *,
        options: SearchOptions | None = None,
        use_gpu: bool | None = None,
    ) -> None:
        root = Path(index_dir)
        self.index_dir = root
        self._index = LoadedIndex(root / INDEX_DIR, root / SEGMENTS_DIR, use_gpu=use_gpu)
        self.identity: dict[str, Any] = self._index.identity
        self.info: dict[str, Any] = self._index.info
        calibrated = self.info["params"].get("min_score")
        self.threshold = DEFAULT_MIN_SCORE if calibrated is None else float(calibrated)
        """The index's own threshold: calibrated at build time, else ``DEFAULT_MIN_SCORE``."""
        by_pairs = self.info["params"].get("min_score_by_pairs")
        self.thresholds: tuple[float, ...] | None = (
            None if by_pairs is None else tuple(float(t) for t in by_pairs)
        )
        """The index's thresholds for a clip placed by 1, 2, ... aligned pairs (the
        first is :attr:`threshold`), calibrated at build time; ``None``: one for all."""
        self.options = options or SearchOptions(
            min_score=self.threshold, pair_thresholds=self.thresholds
        )
        self._window_seconds = int(self.identity["window_samples"]) / int(
            self.identity["sample_rate"]
        )
        self.overlap = self._overlap()
        """Indexed windows covering a point of a track: window / index hop (1 at the default)."""

    @property
    def index(self) -> LoadedIndex:
        """The loaded generation this searcher answers from (read-only; shared safely)."""
        return self._index

    def search(
        self,
        embeddings: np.ndarray,
        clip_starts: np.ndarray,
        *,
        top: int = 5,
        options: SearchOptions | None = None,
    ) -> list[Match]:
        """Best ``top`` tracks for a clip's window embeddings, or ``[]`` for no match.

        ``clip_starts``: seconds where each window starts within the clip.
        ``options`` overrides the searcher's own for this call (e.g. ``min_score``).
        """
        emb, starts = self._check(embeddings, clip_starts)
        opts = options or self.options
        if self._index.ntotal == 0:
            return []
        q = self._index.prepare(emb)
        # A clip window's own track fills ``overlap`` times as many of its nearest
        # neighbours in an index of overlapping windows: ask for as many more, so
        # that the background's distinct tracks are still among them.
        k = max(2, min(opts.k * self.overlap, self._index.ntotal))
        sims, ids = self._index.knn(emb, k)
        runs = np.full(ids.shape, -1, np.int64)
        runs[ids >= 0] = self._index.locate(ids[ids >= 0])[0]
        floor = self.info["params"].get("null_similarity")
        bg = background(sims, runs, opts.background_rank, None if opts.min_score is None else floor)
        evidence = np.where(runs >= 0, pair_evidence(sims, bg), 0)

        # Zero wherever the neighbour is not a live window: no candidates, no match.
        results: list[Match] = []
        for r in candidate_tracks(runs, evidence, opts.candidates):
            score, offset, pairs = self._verify(q, starts, bg, r)
            if _answers(opts, score, pairs):
                results.append(
                    Match(
                        self._index.paths[r],
                        max(0.0, offset),
                        round(score, 4),
                        int(self._index.runs[r, 4]),
                    )
                )
        results.sort(key=lambda m: -m.score)
        return results[:top]

    def _verify(
        self,
        q: np.ndarray,
        starts: np.ndarray,
        bg: np.ndarray,
        run: int,
    ) -> tuple[float, float, int]:
        """(score, offset, aligned pairs) of the best hypothesis: the clip is track ``run``.

        Every clip window is compared exactly with every window of the track and
        every offset those pairs imply is scored (:func:`best_hypothesis`); the
        winner is then read to a fraction of a hop by every indexed window
        aligned with it (:func:`refine_offset`).
        """
        ids, track_starts = self._index.track_windows(run)
        sims = q @ self._index.vectors(ids).T  # [clip windows, track windows]
        hop = self._hop(starts)
        evidence = pair_evidence(sims, bg)
        best = best_hypothesis(sims, starts, track_starts, hop, evidence)
        pair = (best.clip_window, best.track_window)
        offset = refine_offset(
            sims, starts, track_starts, pair, hop, evidence, track_axis=self.overlap > 1
        )
        return best.score, offset, best.pairs

    def _overlap(self) -> int:
        """Window / index hop, from the spacing of the first tracks' windows."""
        runs = range(min(len(self._index.runs), OVERLAP_TRACKS))
        return index_overlap([self._index.track_windows(r)[1] for r in runs], self._window_seconds)

    @staticmethod
    def _hop(starts: np.ndarray) -> float:
        steps = np.diff(np.unique(starts))
        return float(np.median(steps)) if len(steps) else 0.0

    def _check(
        self, embeddings: np.ndarray, clip_starts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        emb = np.asarray(embeddings, np.float32)
        starts = np.asarray(clip_starts, np.float64)
        dim = int(self.info["dim"])
        if emb.ndim != 2 or emb.shape[1] != dim or len(emb) == 0:
            raise QueryError(
                f"clip embeddings of shape {emb.shape}; this index expects [m >= 1, {dim}]"
            )
        if starts.shape != (len(emb),):
            raise QueryError(f"{len(emb)} clip windows but {starts.size} start times")
        if not (np.isfinite(emb).all() and np.isfinite(starts).all()):
            raise QueryError("clip embeddings or start times contain NaN or Inf")
        return emb, starts

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answers(opts: SearchOptions, score: float, pairs: int) -> bool:
    """Whether a match of ``score``, placed by ``pairs`` aligned pairs, is answered."""
    if opts.min_score is None:  # ranking
        return True
    if opts.pair_thresholds:
        return score >= opts.pair_thresholds[min(max(pairs, 1), len(opts.pair_thresholds)) - 1]
    return score >= opts.min_score


def refine_offset(
    sims: np.ndarray,
    clip_starts: np.ndarray,
    track_starts: np.ndarray,
    pair: tuple[int, int],
    hop: float,
    evidence: np.ndarray,
    *,
    track_axis: bool,
) -> float:
    """The clip's offset in the track, to a fraction of a hop, around its best ``pair``.

    ``pair`` = (clip window, track window) of the winning hypothesis
    (:func:`best_hypothesis`), which places the clip at ``o``. Every indexed
    window the clip contains at ``o`` has an aligned clip window (the nearest
    to its start); its similarity peaks at that one or a neighbour (one hop
    either way: the model's tolerance to small shifts, not another place),
    refined by a parabola through the peak's neighbours. Each such window
    reads the offset as its start minus that peak's clip time; the readings
    are averaged, weighted by each peak's ``evidence``.

    A clip of one window has no clip axis to read along: with ``track_axis``
    (the index's windows overlap, so neighbouring track windows are a finely
    sampled curve of the shift) the peak is refined along the track instead;
    otherwise the pair's own offset stands.
    """
    jp, ip = pair
    offset = float(track_starts[ip] - clip_starts[jp])
    if hop == 0:
        if not track_axis:
            return offset
        order = np.argsort(track_starts, kind="stable")
        pos = int(np.flatnonzero(order == ip)[0])
        return _parabola_peak(track_starts[order], sims[jp, order], pos) - float(clip_starts[jp])
    order = np.argsort(clip_starts, kind="stable")
    t = clip_starts[order]
    at = track_starts - offset  # where each indexed window lies in the clip
    inside = np.flatnonzero((at >= t[0] - hop / 2 - 1e-6) & (at <= t[-1] + hop / 2 + 1e-6))
    readings, weights = [], []
    for i in inside.tolist():
        curve = sims[order, i]
        j = int(np.argmin(np.abs(t - at[i])))
        lo, hi = max(0, j - 1), min(len(t), j + 2)
        peak = lo + int(np.argmax(curve[lo:hi]))
        weight = float(evidence[order[peak], i])
        if weight > 0:
            readings.append(float(track_starts[i]) - _parabola_peak(t, curve, peak))
            weights.append(weight)
    if not readings:
        return offset
    return float(np.average(readings, weights=weights))


def _parabola_peak(t: np.ndarray, y: np.ndarray, i: int) -> float:
    """Where ``y`` (sampled at sorted ``t``) peaks near its sample ``i``, sub-sample.

    The vertex of the parabola through samples ``i - 1``, ``i``, ``i + 1`` when
    they are equally spaced and bend down, kept within half a step of ``t[i]``;
    else ``t[i]``.
    """
    best = float(t[i])
    if 0 < i < len(t) - 1 and np.isclose(t[i] - t[i - 1], t[i + 1] - t[i]):
        denom = y[i - 1] - 2 * y[i] + y[i + 1]
        if denom < 0:
            step = float(t[i + 1] - t[i])
            best += float(np.clip(0.5 * (y[i - 1] - y[i + 1]) / denom, -0.5, 0.5)) * step
    return best
