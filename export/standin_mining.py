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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from export.standin import SAMPLE_RATE, WINDOW_SAMPLES

Embed = Callable[[np.ndarray], np.ndarray]  # float32 [n, WINDOW_SAMPLES] -> [n, D]

# Normalised cross-correlation at or above which two windows are the same audio
# (the retrieval benchmark counts an answer at such a repeat as right).
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


def literal_repeat(audio: np.ndarray, a: int, b: int, max_lag: int) -> bool:
    """Whether the windows at ``a`` and ``b`` are the same audio within ``max_lag`` samples.

    Best normalised cross-correlation of the window at ``a`` with those at
    ``b - max_lag .. b + max_lag`` (one FFT), at or above :data:`REPEAT_NCC`.
    """
    x = audio[a : a + WINDOW_SAMPLES].astype(np.float64)
    lo = max(0, b - max_lag)
    hi = min(len(audio), b + WINDOW_SAMPLES + max_lag)
    y = audio[lo:hi].astype(np.float64)
    if len(y) < WINDOW_SAMPLES:
        return False
    n = 1 << int(np.ceil(np.log2(len(y) + WINDOW_SAMPLES)))
    corr = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(x, n)), n)
    corr = corr[: len(y) - WINDOW_SAMPLES + 1]
    energy = np.concatenate([[0.0], np.cumsum(y * y)])
    sliding = energy[WINDOW_SAMPLES:] - energy[: len(y) - WINDOW_SAMPLES + 1]
    denom = np.sqrt(np.maximum(sliding, 0.0) * float(x @ x))
    ncc = np.divide(corr, denom, out=np.zeros_like(corr), where=denom > 1e-12)
    return bool(ncc.max() >= REPEAT_NCC)
