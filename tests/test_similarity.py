"""Track similarity on seeded synthetic vectors: pooling, exclusions, both track index kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mert_indexer.errors import QueryError
from mert_indexer.indexer.similarity import TrackFinder, index_weights, pool, track_vectors
from mert_indexer.indexer.synthetic import index_starts
from tests.planted import planted_catalogue, write_store


def test_index_weights_count_each_second_once() -> None:
    starts = index_starts(17.3)  # 0, 5, 10, 12.3: the last window aligned to the end
    w = index_weights(starts, 5.0)
    assert np.allclose(w, [5.0, 5.0, 2.3, 5.0]) and np.isclose(w.sum(), 17.3)
    x = np.eye(4, dtype=np.float32)
    assert np.allclose(pool(x, w), w / w.sum())


def test_track_vectors_are_centred_and_normalised() -> None:
    pooled = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32) + 3.0
    v, mean = track_vectors(pooled)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.allclose(mean, pooled.mean(axis=0), atol=1e-6)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sim")
    emb, planted = planted_catalogue(24, dim=32, offset=8.0)
    write_store(root, emb, planted)
    return root


def test_similar_ranks_planted_copies_first(store: Path) -> None:
    with TrackFinder.open(store) as finder:
        assert finder.tracks.kind == "exact"
        for original, copy in (("track00000", "reencode_0"), ("track00002", "shifted_0")):
            ranked = finder.similar(f"{original}.flac", top=5)
            assert Path(ranked[0].track).stem == copy, ranked
            assert all(Path(r.track).stem != original for r in ranked)  # never itself
            assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
        # By catalog id too, and the copy's answer names the original first.
        copy_id = finder.resolve("reencode_0.mp3")
        by_id = finder.similar(int(finder.loaded.runs[copy_id, 4]), top=1)
        assert Path(by_id[0].track).stem == "track00000"
        with pytest.raises(QueryError, match="not a track"):
            finder.similar("nope.flac")


def test_same_content_hash_is_excluded(store: Path) -> None:
    with TrackFinder.open(store) as base:
        ids = base.loaded.runs[:, 4]
        paths = base.loaded.paths
        hashes = {int(t): f"h{i}" for i, t in enumerate(ids)}
        copy = paths.index(next(p for p in paths if p.endswith("reencode_0.mp3")))
        orig = paths.index(next(p for p in paths if p.endswith("track00000.flac")))
        hashes[int(ids[copy])] = hashes[int(ids[orig])]  # the same file under two paths
        finder = TrackFinder(base.loaded, hashes)
        ranked = finder.similar(paths[orig], top=3)
        assert all(r.track not in (paths[orig], paths[copy]) for r in ranked)


def test_similar_to_clip_embeddings(store: Path) -> None:
    emb, planted = planted_catalogue(24, dim=32, offset=8.0)
    clip = emb.windows(5, 3.0 + np.arange(0, 20, 0.5), track_seconds=planted.seconds[5])
    with TrackFinder.open(store) as finder:
        ranked = finder.similar_to(clip, top=3)
        assert Path(ranked[0].track).stem == "track00005"
        with pytest.raises(QueryError, match="expects"):
            finder.similar_to(np.zeros((2, 5), np.float32))


def test_hnsw_track_index_agrees_with_exact(tmp_path: Path, monkeypatch) -> None:
    from mert_indexer.indexer import similarity

    emb, planted = planted_catalogue(60, dim=32, offset=8.0)
    write_store(tmp_path / "exact", emb, planted)
    monkeypatch.setattr(similarity, "TRACK_EXACT_MAX", 10)
    write_store(tmp_path / "hnsw", emb, planted)
    with TrackFinder.open(tmp_path / "exact") as ex, TrackFinder.open(tmp_path / "hnsw") as hn:
        assert (ex.tracks.kind, hn.tracks.kind) == ("exact", "hnsw")
        assert hn.loaded.info["track_index"]["kind"] == "hnsw"
        for name in ("track00000.flac", "track00007.flac", "excerpt_0.ogg"):
            a = [r.track_id for r in ex.similar(name, top=5)]
            b = [r.track_id for r in hn.similar(name, top=5)]
            assert a[:3] == b[:3]


def test_incremental_build_reuses_pooled_tracks_bit_for_bit(tmp_path: Path) -> None:
    """Adds and removes reuse the previous pooled vectors; the result equals pooling afresh."""
    from mert_indexer.indexer.generation import INDEX_DIR, read_generation
    from mert_indexer.indexer.layout import TrackRun
    from mert_indexer.indexer.plan import PendingFile
    from mert_indexer.indexer.similarity import track_index_writer
    from mert_indexer.indexer.store import IndexStore
    from mert_indexer.indexer.synthetic import SyntheticEmbedder, indexed_track, synthetic_identity

    emb = SyntheticEmbedder(dim=16, latent_dim=8, seed=3, offset=8.0)
    identity = synthetic_identity(16, 100)

    def add(store: IndexStore, tracks: range) -> None:
        for t in tracks:
            n, starts, x = indexed_track(emb, t, 40.0 + t % 5, 100)
            store.add_track(
                PendingFile(f"t{t}.mp3", f"h{t}", 1, 1),
                n_samples=n,
                sample_rate=100,
                starts=starts,
                embeddings=x,
            )
        store.commit()

    with IndexStore.open(tmp_path, identity, create=True) as store:
        add(store, range(10))
        store.build_index()
        store.remove([str(tmp_path / "nothing")], [1, 2])  # catalog ids of t0 and t1
        add(store, range(10, 13))
        info = store.build_index()
        assert info["update"] == "incremental"
        entry = info["track_index"]
        assert (entry["reused_tracks"], entry["pooled_tracks"]) == (8, 3)
        gen = read_generation(tmp_path / INDEX_DIR / info["generation"])
        runs = [
            TrackRun(int(r[4]), p, int(sr), int(r[1]), int(r[2]), int(r[3]))
            for r, p, sr in zip(gen.runs, gen.paths, gen.sample_rates, strict=True)
        ]
        # Pool every track afresh with the same window mean, rows in another order.
        fresh_dir = tmp_path / "fresh"
        fresh_dir.mkdir()
        fresh = track_index_writer(runs[::-1], store.reader(), gen.mean, identity)(fresh_dir)
    assert fresh["pooled_tracks"] == 11
    ids = gen.runs[:, 4]
    assert not {1, 2} & set(ids.tolist()) and len(ids) == 11  # removed tracks are gone
    got = np.load(gen.path / "track_vectors.npy")
    want = np.load(fresh_dir / "track_vectors.npy")[::-1]
    assert got.shape == (11, 16) and np.array_equal(got, want)  # bit for bit
    assert np.array_equal(
        np.load(gen.path / "track_mean.npy"), np.load(fresh_dir / "track_mean.npy")
    )
