"""Build, write and load the FAISS index over a store's windows; answer k-NN.

Vectors are centred on the catalogue's mean window and L2-normalised before
they reach FAISS, so inner product is cosine similarity *around the mean*.
Centring matters for untrained or anisotropic models, whose raw embeddings
all point the same way (cosine 0.95-0.995 between unrelated windows): it
removes the common part and leaves the part that tells windows apart, for the
search and for the compressed codes alike.

Two kinds, chosen by size (``kind="auto"``):

* ``exact``: ``IndexFlatIP``, all vectors in RAM as float32 (3 KB per window at
  D = 768), searched by one blocked matrix product per clip. Up to
  ``EXACT_MAX_WINDOWS`` = 30,000 windows (~700 tracks): a 10 s clip took
  128 ms (p50) at 100k windows and 416 ms at 300k on 2 shared cores, so the
  50 ms budget ends near 40k (``benchmarks/results/index_bench.md``).
* ``ivfpq``: ``IVF{nlist},PQ{m}x4fs`` (inverted lists + 4-bit fast-scan product
  quantizer), trained on a bounded sample and filled chunk by chunk from the
  segments, so building never holds more than one chunk of vectors. At
  D = 768, m = 128 four-bit codes: 64 bytes a window, 72 with its id, 76 with
  the norm kept for re-ranking. Each query asks it for ``rerank`` = 500
  candidates and re-ranks them exactly from the float16 segments
  (memory-mapped): what lifts recall@10 against ``exact`` above 0.95 without
  keeping full vectors in RAM. Chosen by measurement (D = 768, one core):
  at 50k windows PQ128x4fs reached recall@10 0.975 at 0.25 ms per query window
  and trained + filled in 7.5 s, PQ64 (8-bit, the same 64 bytes) 0.979 at
  1.16 ms and 23 s. At 300k windows (1024 lists), the lists alone cover the
  true top-10 at 0.972 (128 probed) / 0.992 (256 probed), and PQ's ranking is
  what limits: 256 probed, 200 re-ranked 0.929, 500 re-ranked 0.964, 1000
  0.982. Hence nprobe = nlist / 4 and 500 re-ranked.

A built index is a generation directory, written beside the old one, fsynced
and renamed into place; ``index/CURRENT`` names the live generation and is
replaced atomically last. A crash at any point leaves the previous index whole.

    index/CURRENT                 {"generation": "000007"}
    index/000007/vectors.faiss    the FAISS index; FAISS id = position in runs order
    index/000007/runs.npy         int64 [tracks, 5]: first_id, segment, first_row,
                                  n_windows, track_id
    index/000007/tracks.json      {"path": [...], "sample_rate": [...]} aligned with runs
    index/000007/mean.npy         float32 [dim]: the centring vector
    index/000007/norms.npy        float32 [windows]: norms of the centred vectors (re-ranking)
    index/000007/info.json        kind, params, counts, bytes, model identity

GPU FAISS is used when ``faiss.get_num_gpus()`` finds one: k-means training of
the coarse quantizer runs there, and the search of an exact index (FAISS's
GPU has no fast-scan IVF-PQ: that one stays on CPU, with a log line). Not
verified on a GPU in this project's CI (no GPU there).

On a shared, oversubscribed machine set ``OMP_WAIT_POLICY=PASSIVE`` before
FAISS starts: spinning OpenMP threads made PQ training 10x slower there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.atomic import atomic_write, atomic_write_text, fsync_dir
from mert_indexer.errors import StoreError
from mert_indexer.indexer.segments import SegmentReader

log = logging.getLogger(__name__)

EXACT_MAX_WINDOWS = 30_000
MIN_IVFPQ_WINDOWS = 1024  # fewer: exact costs nothing, and the lists would hold ~8 windows
NULL_SAMPLE = 2048  # windows whose nearest other-track window sets the no-match floor
NULL_NEIGHBOURS = 32
FLAT_BLOCK = 65536  # rows per matrix product in exact search: 200 MB of float32 at D = 768
INDEX_DIR = "index"
CURRENT = "CURRENT"
RUN_COLUMNS = ("first_id", "segment", "first_row", "n_windows", "track_id")


@dataclass(frozen=True)
class IndexOptions:
    """How to build; ``None`` fields are derived from the number of windows."""

    kind: str = "auto"  # "auto" | "exact" | "ivfpq"
    exact_max: int = EXACT_MAX_WINDOWS
    nlist: int | None = None  # inverted lists: 2**round(log2(2 * sqrt(n)))
    pq_m: int | None = (
        None  # 4-bit sub-quantizers: largest even divisor of dim <= min(128, dim // 2)
    )
    train_size: int | None = None  # training sample: min(n, 40 * nlist, 150_000)
    nprobe: int | None = None  # lists visited: nlist // 4, within [16, 512]
    rerank: int = 500  # IVF-PQ candidates re-ranked exactly per query window
    chunk_rows: int = 32768
    seed: int = 1234
    null_quantile: float = 0.95  # of unrelated best similarities: the no-match floor
    use_gpu: bool | None = None  # None: when faiss finds a GPU


@dataclass(frozen=True)
class TrackRun:
    """The contiguous rows of one track in a segment, as the index numbers them."""

    track_id: int
    path: str
    sample_rate: int
    segment: int
    first_row: int
    n_windows: int


class Layout:
    """FAISS ids are positions in storage order; this maps them to tracks and segment rows."""

    def __init__(
        self, first_ids: np.ndarray, segments: np.ndarray, first_rows: np.ndarray, n: int
    ) -> None:
        self.first_ids = np.asarray(first_ids, np.int64)
        self.ends = np.append(self.first_ids[1:], n)
        self.segments = np.asarray(segments, np.int64)
        self.first_rows = np.asarray(first_rows, np.int64)

    @classmethod
    def of(cls, ranges: Sequence[tuple[int, int, int]]) -> Layout:
        """From (segment, first_row, n_windows) per track, in storage order."""
        sizes = np.array([r[2] for r in ranges], np.int64)
        firsts = np.cumsum(sizes) - sizes
        return cls(firsts, [r[0] for r in ranges], [r[1] for r in ranges], int(sizes.sum()))

    def run_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first_ids, ids, side="right") - 1

    def place(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(track index, segment, row) of each id (ids must be valid, >= 0)."""
        run = self.run_of(ids)
        return run, self.segments[run], self.first_rows[run] + (ids - self.first_ids[run])


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a base dependency
        raise StoreError(
            "FAISS is not installed: pip install faiss-cpu (or faiss-gpu-cu12)"
        ) from exc
    return faiss


