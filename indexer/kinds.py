"""The two kinds of FAISS index, one class each: parameters, build and search.

Vectors are centred on the catalogue's mean window and L2-normalised before
they reach FAISS (:func:`prepare`), so inner product is cosine similarity
*around the mean*. Centring matters for untrained or anisotropic models, whose
raw embeddings all point the same way (cosine 0.95-0.995 between unrelated
windows): it removes the common part and leaves the part that tells windows
apart, for the search and for the compressed codes alike.

* :class:`ExactIndex` (``exact``): ``IndexFlatIP`` (inside an ``IndexIDMap``,
  for stable ids), all vectors in RAM as float32 (3 KB per window at D = 768,
  8 more for the id), searched by one blocked matrix product
  per clip. Up to ``EXACT_MAX_WINDOWS`` = 30,000 windows (~700 tracks): a 10 s
  clip took 128 ms (p50) at 100k windows and 416 ms at 300k on 2 shared cores,
  so the 50 ms budget ends near 40k (``benchmarks/results/index_bench.md``).
* :class:`IvfPqIndex` (``ivfpq``): ``IVF{nlist},PQ{m}x4fs`` (inverted lists +
  4-bit fast-scan product quantizer), trained on a bounded sample and filled
  chunk by chunk. At D = 768, m = 128 four-bit codes: 64 bytes a window, 72
  with its id, 76 with the norm kept for re-ranking. Each query asks it for
  ``rerank`` = 500 candidates and re-ranks them exactly from the float16
  segments (memory-mapped): what lifts recall@10 against ``exact`` above 0.95
  without keeping full vectors in RAM. Chosen by measurement (D = 768, one
  core): at 50k windows PQ128x4fs reached recall@10 0.975 at 0.25 ms per query
  window and trained + filled in 7.5 s, PQ64 (8-bit, the same 64 bytes) 0.979
  at 1.16 ms and 23 s. At 300k windows (1024 lists), the lists alone cover the
  true top-10 at 0.972 (128 probed) / 0.992 (256 probed), and PQ's ranking is
  what limits: 256 probed, 200 re-ranked 0.929, 500 re-ranked 0.964, 1000
  0.982. Hence nprobe = nlist / 4 and 500 re-ranked.

:func:`choose_kind` is the one place ``auto`` becomes a kind.

Both kinds take explicit, stable ids (``add(x, ids)``, ``remove(ids)``; see
:mod:`mert_indexer.indexer.layout`): an IVF index keeps each vector's id in its
inverted lists, the exact one through its ``IndexIDMap``. Adding to a trained
IVF-PQ index encodes the new vectors with the quantizers it was trained with;
removing takes their codes out of the lists (``remove_ids``, supported by the
fast-scan lists since FAISS 1.8).

GPU FAISS is used when ``faiss.get_num_gpus()`` finds one: k-means training of
the coarse quantizer runs there, and the search of an exact index (FAISS's GPU
has no fast-scan IVF-PQ: that one stays on CPU, with a log line). Not verified
on a GPU in this project's CI (no GPU there).

Thread safety: FAISS's CPU indexes answer concurrent searches; its GPU indexes
do not (FAISS wiki, "Threads and asynchronous calls"), so an index moved to a
GPU serialises its searches with a lock.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from mert_indexer.errors import StoreError

log = logging.getLogger(__name__)

EXACT_MAX_WINDOWS = 30_000
MIN_IVFPQ_WINDOWS = 1024  # fewer: exact costs nothing, and the lists would hold ~8 windows
FLAT_BLOCK = 65536  # rows per matrix product in exact search: 200 MB of float32 at D = 768

# Exact cosine similarities of prepared queries [m, D] against candidate ids
# [m, c] (id < 0: none, similarity -inf): what re-ranking needs from the store.
ExactScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class IndexOptions:
    """How to build; ``None`` fields are derived from the number of windows."""

    kind: str = "auto"  # "auto" | "exact" | "ivfpq"
    exact_max: int = EXACT_MAX_WINDOWS
    nlist: int | None = None  # inverted lists: 2**round(log2(2 * sqrt(n)))
    # 4-bit sub-quantizers: largest even divisor of dim <= min(128, dim // 2)
    pq_m: int | None = None
    train_size: int | None = None  # training sample: min(n, 40 * nlist, 150_000)
    nprobe: int | None = None  # lists visited: nlist // 4, within [16, 512]
    rerank: int = 500  # IVF-PQ candidates re-ranked exactly per query window
    chunk_rows: int = 32768
    seed: int = 1234
    null_quantile: float = 0.95  # of unrelated best similarities: the no-match floor
    use_gpu: bool | None = None  # None: when faiss finds a GPU


def load_faiss() -> Any:
    """The ``faiss`` module, or a clear error naming the install."""
    try:
        import faiss
    except ImportError as exc:
        raise StoreError(
            "FAISS is not installed: pip install 'mert-indexer[cpu]' (or '[gpu]')"
        ) from exc
    return faiss


def gpu_wanted(use_gpu: bool | None) -> bool:
    """Whether to use a GPU: ``None`` means when FAISS finds one."""
    n = load_faiss().get_num_gpus()
    if use_gpu and n == 0:
        raise StoreError(
            "a GPU index was asked for but FAISS finds no GPU (is faiss-gpu installed?)"
        )
    return bool(n > 0) if use_gpu is None else use_gpu


def prepare(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centre and L2-normalise rows (float32, new array); zero rows stay zero."""
    y = np.asarray(x, np.float32) - mean
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    np.divide(y, norms, out=y, where=norms > 0)
    return y


