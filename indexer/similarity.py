"""Track similarity: one pooled vector per track, a small track index, "more like this".

Over the ~400-line norm: pooling (with its incremental reuse), the two
track-index kinds and the finder are one feature, read together.

*Pooling.* A track's vector is the **time-weighted mean of its centred,
normalised window vectors** (the window index's own :func:`prepare`), then
centred on the catalogue's mean track vector and L2-normalised again, so inner
product is cosine around the mean, as for windows. Why this pooling:

- the mean over time is how MERT's own frame features become a clip vector
  (the exported graph mean-pools frames) and what MARBLE's track-level probes
  use; it is order-free, so a time-shifted copy pools close to the original;
- each window is normalised first, so a loud or a quiet stretch weighs the
  same, and centring on the window mean first removes the common direction an
  untrained or anisotropic model puts into every window;
- time weights (:func:`index_weights`): every second of the track counts
  once. The last window is aligned to the track's end and overlaps the one
  before it; without weights it would count double.

*The track index.* :class:`ExactTracks` (a matrix product over all track
vectors) up to ``TRACK_EXACT_MAX`` = 100,000 tracks, :class:`HnswTracks`
(FAISS ``IndexHNSWFlat``, M = 32, efSearch = 128, inner product) above. Measured
at D = 768 on one busy core (``benchmarks/bench_duplicates.py --part tracks``,
``benchmarks/results/duplicates_bench.md``): one exact query reads every track
vector (13.6 ms at 10k tracks, 55 ms at 50k, 112 ms at 200k: memory bound);
HNSW answered in 3.6 ms at 50k with recall@10 0.96 and built at ~330 tracks/s.
Exact stays under ~100 ms up to 100k tracks (~5M windows) and updates
incrementally (only new tracks are pooled); HNSW's graph is rebuilt whole on
every build (about a minute at 20k tracks), so it is kept for catalogues where
an exact query would cost more than that. Both search the same float32
vectors (``track_vectors.npy``), so scores are exact either way.

Files, inside the index generation they were built with
(:func:`mert_indexer.indexer.generation.write_generation`):

    track_vectors.npy   float32 [tracks, dim]: prepared track vectors, runs order
    track_mean.npy      float32 [dim]: the mean (pooled) track vector
    track_pooled.npy    float32 [tracks, dim]: the pooled vectors before the
                        catalogue-level centring (what the next build reuses)
    tracks.hnsw         the HNSW graph (only above ``TRACK_EXACT_MAX`` tracks)

:class:`TrackFinder` answers the queries (a track of the catalogue, or a
clip's window embeddings) and excludes the query track and every track with
the same content hash. Read-only after construction and safe to share
between threads.

*Incremental builds.* A track's pooled vector depends only on its own windows
and the window mean, so a build that updates a generation (the window mean is
the one trained then) reuses the previous generation's ``track_pooled.npy`` by
catalogue track id, pools only the tracks it lacks and drops the gone ones;
then it centres on the mean track again and rebuilds the track index. The mean
track is summed in track-id order, so the vectors are bit for bit those a
fresh build with the same window mean writes. Re-centring moves every vector,
so an HNSW graph is built anew from the vectors (no pooling).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mert_indexer.errors import QueryError, StoreError
from mert_indexer.indexer.kinds import load_faiss, prepare
from mert_indexer.indexer.layout import TrackRun
from mert_indexer.indexer.segments import SegmentReader

if TYPE_CHECKING:
    from mert_indexer.indexer.generation import Generation
    from mert_indexer.indexer.loaded import LoadedIndex

log = logging.getLogger(__name__)

TRACK_EXACT_MAX = 100_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
VECTORS_FILE = "track_vectors.npy"
MEAN_FILE = "track_mean.npy"
POOLED_FILE = "track_pooled.npy"
HNSW_FILE = "tracks.hnsw"
POOLING = "time-weighted mean of centred, normalised windows; centred on the mean track, normalised"


# -- pooling -----------------------------------------------------------------


def index_weights(starts_seconds: np.ndarray, window_seconds: float) -> np.ndarray:
    """Seconds each indexed window adds to its track's coverage (each second counts once).

    A window covers from its start to the next window's start (at most one
    window); the last one covers a full window. The weights sum to the
    track's duration for a track indexed with hop <= window.
    """
    s = np.asarray(starts_seconds, np.float64)
    if len(s) == 0:
        return np.zeros(0)
    w = np.full(len(s), float(window_seconds))
    w[:-1] = np.minimum(np.diff(s), window_seconds)
    return np.maximum(w, 1e-9)


def pool(vectors: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of rows (float64 accumulation, float32 result)."""
    x = np.asarray(vectors, np.float32)
    if weights is None:
        return x.mean(axis=0, dtype=np.float64).astype(np.float32)
    w = np.asarray(weights, np.float64)
    return (w @ x.astype(np.float64) / w.sum()).astype(np.float32)


