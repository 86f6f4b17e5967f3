"""Seeded synthetic window embeddings shaped like MERT's, for tests and benchmarks.

Like faiss's ``contrib/datasets.SyntheticDataset``, but with the structure that
matters to our search: a track is a latent signal over time (frames of
``frame_seconds``, smoothed over ``smooth_frames`` so that neighbouring frames
resemble each other, plus a per-track component so that a track's windows
resemble each other more than another track's do), and a window's embedding is
the mean of the latent over the window -- what MERT's mean pooling does -- mapped
into ``dim`` dimensions by a fixed anisotropic linear map. So a window shifted by
0.25 s shares 95 % of its content with the original and embeds close to it; a
window of another track does not.

``offset`` adds one common vector to every embedding, ``offset`` times as long
as the content part: about 8 reproduces what an untrained (random-init) model
gives, cosine 0.95-0.995 between unrelated windows; 0 gives well-separated,
trained-model-like vectors. Every value depends only on (seed, track, start), so
a test can regenerate any window, or any shifted and noisy clip of a track.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SyntheticEmbedder:
    dim: int = 32
    latent_dim: int = 16
    seed: int = 0
    offset: float = 0.0
    window_seconds: float = 5.0
    frame_seconds: float = 0.5
    smooth_frames: int = 4
    track_share: float = 0.3
    _basis: np.ndarray = field(init=False, repr=False, compare=False)
    _offset_vec: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0xBA515])
        q, _ = np.linalg.qr(rng.standard_normal((self.dim, self.latent_dim)))
        spectrum = 1.0 / np.sqrt(
            1.0 + np.arange(self.latent_dim)
        )  # anisotropic, like real embeddings
        basis = (q * spectrum).astype(np.float32)
        # Scale so that a window's content part has unit norm on average.
        basis /= np.sqrt(np.sum(spectrum**2) * self._latent_var_scale())
        off = rng.standard_normal(self.dim)
        object.__setattr__(self, "_basis", basis)
        object.__setattr__(
            self, "_offset_vec", (self.offset * off / np.linalg.norm(off)).astype(np.float32)
        )

    def _latent_var_scale(self) -> float:
        # Variance of one latent coordinate of a window mean, for unit-variance white frames.
        frames = self.window_seconds / self.frame_seconds
        return self.track_share + (1 - self.track_share) / max(1.0, frames / self.smooth_frames)

    def frames(self, track: int, seconds: float) -> np.ndarray:
        """The track's latent signal, float64 [n_frames, latent_dim]."""
        rng = np.random.default_rng([self.seed, 1, track])
        n = int(np.ceil(seconds / self.frame_seconds)) + 1
        k = self.smooth_frames
        white = rng.standard_normal((n + k - 1, self.latent_dim))
        c = np.cumsum(white, axis=0)
        c = np.vstack([np.zeros((1, self.latent_dim)), c])
        smooth = (c[k:] - c[:-k]) / np.sqrt(k)  # moving sum of k frames, unit variance
        track_part = rng.standard_normal(self.latent_dim)
        return np.sqrt(self.track_share) * track_part + np.sqrt(1 - self.track_share) * smooth

    def windows(
        self,
        track: int,
        starts_seconds: np.ndarray,
        *,
        track_seconds: float,
        noise: float = 0.0,
        noise_seed: int = 0,
    ) -> np.ndarray:
        """float32 [n, dim] embeddings of the windows starting at ``starts_seconds``.

        ``noise`` adds isotropic noise of that norm relative to the content part
        (a re-encoded or re-recorded copy), drawn from ``noise_seed``.
        """
        starts = np.asarray(starts_seconds, np.float64)
        z = self.frames(track, track_seconds + self.window_seconds)
        f = self.frame_seconds
        integral = np.vstack([np.zeros((1, z.shape[1])), np.cumsum(z, axis=0) * f])

        def at(t: np.ndarray) -> np.ndarray:
            i = np.minimum((t / f).astype(np.int64), len(z) - 1)
            return integral[i] + (t - i * f)[:, None] * z[i]

        mean = (at(starts + self.window_seconds) - at(starts)) / self.window_seconds
        x = mean.astype(np.float32) @ self._basis.T + self._offset_vec
        if noise:
            rng = np.random.default_rng([self.seed, 2, track, noise_seed])
            x += (noise / np.sqrt(self.dim)) * rng.standard_normal(x.shape).astype(np.float32)
        return x


def index_starts(track_seconds: float, window_seconds: float = 5.0) -> np.ndarray:
    """Window starts (seconds) as the catalogue is indexed: hop = window, last one at the end."""
    if track_seconds <= window_seconds:
        return np.zeros(1)
    starts = np.arange(0.0, track_seconds - window_seconds + 1e-9, window_seconds)
    last = track_seconds - window_seconds
    if last - starts[-1] > 1e-9:
        starts = np.append(starts, last)
    return starts


def clip_starts(
    clip_seconds: float, hop_seconds: float = 0.5, window_seconds: float = 5.0
) -> np.ndarray:
    """Window starts (seconds, within the clip) the way a query clip is windowed: dense hop."""
    if clip_seconds <= window_seconds:
        return np.zeros(1)
    return np.arange(0.0, clip_seconds - window_seconds + 1e-9, hop_seconds)


def indexed_track(
    embedder: SyntheticEmbedder, track: int, seconds: float, sample_rate: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """(n_samples, int64 window starts in samples, embeddings) of a track, indexed as the
    catalogue is."""
    n_samples = round(seconds * sample_rate)
    seconds = n_samples / sample_rate
    starts = np.round(index_starts(seconds, embedder.window_seconds) * sample_rate).astype(np.int64)
    return n_samples, starts, embedder.windows(track, starts / sample_rate, track_seconds=seconds)


def synthetic_identity(dim: int = 32, sample_rate: int = 100) -> dict:
    """A store identity for synthetic vectors: 5 s windows, no overlap."""
    return {
        "model_id": "synthetic",
        "weights_sha256": "0" * 64,
        "layers": [6],
        "pooling": "mean",
        "window_samples": 5 * sample_rate,
        "sample_rate": sample_rate,
        "embedding_dim": dim,
        "hop_samples": 5 * sample_rate,
    }