def choose_kind(n: int, options: IndexOptions) -> type[ExactIndex] | type[IvfPqIndex]:
    """The index class for ``n`` windows: ``auto`` is exact up to ``options.exact_max``."""
    kind = options.kind
    if kind == "auto":
        kind = "exact" if n <= options.exact_max else "ivfpq"
    if kind not in KINDS:
        raise StoreError(f"unknown index kind {kind!r}: use auto, exact or ivfpq")
    return KINDS[kind]


def resolve_params(n: int, dim: int, options: IndexOptions) -> dict[str, Any]:
    """The parameters a build of ``n`` windows will use; recorded in ``info.json``."""
    return choose_kind(n, options).resolve(n, dim, options)


K = TypeVar("K", bound="_FaissKind")


class _FaissKind:
    """What both kinds share: a FAISS index holding every vector under its id."""

    name: ClassVar[str]

    def __init__(self, index: Any, params: dict[str, Any]) -> None:
        self.index = index
        self.params = params
        self._gpu_lock: threading.Lock | None = None  # set when the index is on a GPU

    @classmethod
    def read(cls: type[K], path: Path, params: dict[str, Any]) -> K:
        return cls(load_faiss().read_index(str(path)), params)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add prepared vectors under ``ids`` (int64, one each); an IVF index encodes them."""
        self.index.add_with_ids(x, np.ascontiguousarray(ids, np.int64))

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors of ``ids``; returns how many there were."""
        if not len(ids):
            return 0
        sel = load_faiss().IDSelectorBatch(np.ascontiguousarray(ids, np.int64))
        return int(self.index.remove_ids(sel))


