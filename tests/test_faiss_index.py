"""FAISS index build: compressed against exact on seeded data, atomic switch, size rule.

As faiss's own ``tests/test_contrib.py`` does: approximate results are checked
against an exact reference computed on the same seeded synthetic vectors.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from mert_indexer.errors import StoreError
from mert_indexer.indexer.generation import INDEX_DIR
from mert_indexer.indexer.kinds import IndexOptions, prepare
from mert_indexer.indexer.loaded import LoadedIndex
from mert_indexer.indexer.plan import PendingFile
from mert_indexer.indexer.search import Searcher
from mert_indexer.indexer.segments import SEGMENTS_DIR
from mert_indexer.indexer.store import IndexStore
from mert_indexer.indexer.synthetic import SyntheticEmbedder, indexed_track, synthetic_identity

SR = 100
DIM = 32
IDENTITY = synthetic_identity(DIM, SR)
EMB = SyntheticEmbedder(
    dim=DIM, latent_dim=16, seed=3, offset=8.0
)  # untrained-like: all cosines > 0.95


def fill(store: IndexStore, n_tracks: int, seconds: float = 150.0) -> np.ndarray:
    """Index ``n_tracks`` synthetic tracks; returns all their float32 windows in storage order."""
    windows = []
    for t in range(n_tracks):
        n, starts, emb = indexed_track(EMB, t, seconds + (t % 7), SR)
        store.add_track(
            PendingFile(f"t{t}.mp3", f"h{t}", 1, 1),
            n_samples=n,
            sample_rate=SR,
            starts=starts,
            embeddings=emb,
        )
        windows.append(emb)
    store.commit()
    return np.vstack(windows)


def loaded(root: Path) -> LoadedIndex:
    return LoadedIndex(root / INDEX_DIR, root / SEGMENTS_DIR)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("idx")
    with IndexStore.open(root, IDENTITY, create=True) as store:
        vectors = fill(store, 200)  # ~6,000 windows
    return root, vectors


def test_compressed_recall_at_10_against_exact(big_store: tuple[Path, np.ndarray]) -> None:
    root, vectors = big_store
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(vectors), 300, replace=False)
    # Queries near indexed windows, as clip windows are: shifted 0-2.5 s, re-encoded (noise).
    queries = np.vstack(
        [
            EMB.windows(
                int(t), np.array([rng.uniform(0, 100)]), track_seconds=160, noise=0.1, noise_seed=i
            )
            for i, t in enumerate(rng.integers(0, 200, 300))
        ]
        + [vectors[picks[:100]]]
    )

    with IndexStore.open(root, IDENTITY, create=True) as store:
        exact_info = store.build_index(kind="exact")
    exact = loaded(root)
    _, want = exact.knn(queries, 10)

    with IndexStore.open(root, IDENTITY, create=True) as store:
        info = store.build_index(options=IndexOptions(exact_max=1000, nlist=64, rerank=100))
        assert store.stats()["index"]["kind"] == "ivfpq"
    assert info["kind"] == "ivfpq" and info["params"]["factory"] == "IVF64,PQ16x4fs"
    assert info["bytes_per_vector"] < exact_info["bytes_per_vector"] / 4
    approx = loaded(root)
    _, got = approx.knn(queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= 0.95, recall

    # Without the exact re-ranking from the float16 segments, PQ alone falls short.
    approx.params["rerank"] = 0
    _, raw = approx.knn(queries, 10)
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(raw, want, strict=True)]) < recall


def test_exact_index_from_float16_store_agrees_with_float32(
    big_store: tuple[Path, np.ndarray],
) -> None:
    root, vectors = big_store
    with IndexStore.open(root, IDENTITY, create=True) as store:
        store.build_index(kind="exact")
    index = loaded(root)
    queries = EMB.windows(5, np.arange(0.3, 100, 7.0), track_seconds=160, noise=0.05)
    _, got = index.knn(queries, 10)
    x = prepare(vectors, vectors.mean(axis=0))
    want = np.argsort(-(prepare(queries, vectors.mean(axis=0)) @ x.T), axis=1)[:, :10]
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]) >= 0.98


def test_rebuild_switches_atomically_and_a_failed_build_keeps_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        fill(store, 3)
        first = store.build_index()
        assert first["kind"] == "exact" and first["n_vectors"] == sum(
            t.n_windows for t in store.tracks()
        )
        fill(store, 5)  # t0..t2 again (same paths: replaced) and t3, t4
        second = store.build_index()
        assert second["generation"] > first["generation"]
        assert sorted(p.name for p in (tmp_path / INDEX_DIR).iterdir()) == [
            second["generation"],
            "CURRENT",
        ]

        def broken(*args: object) -> None:
            raise RuntimeError("Error: 'ret == (size)' failed: write error (disk full)")

        monkeypatch.setattr(faiss, "write_index", broken)
        with pytest.raises(StoreError, match=r"cannot write the index.*the previous index stays"):
            store.build_index()
    assert Searcher(tmp_path).info["generation"] == second["generation"]
    assert not [p for p in (tmp_path / INDEX_DIR).iterdir() if p.name.endswith(".tmp")]


def test_searcher_needs_a_built_index(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        fill(store, 1)
    with pytest.raises(StoreError, match="no index has been built"):
        Searcher(tmp_path)


def test_too_small_for_compression_says_so(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        fill(store, 2)
        with pytest.raises(StoreError, match="too few to train a compressed index"):
            store.build_index(kind="ivfpq")
        with pytest.raises(StoreError, match="unknown index kind"):
            store.build_index(kind="hnsw")


def test_empty_store_builds_an_index_that_matches_nothing(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        assert store.build_index()["n_vectors"] == 0
    assert Searcher(tmp_path).search(np.ones((3, DIM), np.float32), np.arange(3) * 0.5) == []
