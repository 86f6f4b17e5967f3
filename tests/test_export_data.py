"""Exports read back with the ordinary readers (pyarrow, numpy) equal the store exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.indexer.store import IndexStore
from tests.conftest import run_cli
from tests.planted import planted_catalogue, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    emb, planted = planted_catalogue(6, dim=16)
    write_store(root, emb, planted)
    return root


def store_windows(root: Path) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    with IndexStore.open(root, None, create=False) as s:
        rows = list(s.iter_windows())
    ids = np.concatenate([np.full(len(st), t.id) for t, st, _ in rows])
    starts = np.concatenate([st / t.sample_rate for t, st, _ in rows])
    vectors = np.concatenate([v for _, _, v in rows]).astype(np.float32)
    return [t for t, _, _ in rows], ids, starts, vectors


def test_parquet_round_trip(store: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "emb"
    proc = run_cli(
        "indexer-export", "--index", str(store), "--out", str(out), "--format", "parquet"
    )
    assert proc.returncode == 0, proc.stderr
    tracks, ids, starts, vectors = store_windows(store)
    w = pq.read_table(out / "windows.parquet")
    assert np.array_equal(np.asarray(w["track_id"]), ids)
    assert np.array_equal(np.asarray(w["start_seconds"]), starts)
    assert np.array_equal(np.stack(w["vector"].to_numpy(zero_copy_only=False)), vectors)
    meta = json.loads(w.schema.metadata[b"mert_indexer"])
    assert meta["model_id"] == "synthetic" and meta["embedding_dim"] == 16
    assert {"weights_sha256", "layers", "pooling", "precision", "window_seconds"} <= set(meta)
    assert meta["sample_rate"] == 100 and meta["max_track_id"] == max(t.id for t in tracks)
    t = pq.read_table(out / "tracks.parquet")
    assert list(t["track"].to_pylist()) == [tr.path for tr in tracks]
    assert t.schema.metadata[b"mert_indexer"] == w.schema.metadata[b"mert_indexer"]
    first = vectors[ids == tracks[0].id]
    assert np.allclose(np.asarray(t["vector"][0].as_py()), first.mean(axis=0), atol=0.05)


def test_npy_round_trip_and_incremental(store: Path, tmp_path: Path) -> None:
    tracks, ids, starts, vectors = store_windows(store)
    since = sorted(t.id for t in tracks)[3]
    out = tmp_path / "inc"
    proc = run_cli(
        "indexer-export",
        "--index",
        str(store),
        "--out",
        str(out),
        "--format",
        "npy",
        "--since-track-id",
        str(since),
    )
    assert proc.returncode == 0, proc.stderr
    keep = ids > since
    assert np.array_equal(np.load(out / "window_vectors.npy"), vectors[keep])
    assert np.array_equal(np.load(out / "window_track_ids.npy"), ids[keep])
    assert np.array_equal(np.load(out / "window_starts.npy"), starts[keep])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["since_track_id"] == since and meta["n_windows"] == int(keep.sum())
    assert [t["track_id"] for t in meta["tracks"]] == list(np.load(out / "track_ids.npy"))
    again = run_cli("indexer-export", "--index", str(store), "--out", str(out), "--format", "npy")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