class ExactIndex(_FaissKind):
    """``IndexFlatIP`` over every prepared vector; exact k-NN by blocked matrix products."""

    name: ClassVar[str] = "exact"

    def __init__(self, index: Any, params: dict[str, Any]) -> None:
        super().__init__(index, params)
        faiss = load_faiss()
        # Generations before stable ids held a bare IndexFlatIP: there id = position.
        self._mapped = isinstance(index, faiss.IndexIDMap)
        self._flat = faiss.downcast_index(index.index) if self._mapped else index
        self._ids: np.ndarray | None = None  # position -> id, set for search
        self._xb: np.ndarray | None = None  # on CPU: the stored vectors, for GEMM
        self._gpu: Any = None  # the flat vectors cloned to the GPU(s), when there are

    @staticmethod
    def resolve(n: int, dim: int, options: IndexOptions) -> dict[str, Any]:
        return {"kind": "exact", "metric": "inner_product", "centred": True}

    @classmethod
    def create(
        cls,
        dim: int,
        params: dict[str, Any],
        train: Callable[[], np.ndarray],
        *,
        use_gpu: bool,
        seed: int,
    ) -> ExactIndex:
        """An empty index; ``train`` is not called (a flat index learns nothing)."""
        faiss = load_faiss()
        return cls(faiss.IndexIDMap(faiss.IndexFlatIP(dim)), params)

    @property
    def stable_ids(self) -> bool:
        """Whether ids are kept apart from positions (what adds and removes need)."""
        return self._mapped

    def ready_for_search(self, use_gpu: bool | None) -> None:
        """After loading: to the GPU if there is one, else map the vectors for GEMM."""
        faiss = load_faiss()
        if self._mapped:
            self._ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        if gpu_wanted(use_gpu):  # the flat part only: positions come back, mapped here
            self._gpu, self._gpu_lock = to_gpu(self._flat)
        elif self.ntotal:
            dim = int(self._flat.d)
            xb = faiss.rev_swig_ptr(self._flat.get_xb(), self.ntotal * dim)
            self._xb = xb.reshape(self.ntotal, dim)  # a view: self.index owns it

    def _to_ids(self, pos: np.ndarray) -> np.ndarray:
        if self._ids is None:
            return pos
        return np.where(pos >= 0, self._ids[np.maximum(pos, 0)], -1)

    def candidates(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's own answer: similarities and ids of the ``k`` nearest (id -1: none)."""
        if self._gpu_lock is None:
            sims, ids = self.index.search(q, k)  # the IndexIDMap answers in ids itself
            return sims, ids
        with self._gpu_lock:
            sims, pos = self._gpu.search(q, k)
        return sims, self._to_ids(pos)

    def search(self, q: np.ndarray, k: int, exact: ExactScorer) -> tuple[np.ndarray, np.ndarray]:
        """Exact similarities and ids of each prepared query's ``k`` nearest windows."""
        if self._xb is None:
            return self.candidates(q, k)
        sims, pos = _flat_knn(self._xb, q, k)
        return sims, self._to_ids(pos)


class IvfPqIndex(_FaissKind):
    """``IVF{nlist},PQ{m}x4fs`` candidates, re-ranked exactly from the store's vectors."""

    name: ClassVar[str] = "ivfpq"

    def __init__(self, index: Any, params: dict[str, Any]) -> None:
        super().__init__(index, params)
        load_faiss().extract_index_ivf(index).nprobe = int(params["nprobe"])

    @staticmethod
    def resolve(n: int, dim: int, options: IndexOptions) -> dict[str, Any]:
        if n < MIN_IVFPQ_WINDOWS:
            raise StoreError(
                f"{n} windows are too few to train a compressed index "
                f"(>= {MIN_IVFPQ_WINDOWS}); use exact"
            )
        nlist = options.nlist or int(2 ** round(math.log2(max(16.0, 2 * math.sqrt(n)))))
        nlist = max(1, min(nlist, n // 8))
        m = options.pq_m or max(
            d for d in range(2, min(128, max(2, dim // 2)) + 1, 2) if dim % d == 0
        )
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

    @classmethod
    def create(
        cls,
        dim: int,
        params: dict[str, Any],
        train: Callable[[], np.ndarray],
        *,
        use_gpu: bool,
        seed: int,
    ) -> IvfPqIndex:
        """A trained, empty index; ``train()`` gives the prepared training sample."""
        faiss = load_faiss()
        index = faiss.index_factory(dim, params["factory"], faiss.METRIC_INNER_PRODUCT)
        sample = train()
        ivf = faiss.extract_index_ivf(index)
        if use_gpu:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
        ivf.cp.seed = seed
        index.train(sample)
        del sample
        if use_gpu:
            ivf.clustering_index = None
        return cls(index, params)

    stable_ids: ClassVar[bool] = True  # an IVF index stores every vector's id

    def ready_for_search(self, use_gpu: bool | None) -> None:
        """After loading: to the GPU when one is wanted and FAISS accepts this index there."""
        if gpu_wanted(use_gpu):
            self.index, self._gpu_lock = to_gpu(self.index)

    def candidates(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ-approximate similarities and ids of the ``k`` nearest (id -1: none)."""
        if self._gpu_lock is None:
            sims, ids = self.index.search(q, k)
        else:
            with self._gpu_lock:
                sims, ids = self.index.search(q, k)
        return sims, ids

    def search(self, q: np.ndarray, k: int, exact: ExactScorer) -> tuple[np.ndarray, np.ndarray]:
        """``rerank`` candidates per query, scored exactly; the best ``k`` kept."""
        rerank = int(self.params.get("rerank") or 0)
        if not rerank:
            return self.candidates(q, k)
        _, cand = self.candidates(q, max(k, rerank))
        sims = exact(q, cand)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return (
            np.take_along_axis(sims, order, axis=1).astype(np.float32),
            np.take_along_axis(cand, order, axis=1),
        )


KINDS: dict[str, type[ExactIndex] | type[IvfPqIndex]] = {
    ExactIndex.name: ExactIndex,
    IvfPqIndex.name: IvfPqIndex,
}


def to_gpu(index: Any) -> tuple[Any, threading.Lock | None]:
    """The index cloned to every GPU with the lock its searches need, or unchanged and None.

    A GPU that refuses the index (no fast-scan IVF-PQ there) leaves it on the
    CPU, with a log line.
    """
    faiss = load_faiss()
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = True  # IVF-PQ with 64 sub-quantizers needs float16 lookup tables on GPU
    try:
        return faiss.index_cpu_to_all_gpus(index, co), threading.Lock()
    except RuntimeError as exc:
        log.warning("index stays on CPU: the GPU refused it: %s", exc)
        return index, None


def _flat_knn(xb: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN by blocked matrix products: the vectors are read once per clip.

    FAISS's flat search reads them once per *query* below 20 queries (its BLAS
    threshold): a 11-window clip on 100k windows took 400 ms that way, against
    one pass here.
    """
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for lo in range(0, len(xb), FLAT_BLOCK):
        s = q @ xb[lo : lo + FLAT_BLOCK].T
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
