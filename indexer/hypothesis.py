"""Which tracks a clip may come from, and its best offset in one of them.

Shared by the search (:mod:`mert_indexer.indexer.search`), which verifies
candidate tracks with them, and by the build's calibration
(:mod:`mert_indexer.indexer.calibration`), which scores clips of music the
catalogue does not hold the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Hypothesis(NamedTuple):
    """ "The clip is this track from here": its score, best pair and support."""

    score: float  # mean evidence of the aligned pairs
    clip_window: int  # the best aligned pair: clip window ...
    track_window: int  # ... and track window (it fixes the offset)
    pairs: int  # aligned pairs: indexed windows the clip holds at this offset


def candidate_tracks(runs: np.ndarray, evidence: np.ndarray, n: int) -> list[int]:
    """The ``n`` tracks with the strongest single hits, best first.

    ``runs`` names each hit's track, ``evidence`` its evidence; hits without
    evidence (0, also where there is no hit) do not count.
    """
    hit = evidence > 0
    strongest: dict[int, float] = {}
    for r, e in zip(runs[hit].tolist(), evidence[hit].tolist(), strict=True):
        strongest[r] = max(strongest.get(r, 0.0), e)
    return sorted(strongest, key=lambda r: -strongest[r])[:n]


def best_hypothesis(
    sims: np.ndarray,
    clip_starts: np.ndarray,
    track_starts: np.ndarray,
    hop: float,
    evidence: np.ndarray,
) -> Hypothesis:
    """A clip's best offset in one track, its best pair and how many pairs support it.

    ``sims[j, i]``: clip window ``j`` (starting ``clip_starts[j]`` into the
    clip, ``hop`` apart; any unit, the same for all four) against track window
    ``i`` (``track_starts[i]``). Every pair implies an offset; an offset's
    score is the mean ``evidence`` of its aligned pairs, those implying it to
    within half a hop (``evidence[j, i]``:
    :func:`mert_indexer.indexer.calibration.pair_evidence` above clip window
    ``j``'s background). Offsets that would put a clip window outside the track
    are not hypotheses, unless the clip is longer than the track.
    """
    flat = (track_starts[None, :] - clip_starts[:, None]).ravel()  # the offset each pair implies
    order = np.argsort(flat, kind="stable")
    sorted_offsets = flat[order]
    # Pairs aligned at offset o: implied offsets in [o - hop/2, o + hop/2) -- one
    # clip window per indexed window, as clip windows are one hop apart.
    if hop == 0:  # one clip window: each pair stands alone
        lo, hi = np.arange(len(flat)), np.arange(1, len(flat) + 1)
    else:
        lo = np.searchsorted(sorted_offsets, sorted_offsets - hop / 2 - 1e-9, side="left")
        hi = np.searchsorted(sorted_offsets, sorted_offsets + hop / 2 - 1e-9, side="left")

    total = np.concatenate([[0.0], np.cumsum(evidence.ravel()[order])])
    count = np.maximum(hi - lo, 1)
    scores = (total[hi] - total[lo]) / count
    last = float(track_starts.max())
    possible = (sorted_offsets + clip_starts.min() >= -hop / 2 - 1e-6) & (
        sorted_offsets + clip_starts.max() <= last + hop / 2 + 1e-6
    )
    if not possible.any():  # a clip longer than the track: any placement will do
        possible[:] = True
    best = int(np.argmax(np.where(possible, scores, -1.0)))
    # The best pair among those aligned at the winning offset fixes it.
    members = order[lo[best] : max(hi[best], lo[best] + 1)]
    pick = int(members[np.argmax(sims.ravel()[members])])
    jp, ip = divmod(pick, sims.shape[1])
    return Hypothesis(float(scores[best]), jp, ip, int(count[best]))