def pooled_windows(
    runs: Sequence[TrackRun],
    reader: SegmentReader,
    mean: np.ndarray | None,
    window_seconds: float,
    *,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """float32 [tracks, dim]: each run's time-weighted mean window.

    ``mean``: centre and normalise each window on it first (:func:`prepare`);
    ``None``: pool the raw vectors (what :mod:`export_data` writes). Reads one
    track at a time from the memory-mapped segments.
    """
    out = np.zeros((len(runs), reader.dim), np.float32)
    for i, r in enumerate(runs):
        rows = slice(r.first_row, r.first_row + r.n_windows)
        x = np.asarray(reader.vectors(r.segment)[rows], np.float32)
        if len(x) == 0:
            continue
        if mean is not None:
            x = prepare(x, mean)
        starts = reader.starts(r.segment)[rows] / r.sample_rate
        out[i] = pool(x, index_weights(starts, window_seconds))
        if progress is not None:
            progress(r.n_windows)
    return out


def track_vectors(
    pooled: np.ndarray, track_ids: np.ndarray | Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(prepared track vectors, their mean): centred on the mean track, normalised.

    ``track_ids``: the mean is summed in their order (sorted), so it does not
    depend on the order of the rows: an incremental build and a fresh one agree
    to the bit.
    """
    if len(pooled) < 2:
        mean = np.zeros(pooled.shape[1], np.float32)
        return prepare(pooled, mean), mean
    rows = pooled if track_ids is None else pooled[np.argsort(np.asarray(track_ids), kind="stable")]
    mean = rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    return prepare(pooled, mean), mean


def reusable_pooled(
    previous: Generation | None, window_mean: np.ndarray, window_seconds: float
) -> dict[tuple[int, int, int], np.ndarray]:
    """(track id, windows, sample rate) -> pooled vector of the previous generation.

    Empty when there is none to reuse: no previous generation, one written
    before ``track_pooled.npy``, another window mean or window length (its
    pooled vectors would differ from a fresh pooling), or an unreadable file.
    """
    if previous is None or not (previous.path / POOLED_FILE).exists():
        return {}
    entry = previous.info.get("track_index") or {}
    if entry.get("pooling") != POOLING or entry.get("window_seconds") != window_seconds:
        return {}
    if not np.array_equal(previous.mean, window_mean):
        return {}
    try:
        pooled = np.load(previous.path / POOLED_FILE, allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning(
            "%s: pooled track vectors unreadable, pooling every track: %s", previous.path, exc
        )
        return {}
    runs = previous.runs
    if pooled.shape != (len(runs), len(window_mean)) or pooled.dtype != np.float32:
        return {}
    return {
        (int(r[4]), int(r[3]), int(sr)): pooled[i]
        for i, (r, sr) in enumerate(zip(runs, previous.sample_rates, strict=True))
    }


# -- the track index kinds ---------------------------------------------------


class ExactTracks:
    """Every track vector in RAM; one matrix product per query."""

    name: ClassVar[str] = "exact"

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors

    @classmethod
    def build(cls, vectors: np.ndarray, gen: Path) -> ExactTracks:
        return cls(vectors)

    @classmethod
    def read(cls, vectors: np.ndarray, gen: Path) -> ExactTracks:
        return cls(vectors)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and run indices of each prepared query's ``k`` nearest tracks."""
        k = min(k, len(self.vectors))
        s = q @ self.vectors.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        sims = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")
        return np.take_along_axis(sims, order, axis=1), np.take_along_axis(part, order, axis=1)


class HnswTracks:
    """FAISS ``IndexHNSWFlat`` (inner product) over the same vectors: sub-linear queries."""

    name: ClassVar[str] = "hnsw"

    def __init__(self, index: Any, vectors: np.ndarray) -> None:
        self.index = index
        self.vectors = vectors
        index.hnsw.efSearch = HNSW_EF_SEARCH

    @classmethod
    def build(cls, vectors: np.ndarray, gen: Path) -> HnswTracks:
        faiss = load_faiss()
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(vectors)
        faiss.write_index(index, str(gen / HNSW_FILE))
        return cls(index, vectors)

    @classmethod
    def read(cls, vectors: np.ndarray, gen: Path) -> HnswTracks:
        return cls(load_faiss().read_index(str(gen / HNSW_FILE)), vectors)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and run indices (-1: none) of each prepared query's ``k`` nearest."""
        sims, ids = self.index.search(
            np.ascontiguousarray(q, np.float32), min(k, len(self.vectors))
        )
        return sims, ids


TRACK_KINDS: dict[str, type[ExactTracks] | type[HnswTracks]] = {
    ExactTracks.name: ExactTracks,
    HnswTracks.name: HnswTracks,
}


def choose_track_kind(n_tracks: int, exact_max: int) -> str:
    """``exact`` up to ``exact_max`` tracks, ``hnsw`` above: the one place this is decided."""
    return "exact" if n_tracks <= exact_max else "hnsw"


@dataclass
class TrackIndex:
    """A loaded track index: the prepared vectors (runs order), their mean, the search."""

    kind: str
    mean: np.ndarray
    vectors: np.ndarray
    search: ExactTracks | HnswTracks


def track_index_writer(
    runs: Sequence[TrackRun],
    reader: SegmentReader,
    window_mean: np.ndarray,
    identity: dict[str, Any],
    *,
    progress: bool = False,
    exact_max: int | None = None,
    previous: Generation | None = None,
) -> Callable[[Path], dict[str, Any]]:
    """The build step: pools the tracks now, returns the writer of its generation files.

    ``previous``: the generation this build updates (same window mean): its
    pooled vectors are reused by track id (:func:`reusable_pooled`) and only
    the other tracks are pooled. ``write(gen_dir)`` (called by ``write_generation``
    inside the generation being written, before it is renamed into place)
    writes the files and returns the ``track_index`` entry of ``info.json``.
    """
    window_seconds = int(identity["window_samples"]) / int(identity["sample_rate"])
    known = reusable_pooled(previous, window_mean, window_seconds)
    pooled = np.zeros((len(runs), reader.dim), np.float32)
    fresh: list[int] = []
    for i, r in enumerate(runs):
        v = known.get((r.track_id, r.n_windows, r.sample_rate))
        if v is None:
            fresh.append(i)
        else:
            pooled[i] = v
    todo = [runs[i] for i in fresh]
    bar = _bar(progress, sum(r.n_windows for r in todo), "pooling tracks")
    pooled[fresh] = pooled_windows(
        todo, reader, window_mean, window_seconds, progress=None if bar is None else bar.update
    )
    if bar is not None:
        bar.close()
    if previous is not None:
        log.info("track vectors: %d reused, %d pooled", len(runs) - len(fresh), len(fresh))
    vectors, mean = track_vectors(pooled, [r.track_id for r in runs])
    exact_max = TRACK_EXACT_MAX if exact_max is None else exact_max
    kind = choose_track_kind(len(runs), exact_max)

    def write(gen: Path) -> dict[str, Any]:
        from mert_indexer.atomic import atomic_write

        for name, array in ((VECTORS_FILE, vectors), (MEAN_FILE, mean), (POOLED_FILE, pooled)):
            with atomic_write(gen / name) as fh:
                np.save(fh, array, allow_pickle=False)
        if len(runs):
            TRACK_KINDS[kind].build(vectors, gen)
        params: dict[str, Any] = {"exact_max": exact_max}
        if kind == "hnsw":
            params |= {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
            params["ef_search"] = HNSW_EF_SEARCH
        return {
            "kind": kind,
            "n_tracks": len(runs),
            "pooling": POOLING,
            "window_seconds": window_seconds,
            "pooled_tracks": len(fresh),
            "reused_tracks": len(runs) - len(fresh),
            "params": params,
        }

    return write


def load_track_index(gen: Path, info: dict[str, Any]) -> TrackIndex | None:
    """The track index of generation ``gen``; ``None`` for a generation built without one."""
    entry = info.get("track_index")
    if entry is None:
        return None
    try:
        vectors = np.load(gen / VECTORS_FILE, allow_pickle=False)
        mean = np.load(gen / MEAN_FILE, allow_pickle=False)
        kind = TRACK_KINDS[entry["kind"]]
        search = kind.read(vectors, gen) if len(vectors) else ExactTracks(vectors)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise StoreError(f"{gen}: unreadable track index: {exc}") from exc
    return TrackIndex(entry["kind"], mean, vectors, search)


# -- queries -----------------------------------------------------------------


@dataclass(frozen=True)
class SimilarTrack:
    """A catalogue track like the query, with its cosine around the mean track."""

    track: str
    score: float
    track_id: int


class TrackFinder:
    """ "More like this" over a loaded generation; read-only, safe to share between threads.

    ``hashes``: catalog track id -> content hash (tracks sharing one are the
    same file: excluded from each other's answers); ``aliases``: other paths
    the catalog knows for a track id (recorded content-hash duplicates), so a
    query may name any of them.
    """

    def __init__(
        self,
        loaded: LoadedIndex,
        hashes: dict[int, str],
        aliases: dict[str, int] | None = None,
        *,
        duplicates: dict[str, str] | None = None,
        seconds: dict[int, float] | None = None,
    ) -> None:
        tracks = loaded.tracks
        if tracks is None:
            raise StoreError(
                f"index generation {loaded.generation} has no track index (built before "
                "track similarity): rebuild the index"
            )
        self.loaded = loaded
        self.tracks: TrackIndex = tracks
        self._hashes = dict(hashes)
        self._duplicates = dict(duplicates or {})
        self._seconds = dict(seconds or {})
        self.identity = loaded.identity
        self._ids = loaded.runs[:, 4].astype(np.int64)
        self._run_of_id = {int(t): r for r, t in enumerate(self._ids)}
        self._run_of_path = {p: r for r, p in enumerate(loaded.paths)}
        for path, track_id in (aliases or {}).items():
            if track_id in self._run_of_id:
                self._run_of_path.setdefault(path, self._run_of_id[track_id])
        hash_of_run = [hashes.get(int(t)) for t in self._ids]
        groups: dict[str, list[int]] = {}
        for r, h in enumerate(hash_of_run):
            if h is not None:
                groups.setdefault(h, []).append(r)
        self._same = {r: frozenset(groups[h]) for r, h in enumerate(hash_of_run) if h is not None}

    @classmethod
    def open(cls, index_dir: str | Path, *, use_gpu: bool | None = None) -> TrackFinder:
        """Load the live generation of the store at ``index_dir`` and its catalog's hashes."""
        from mert_indexer.indexer.catalog import Catalog, existing_catalog
        from mert_indexer.indexer.generation import INDEX_DIR
        from mert_indexer.indexer.loaded import LoadedIndex
        from mert_indexer.indexer.segments import SEGMENTS_DIR

        root = Path(index_dir)
        catalog = Catalog(existing_catalog(root), read_only=True)
        try:
            rows = catalog.tracks()
            dups = catalog.duplicates()
        finally:
            catalog.close()
        hashes = {t.id: t.content_hash for t in rows}
        first_of_hash: dict[str, int] = {}
        for t in rows:
            first_of_hash.setdefault(t.content_hash, t.id)
        aliases = {p: first_of_hash[h] for p, (h, _, _) in dups.items() if h in first_of_hash}
        seconds = {t.id: t.n_samples / t.sample_rate for t in rows}
        loaded = LoadedIndex(root / INDEX_DIR, root / SEGMENTS_DIR, use_gpu=use_gpu)
        try:
            return cls(
                loaded,
                hashes,
                aliases,
                duplicates={p: h for p, (h, _, _) in dups.items()},
                seconds=seconds,
            )
        except BaseException:
            loaded.close()
            raise

    def catalog_facts(self) -> tuple[dict[int, str], dict[str, str], dict[int, float]]:
        """(track id -> content hash, duplicate path -> content hash, track id -> seconds)."""
        return self._hashes, self._duplicates, self._seconds

    def resolve(self, track: str | int) -> int:
        """The run index of a track named by catalog id or by path (a recorded duplicate too)."""
        if isinstance(track, int) or (isinstance(track, str) and track.isdigit()):
            run = self._run_of_id.get(int(track))
            if run is not None:
                return run
        run = self._run_of_path.get(str(track))
        if run is None and isinstance(track, str):
            run = self._run_of_path.get(str(Path(track).resolve()))
        if run is None:
            raise QueryError(f"{track}: not a track of this index (give its catalogue path or id)")
        return run

    def similar(self, track: str | int, *, top: int = 10) -> list[SimilarTrack]:
        """The ``top`` other tracks most like ``track``, best first (itself and its copies out)."""
        run = self.resolve(track)
        excluded = self._same.get(run, frozenset()) | {run}
        return self._ranked(self.tracks.vectors[run : run + 1], top, excluded)

    def similar_to(self, embeddings: np.ndarray, *, top: int = 10) -> list[SimilarTrack]:
        """The ``top`` tracks most like a clip, from its window embeddings (a ranking).

        The clip is pooled as the tracks are: its windows centred on the window
        mean and normalised, averaged (equal weights: a query's windows are cut
        with an even, dense hop), then centred on the mean track.
        """
        emb = np.asarray(embeddings, np.float32)
        dim = self.tracks.vectors.shape[1]
        if emb.ndim != 2 or emb.shape[1] != dim or len(emb) == 0:
            raise QueryError(f"clip embeddings of shape {emb.shape}; this index expects [m, {dim}]")
        if not np.isfinite(emb).all():
            raise QueryError("clip embeddings contain NaN or Inf")
        v = pool(prepare(emb, self.loaded.mean))
        return self._ranked(prepare(v[None, :], self.tracks.mean), top, frozenset())

    def _ranked(self, q: np.ndarray, top: int, excluded: frozenset[int]) -> list[SimilarTrack]:
        if top < 1:
            raise QueryError(f"top must be at least 1, got {top}")
        if len(self.tracks.vectors) == 0:
            return []
        sims, runs = self.tracks.search.search(q, top + len(excluded))
        out = [
            SimilarTrack(self.loaded.paths[r], round(float(s), 4), int(self._ids[r]))
            for s, r in zip(sims[0], runs[0], strict=True)
            if r >= 0 and int(r) not in excluded
        ]
        return out[:top]

    def close(self) -> None:
        self.loaded.close()

    def __enter__(self) -> TrackFinder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bar(on: bool, total: int, desc: str) -> Any:
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="win", unit_scale=True)
