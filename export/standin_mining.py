"""Hard negatives for the stand-in: the places of a track that the model confuses.

The search finds the right track and then has to tell where in it the clip
starts; a model that embeds two places of one track alike answers the wrong
one. Random windows of the same track (``BatchSpec.per_track``) are mostly
easy negatives. Mining finds the hard ones: every track is embedded on a grid
(``grid_s``) with the current weights, and for each grid position the
``top`` most similar positions of the same track at least a window away are
kept, most similar first (cosine around the mean of all mined windows, as the
index centres on the catalogue mean).

A literal repeat (game music loops) cannot be told apart by any model, so it
must not be a negative: :func:`literal_repeat` checks the waveform when a
batch draws a confuser (``standin_data.batch``), only for the confusers
actually used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from export.standin import SAMPLE_RATE, WINDOW_SAMPLES

Embed = Callable[[np.ndarray], np.ndarray]  # float32 [n, WINDOW_SAMPLES] -> [n, D]

# Normalised cross-correlation at or above which two spans are the same audio. A
# loop decoded twice scores ~1.0; a held chord over different material reached
# 0.82 (the lag search lines up the tones' phases), so the bar is well above that.
REPEAT_NCC = 0.95
EMBED_BATCH = 16


@dataclass(frozen=True)
class Confusers:
    """Per track (by name): ``[positions, top]`` start samples of its most confusable places.

    Row ``i`` belongs to the window starting at ``i * grid`` samples; ``-1``
    pads rows with fewer than ``top`` candidates.
    """

    grid: int
    by_track: dict[str, np.ndarray]

    def candidates(self, track: str, start: int) -> np.ndarray:
        """Confusers of the window at ``start``, kept at its phase within the grid, best first."""
        table = self.by_track.get(track)
        if table is None or len(table) == 0:
            return np.zeros(0, np.int64)
        row = min(max(0, round(start / self.grid)), len(table) - 1)
        found = table[row][table[row] >= 0]
        return found + (start - row * self.grid)


def grid_starts(n_samples: int, grid: int) -> np.ndarray:
    """Window starts every ``grid`` samples that leave a full window."""
    return np.arange(0, n_samples - WINDOW_SAMPLES + 1, grid, dtype=np.int64)


def mine(
    tracks: Sequence[tuple[str, np.ndarray]],
    embed: Embed,
    *,
    grid_s: float = 1.0,
    top: int = 6,
) -> Confusers:
    """Each track's ``top`` most similar non-overlapping places of itself, on a ``grid_s`` grid."""
    grid = max(1, round(grid_s * SAMPLE_RATE))
    vectors: list[np.ndarray] = []
    for _, audio in tracks:
        starts = grid_starts(len(audio), grid)
        rows = [
            embed(np.stack([audio[s : s + WINDOW_SAMPLES] for s in starts[i : i + EMBED_BATCH]]))
            for i in range(0, len(starts), EMBED_BATCH)
        ]
        vectors.append(np.concatenate(rows) if rows else np.zeros((0, 1), np.float32))
    filled = [v for v in vectors if len(v)]
    mean = np.concatenate(filled).mean(axis=0) if filled else 0.0
    by_track: dict[str, np.ndarray] = {}
    apart = -(-WINDOW_SAMPLES // grid)  # grid steps between non-overlapping windows
    for (name, _), v in zip(tracks, vectors, strict=True):
        if len(v) == 0:
            by_track[name] = np.zeros((0, top), np.int64)
            continue
        u = v - mean
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        sims = u @ u.T
        idx = np.arange(len(u))
        sims[np.abs(idx[:, None] - idx[None, :]) < apart] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :top]
        table = order.astype(np.int64) * grid
        table[np.take_along_axis(sims, order, axis=1) == -np.inf] = -1
        by_track[name] = table
    return Confusers(grid=grid, by_track=by_track)


def repeat_ncc(
    audio: np.ndarray, true_start: int, answer_start: int, n: int, max_lag: int
) -> tuple[float, int]:
    """(NCC, lag): how well the track at ``answer_start + lag`` repeats it at ``true_start``.

    The best normalised cross-correlation (mean removed) over ``n`` samples,
    ``|lag| <= max_lag``, leaving out positions within ``max_lag`` of the true
    one (those are the excerpt itself, not a repeat). A repeat means NCC >=
    :data:`REPEAT_NCC`. The one definition of a literal repeat: training never
    draws one as a negative, the retrieval benchmark counts an answer at one
    as right.
    """
    ref = audio[true_start : true_start + n].astype(np.float64)
    lo = max(0, answer_start - max_lag)
    hi = min(len(audio), answer_start + max_lag + n)
    seg = audio[lo:hi].astype(np.float64)
    if len(ref) < n or len(seg) < n:
        return 0.0, 0
    ref = ref - ref.mean()
    ref_norm = float(np.linalg.norm(ref))
    size = 1 << math.ceil(math.log2(len(seg) + n))
    corr = np.fft.irfft(np.fft.rfft(seg, size) * np.conj(np.fft.rfft(ref, size)), size)
    positions = len(seg) - n + 1
    corr = corr[:positions]
    c1 = np.concatenate([[0.0], np.cumsum(seg)])
    c2 = np.concatenate([[0.0], np.cumsum(seg**2)])
    s1 = c1[n : n + positions] - c1[:positions]
    s2 = c2[n : n + positions] - c2[:positions]
    energy = np.maximum(s2 - s1**2 / n, 0.0)  # centred energy of each candidate window
    ncc = corr / np.maximum(np.sqrt(energy) * ref_norm, 1e-12)
    starts = lo + np.arange(positions)
    ncc[np.abs(starts - true_start) <= max_lag] = -1.0
    if ref_norm == 0 or not len(ncc):
        return 0.0, 0
    i = int(np.argmax(ncc))
    return float(ncc[i]), int(starts[i] - answer_start)


def literal_repeat(audio: np.ndarray, a: int, b: int, max_lag: int) -> bool:
    """Whether the window at ``b`` (within ``max_lag`` samples) repeats the one at ``a``."""
    return repeat_ncc(audio, a, b, WINDOW_SAMPLES, max_lag)[0] >= REPEAT_NCC
