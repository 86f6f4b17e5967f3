"""Seeded synthetic catalogues with planted relations, for the duplicate report and similarity.

A planted track is a list of pieces of source tracks, ``(source, start s, seconds)``,
played one after another: a re-encode is one whole piece plus noise, an excerpt
inside a new track three pieces, a time-shifted copy a short unrelated piece
and then the source. :class:`PlantedEmbedder` makes such tracks out of
:class:`~mert_indexer.indexer.synthetic.SyntheticEmbedder`'s latent frames, so a
window spanning a junction mixes its two sides as a real window would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mert_indexer.indexer.plan import PendingFile
from mert_indexer.indexer.store import IndexStore
from mert_indexer.indexer.synthetic import SyntheticEmbedder, index_starts, synthetic_identity

Piece = tuple[int, float, float]  # source track, start seconds, seconds


@dataclass(frozen=True)
class PlantedEmbedder(SyntheticEmbedder):
    pieces: dict[int, tuple[Piece, ...]] = field(default_factory=dict)
    # Each source's own length: a track's latent depends on it (its per-track part is
    # drawn after its frames), so a piece is cut from the source as it is indexed.
    source_seconds: dict[int, float] = field(default_factory=dict)

    def frames(self, track: int, seconds: float) -> np.ndarray:
        if track not in self.pieces:
            return super().frames(track, seconds)
        f = self.frame_seconds
        parts = []
        for source, start, length in self.pieces[track]:
            whole = self.source_seconds.get(source, start + length)
            z = super().frames(source, whole + self.window_seconds)
            i = round(start / f)
            parts.append(z[i : i + round(length / f)])
        z = np.vstack(parts)
        need = int(np.ceil(seconds / f)) + 1
        if len(z) < need:  # the tail past the track's end is never inside a window
            z = np.vstack([z, np.repeat(z[-1:], need - len(z), axis=0)])
        return z


@dataclass(frozen=True)
class Planted:
    """What a seeded catalogue holds: its tracks and the pairs planted in it."""

    seconds: dict[int, float]
    names: dict[int, str]
    # (track a, track b, offset in a, offset in b, overlap seconds)
    pairs: list[tuple[str, str, float, float, float]]


def planted_catalogue(
    n_unrelated: int = 12,
    *,
    dim: int = 32,
    seed: int = 7,
    offset: float = 0.0,
    shift: float = 2.0,
    copies: int = 1,
    seconds: tuple[float, float] = (40.0, 70.0),
    latent_dim: int = 16,
) -> tuple[PlantedEmbedder, Planted]:
    """Unrelated tracks 0..n-1 plus ``copies`` of each of three planted relations.

    For ``i < copies``, with ``s = 3 i``:
    - ``reencode_i``: track s whole, with noise (another encoding);
    - ``excerpt_i``: 10 s of unrelated audio, track s+1 from 10 s to 40 s, 12 s more;
    - ``shifted_i``: ``shift`` s of unrelated audio, then track s+2 whole.
    """
    assert n_unrelated >= 3 * copies and seconds[0] >= 40.0
    rng = np.random.default_rng(seed)
    length = {t: float(np.round(rng.uniform(*seconds), 1)) for t in range(n_unrelated)}
    names = {t: f"track{t:05d}.flac" for t in range(n_unrelated)}
    pieces: dict[int, tuple[Piece, ...]] = {}
    pairs = []
    base, other = 1_000_000, 2_000_000  # planted tracks; unrelated sources never indexed
    for i in range(copies):
        s = 3 * i
        r, e, h = base + s, base + s + 1, base + s + 2
        pieces[r] = ((s, 0.0, length[s]),)
        pieces[e] = ((other + s, 0.0, 10.0), (s + 1, 10.0, 30.0), (other + s + 1, 0.0, 12.0))
        pieces[h] = ((other + s + 2, 0.0, shift), (s + 2, 0.0, length[s + 2]))
        length |= {r: length[s], e: 52.0, h: shift + length[s + 2]}
        names |= {r: f"reencode_{i}.mp3", e: f"excerpt_{i}.ogg", h: f"shifted_{i}.wav"}
        pairs += [
            (names[s], names[r], 0.0, 0.0, length[s]),
            (names[s + 1], names[e], 10.0, 10.0, 30.0),
            (names[s + 2], names[h], 0.0, shift, length[s + 2]),
        ]
    emb = PlantedEmbedder(
        dim=dim,
        latent_dim=latent_dim,
        seed=seed,
        offset=offset,
        pieces=pieces,
        source_seconds=dict(length),
    )
    return emb, Planted(length, names, pairs)


def write_store(root: Path, emb: PlantedEmbedder, planted: Planted, sr: int = 100, **build) -> None:
    """A store of the catalogue (the re-encode with noise), index built."""
    identity = synthetic_identity(emb.dim, sr)
    with IndexStore.open(root, identity, create=True) as store:
        for t, secs in planted.seconds.items():
            n = round(secs * sr)
            starts = np.round(index_starts(n / sr) * sr).astype(np.int64)
            x = emb.windows(
                t,
                starts / sr,
                track_seconds=n / sr,
                noise=0.1 if planted.names[t].startswith("reencode") else 0.0,
            )
            store.add_track(
                PendingFile(planted.names[t], f"h{t}", 1, 1),
                n_samples=n,
                sample_rate=sr,
                starts=starts,
                embeddings=x,
            )
        store.commit()
        store.build_index(**build)