def _gpu_wanted(use_gpu: bool | None) -> bool:
    n = _faiss().get_num_gpus()
    if use_gpu and n == 0:
        raise StoreError(
            "a GPU index was asked for but FAISS finds no GPU (is faiss-gpu installed?)"
        )
    return n > 0 if use_gpu is None else use_gpu


def resolve_params(n: int, dim: int, options: IndexOptions) -> dict[str, Any]:
    """The parameters a build will use; recorded in the catalog and ``info.json``."""
    kind = options.kind
    if kind == "auto":
        kind = "exact" if n <= options.exact_max else "ivfpq"
    if kind == "exact":
        return {"kind": "exact", "metric": "inner_product", "centred": True}
    if kind != "ivfpq":
        raise StoreError(f"unknown index kind {kind!r}: use auto, exact or ivfpq")
    if n < MIN_IVFPQ_WINDOWS:
        raise StoreError(
            f"{n} windows are too few to train a compressed index "
            f"(>= {MIN_IVFPQ_WINDOWS}); use exact"
        )
    nlist = options.nlist or int(2 ** round(math.log2(max(16.0, 2 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 8))
    m = options.pq_m or max(d for d in range(2, min(128, max(2, dim // 2)) + 1, 2) if dim % d == 0)
    if dim % m or m % 2:
        raise StoreError(f"pq_m={m} must be even and divide the embedding dimension {dim}")
    train = options.train_size or min(n, 40 * nlist, 150_000)
    return {
        "kind": "ivfpq",
        "metric": "inner_product",
        "centred": True,
        "factory": f"IVF{nlist},PQ{m}x4fs",
        "nlist": nlist,
        "pq_m": m,
        "pq_bits": 4,
        "code_bytes": m // 2,
        "train_size": int(min(n, max(train, 39 * nlist))),
        "nprobe": min(options.nprobe or max(16, min(512, nlist // 4)), nlist),
        "rerank": options.rerank,
    }


def prepare(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centre and L2-normalise rows (float32, new array); zero rows stay zero."""
    y = np.asarray(x, np.float32) - mean
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    np.divide(y, norms, out=y, where=norms > 0)
    return y


def build(
    runs: Sequence[TrackRun],
    reader: SegmentReader,
    index_root: Path,
    *,
    identity: dict[str, Any],
    options: IndexOptions = IndexOptions(),
    progress: bool = False,
) -> dict[str, Any]:
    """Build an index over ``runs`` (storage order), write a new generation, switch to it."""
    faiss = _faiss()
    t0 = time.perf_counter()
    n = sum(r.n_windows for r in runs)
    if n == 0:
        log.warning(
            "%s: the store holds no windows: the index is empty and matches nothing", index_root
        )
    dim = reader.dim
    params = resolve_params(n, dim, options)
    ranges = [(r.segment, r.first_row, r.n_windows) for r in runs]
    gpu = _gpu_wanted(options.use_gpu)

    mean = np.zeros(dim, np.float64)
    for chunk in reader.iter_chunks(ranges, options.chunk_rows):
        mean += chunk.sum(axis=0, dtype=np.float64)
    mean = (mean / n).astype(np.float32) if n >= 2 else np.zeros(dim, np.float32)

    if params["kind"] == "exact":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.index_factory(dim, params["factory"], faiss.METRIC_INNER_PRODUCT)
        pick = np.sort(
            np.random.default_rng(options.seed).choice(n, params["train_size"], replace=False)
        )
        _, segs, rows = Layout.of(ranges).place(pick)
        train = prepare(reader.gather(segs, rows), mean)
        ivf = faiss.extract_index_ivf(index)
        if gpu:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
        ivf.cp.seed = options.seed
        index.train(train)
        del train
        if gpu:
            ivf.clustering_index = None
    bar = _progress_bar(progress, n, f"indexing ({params['kind']})")
    norms = []  # of the centred vectors: lets re-ranking skip normalising what it reads
    for chunk in reader.iter_chunks(ranges, options.chunk_rows):
        chunk -= mean
        norm = np.linalg.norm(chunk, axis=1, keepdims=True)
        norms.append(norm[:, 0])
        np.divide(chunk, norm, out=chunk, where=norm > 0)
        index.add(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    params["null_quantile"] = options.null_quantile
    params["null_similarity"] = _null_similarity(
        index, params, ranges, reader, mean, options.seed, options.null_quantile
    )
    params["build_seconds"] = round(time.perf_counter() - t0, 3)
    norm = np.concatenate(norms).astype(np.float32) if norms else np.zeros(0, np.float32)
    return _write_generation(index_root, index, runs, mean, norm, identity, params, n)


def _null_similarity(
    index: Any,
    params: dict[str, Any],
    ranges: list[tuple[int, int, int]],
    reader: SegmentReader,
    mean: np.ndarray,
    seed: int,
    quantile: float,
) -> float | None:
    """How similar unrelated content gets in this catalogue: the search's no-match floor.

    For a seeded sample of indexed windows, the best exact similarity to a
    window of another track; returns its ``quantile`` (``None`` with fewer
    than two tracks). A clip of an un-indexed track meets the catalogue the
    same way, so evidence only counts above this level (:mod:`mert_indexer.indexer.search`).
    A copy of the same music under another path (another encoding, another
    album) must not set the floor: when the best other track also matches the
    sampled window's neighbour at the same offset, it is taken for a copy and
    the next track's similarity is used instead.
    """
    n = sum(r[2] for r in ranges)
    if len(ranges) < 2:
        return None
    layout = Layout.of(ranges)
    run_of = layout.run_of

    def vectors(ids: np.ndarray) -> np.ndarray:
        _, segs, rows = layout.place(ids)
        return prepare(reader.gather(segs, rows), mean)

    if params["kind"] == "ivfpq":
        _faiss().extract_index_ivf(index).nprobe = int(params["nprobe"])
    sample = np.sort(
        np.random.default_rng(seed + 1).choice(n, size=min(NULL_SAMPLE, n), replace=False)
    )
    values = []
    for lo in range(0, len(sample), 256):
        pos = sample[lo : lo + 256]
        own = run_of(pos)
        q = vectors(pos)
        _, ids = index.search(q, min(n, NULL_NEIGHBOURS))
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
    return sims[np.arange(len(sims)), pos].astype(np.float64)


def _progress_bar(on: bool, total: int, desc: str) -> Any:
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="win", unit_scale=True)


def _write_generation(
    index_root: Path,
    index: Any,
    runs: Sequence[TrackRun],
    mean: np.ndarray,
    norms: np.ndarray,
    identity: dict[str, Any],
    params: dict[str, Any],
    n: int,
) -> dict[str, Any]:
    faiss = _faiss()
    index_root.mkdir(parents=True, exist_ok=True)
    number = 1 + max([int(p.name) for p in index_root.iterdir() if p.name.isdigit()] + [0])
    generation = f"{number:06d}"
    tmp = index_root / f".{generation}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        firsts = np.cumsum([0] + [r.n_windows for r in runs])[:-1]
        table = np.array(
            [
                (f, r.segment, r.first_row, r.n_windows, r.track_id)
                for f, r in zip(firsts, runs, strict=True)
            ],
            np.int64,
        ).reshape(-1, len(RUN_COLUMNS))
        with atomic_write(tmp / "runs.npy") as fh:
            np.save(fh, table, allow_pickle=False)
        with atomic_write(tmp / "mean.npy") as fh:
            np.save(fh, mean, allow_pickle=False)
        with atomic_write(tmp / "norms.npy") as fh:
            np.save(fh, norms, allow_pickle=False)
        tracks = {"path": [r.path for r in runs], "sample_rate": [r.sample_rate for r in runs]}
        atomic_write_text(tmp / "tracks.json", json.dumps(tracks))
        faiss.write_index(index, str(tmp / "vectors.faiss"))
        _fsync_file(tmp / "vectors.faiss")
        nbytes = sum(p.stat().st_size for p in tmp.iterdir())
        info = {
            "generation": generation,
            "kind": params["kind"],
            "params": params,
            "n_vectors": int(n),
            "n_tracks": len(runs),
            "dim": int(mean.shape[0]),
            "bytes": int(nbytes),
            "bytes_per_vector": round(nbytes / max(n, 1), 2),
            "identity": identity,
            "built_at": time.time(),
            "run_columns": list(RUN_COLUMNS),
        }
        atomic_write_text(tmp / "info.json", json.dumps(info, indent=1, sort_keys=True))
        os.replace(tmp, index_root / generation)
        fsync_dir(index_root)
    except (OSError, RuntimeError) as exc:  # faiss.write_index raises RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        where = getattr(exc, "filename", None) or tmp
        reason = getattr(exc, "strerror", None) or str(exc)
        raise StoreError(
            f"{where}: cannot write the index: {reason}; the previous index stays"
        ) from exc
    try:
        atomic_write_text(index_root / CURRENT, json.dumps({"generation": generation}))
    except OSError as exc:
        raise StoreError(
            f"{index_root / CURRENT}: cannot switch to the new index: {exc.strerror}; "
            "the previous index stays"
        ) from exc
    for p in index_root.iterdir():  # older generations and leftovers of crashed builds
        if p.name not in (generation, CURRENT) and (p.name.isdigit() or p.name.endswith(".tmp")):
            shutil.rmtree(p, ignore_errors=True)
    return info


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_current(index_root: Path) -> str | None:
    """The live generation's name, or ``None`` when no index was built."""
    try:
        return str(json.loads((index_root / CURRENT).read_text())["generation"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"{index_root / CURRENT}: unreadable index pointer: {exc}") from exc


class LoadedIndex:
    """A built generation, ready for k-NN; maps FAISS ids back to (track, window).

    Read-only and safe to use while a writer appends to the store or builds a
    newer generation (it keeps its own files open). Not thread-safe.
    """

    def __init__(
        self, index_root: Path, segments_root: Path, *, use_gpu: bool | None = None
    ) -> None:
        for attempt in range(2):  # a concurrent build may retire the generation we just named
            generation = read_current(index_root)
            if generation is None:
                raise StoreError(f"{index_root}: no index has been built (run the indexer first)")
            try:
                self._load(index_root / generation)
                break
            except FileNotFoundError:
                if attempt:
                    raise StoreError(f"{index_root / generation}: index files vanished") from None
        self.kind: str = self.info["kind"]
        self.params: dict[str, Any] = self.info["params"]
        self.identity: dict[str, Any] = self.info["identity"]
        if self.kind == "ivfpq":
            _faiss().extract_index_ivf(self.index).nprobe = int(self.params["nprobe"])
        self.layout = Layout(
            self.runs[:, 0], self.runs[:, 1], self.runs[:, 2], int(self.info["n_vectors"])
        )
        segs, ends = self.runs[:, 1], self.runs[:, 2] + self.runs[:, 3]
        rows = {int(s): int(ends[segs == s].max()) for s in np.unique(segs)}
        self.segments = SegmentReader(segments_root, int(self.info["dim"]), rows)
        self._xb: np.ndarray | None = None  # exact on CPU: the stored vectors, for GEMM
        if _gpu_wanted(use_gpu):
            self.index = self._to_gpu(self.index)
        elif self.kind == "exact" and self.ntotal:
            xb = _faiss().rev_swig_ptr(self.index.get_xb(), self.ntotal * int(self.info["dim"]))
            self._xb = xb.reshape(self.ntotal, int(self.info["dim"]))  # a view: self.index owns it

    def _load(self, gen: Path) -> None:
        faiss = _faiss()
        try:
            self.info: dict[str, Any] = json.loads((gen / "info.json").read_text())
            self.runs = np.load(gen / "runs.npy", allow_pickle=False)
            self.mean = np.load(gen / "mean.npy", allow_pickle=False)
            self.norms = np.load(gen / "norms.npy", allow_pickle=False)
            tracks = json.loads((gen / "tracks.json").read_text())
            if not (gen / "vectors.faiss").exists():
                raise FileNotFoundError(gen / "vectors.faiss")
            self.index = faiss.read_index(str(gen / "vectors.faiss"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise StoreError(f"{gen}: unreadable index files: {exc}") from exc
        self.paths: list[str] = tracks["path"]
        self.sample_rates = np.asarray(tracks["sample_rate"], np.float64)

    @staticmethod
    def _to_gpu(index: Any) -> Any:
        faiss = _faiss()
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True  # IVF-PQ with 64 sub-quantizers needs float16 lookup tables on GPU
        try:
            return faiss.index_cpu_to_all_gpus(index, co)
        except RuntimeError as exc:
            log.warning("index stays on CPU: the GPU refused it: %s", exc)
            return index

    @property
    def ntotal(self) -> int:
        return int(self.info["n_vectors"])

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(run index, segment, row) of each FAISS id (ids must be valid, >= 0)."""
        return self.layout.place(ids)

    def start_seconds(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(run index, window start in seconds) of each FAISS id."""
        run, segs, rows = self.locate(ids)
        starts = np.empty(len(ids), np.float64)
        for seg in np.unique(segs):
            sel = segs == seg
            starts[sel] = self.segments.starts(int(seg))[rows[sel]]
        return run, starts / self.sample_rates[run]

    def track_windows(self, run: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS ids and window starts (seconds, increasing) of one track."""
        first_id, seg, first_row, n, _ = (int(v) for v in self.runs[run])
        starts = self.segments.starts(seg)[first_row : first_row + n] / self.sample_rates[run]
        return np.arange(first_id, first_id + n), starts

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Centred, normalised float32 copies of the stored windows ``ids``."""
        _, segs, rows = self.locate(ids)
        return self.prepare(self.segments.gather(segs, rows))

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Vectors as the index compares them: centred on the catalogue mean, normalised."""
        return prepare(x, self.mean)

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and ids of each query's ``k`` nearest windows (id -1: none)."""
        q = prepare(queries, self.mean)
        k = min(k, self.ntotal)
        if self._xb is not None:
            return self._flat_knn(q, k)
        if self.kind == "exact" or not self.params.get("rerank"):
            sims, ids = self.index.search(q, k)
            return sims, ids
        _, cand = self.index.search(q, max(k, int(self.params["rerank"])))
        return self.rerank(q, cand, k)

    def _flat_knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN by blocked matrix products: the vectors are read once per clip.

        FAISS's flat search reads them once per *query* below 20 queries (its BLAS
        threshold): a 11-window clip on 100k windows took 400 ms that way, against
        one pass here.
        """
        assert self._xb is not None
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_i = np.zeros((len(q), 0), np.int64)
        for lo in range(0, self.ntotal, FLAT_BLOCK):
            s = q @ self._xb[lo : lo + FLAT_BLOCK].T
            take = min(k, s.shape[1])
            part = np.argpartition(-s, take - 1, axis=1)[:, :take]
            best_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
            best_i = np.concatenate([best_i, part + lo], axis=1)
            if best_s.shape[1] > k:
                keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
                best_s = np.take_along_axis(best_s, keep, axis=1)
                best_i = np.take_along_axis(best_i, keep, axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)

    def rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact similarities of the candidates from the float16 segments; best ``k`` kept."""
        valid = cand >= 0
        ids = cand[valid]
        _, segs, rows = self.locate(ids)
        raw = self.segments.gather(segs, rows)  # float32, neither centred nor normalised
        ends = np.cumsum(valid.sum(axis=1))  # rows of ``raw`` are grouped by query, in order
        dots = np.concatenate(
            [
                raw[e - c : e] @ q[i]
                for i, (e, c) in enumerate(zip(ends, valid.sum(axis=1), strict=True))
            ]
        ) - np.repeat(q @ self.mean, valid.sum(axis=1))
        norms = self.norms[ids]
        sims = np.full(cand.shape, -np.inf, np.float32)
        sims[valid] = np.where(norms > 0, dots / np.maximum(norms, 1e-30), 0.0)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return (
            np.take_along_axis(sims, order, axis=1).astype(np.float32),
            np.take_along_axis(cand, order, axis=1),
        )

    def close(self) -> None:
        self.segments.close()


def current_info(index_root: Path) -> dict[str, Any] | None:
    """``info.json`` of the live generation, or ``None``."""
    generation = read_current(index_root)
    if generation is None:
        return None
    with contextlib.suppress(FileNotFoundError):
        return json.loads((index_root / generation / "info.json").read_text())
    return None
