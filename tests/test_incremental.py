"""Incremental index updates: adds without retraining, the retrain policy, stable ids.

Real FAISS on seeded synthetic vectors (``mert_indexer.indexer.synthetic``);
approximate answers are checked against exact ones on the same data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.indexer import build as build_module
from mert_indexer.indexer.generation import INDEX_DIR
from mert_indexer.indexer.kinds import IndexOptions, IvfPqIndex
from mert_indexer.indexer.loaded import LoadedIndex
from mert_indexer.indexer.plan import PendingFile
from mert_indexer.indexer.search import Searcher, SearchOptions
from mert_indexer.indexer.segments import SEGMENTS_DIR
from mert_indexer.indexer.store import IndexStore
from mert_indexer.indexer.synthetic import (
    SyntheticEmbedder,
    clip_starts,
    indexed_track,
    synthetic_identity,
)
from mert_indexer.indexer.verify import verify_store

SR = 100
DIM = 32
IDENTITY = synthetic_identity(DIM, SR)
EMB = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=21, offset=8.0)
IVF = IndexOptions(exact_max=1000, nlist=32)  # above the exact threshold from ~35 tracks on
CLIP = clip_starts(10.0, 0.5)


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    """One OpenMP thread: small indexes gain nothing from more, and on shared cores
    spinning threads slow them down many times over."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def seconds_of(t: int) -> float:
    return 150.0 + (t % 7)


def add(store: IndexStore, tracks: range) -> None:
    for t in tracks:
        n, starts, x = indexed_track(EMB, t, seconds_of(t), SR)
        store.add_track(
            PendingFile(f"t{t}.mp3", f"h{t}", 1, 1),
            n_samples=n,
            sample_rate=SR,
            starts=starts,
            embeddings=x,
        )
    store.commit()


def clip(t: int, at: float = 20.0) -> np.ndarray:
    return EMB.windows(t, at + CLIP, track_seconds=seconds_of(t), noise=0.05, noise_seed=t)


def loaded(root: Path) -> LoadedIndex:
    return LoadedIndex(root / INDEX_DIR, root / SEGMENTS_DIR)


def test_adding_to_an_ivfpq_catalogue_does_not_retrain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(60))
        first = store.build_index(options=IVF)
        assert first["kind"] == "ivfpq" and first["update"] == "full"
        assert first["trained_on"] == first["params"]["train_size"] > 0
        assert first["trained_windows"] == first["n_vectors"]

        def no_training(*args: object, **kwargs: object) -> None:
            raise AssertionError("the second run trained a new index")

        monkeypatch.setattr(IvfPqIndex, "create", no_training)
        add(store, range(60, 63))
        with caplog.at_level(logging.INFO, logger="mert_indexer.indexer.build"):
            # Default options, as indexer-client uses: the catalogue is below the exact
            # threshold of 30,000 windows, yet an IVF-PQ index stays IVF-PQ.
            second = store.build_index()
    assert "no retraining" in caplog.text
    assert second["kind"] == "ivfpq" and second["update"] == "incremental"
    assert (second["trained_at"], second["trained_on"]) == (
        first["trained_at"],
        first["trained_on"],
    )
    assert second["increments"] == 1 and second["last_added_windows"] > 0
    assert second["n_vectors"] == first["n_vectors"] + second["last_added_windows"]
    with Searcher(tmp_path) as searcher:  # the new tracks are searchable
        for t in (60, 61, 62):
            m = searcher.search(clip(t), CLIP)
            assert m and m[0].track.endswith(f"t{t}.mp3") and abs(m[0].offset_seconds - 20) <= 0.5


def test_exact_appends_then_becomes_ivfpq_past_the_threshold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(10))
        first = store.build_index(options=IVF)
        add(store, range(10, 15))
        second = store.build_index(options=IVF)
        assert (first["kind"], second["kind"], second["update"]) == (
            "exact",
            "exact",
            "incremental",
        )
        assert second["next_id"] == second["n_vectors"]  # appended after the old ids
        add(store, range(15, 40))  # ~1,200 windows > exact_max
        with caplog.at_level(logging.INFO, logger="mert_indexer.indexer.build"):
            third = store.build_index(options=IVF)
    assert third["kind"] == "ivfpq" and third["update"] == "full"
    assert "exceed the exact index's limit of 1000" in caplog.text


def test_growth_and_rebuild_retrain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(40))
        first = store.build_index(options=IVF)
        monkeypatch.setattr(build_module, "RETRAIN_GROWTH", 1.2)
        add(store, range(40, 44))  # +10 %: added
        assert store.build_index(options=IVF)["update"] == "incremental"
        add(store, range(44, 56))  # 1.4x the trained size: retrained
        with caplog.at_level(logging.INFO, logger="mert_indexer.indexer.build"):
            grown = store.build_index(options=IVF)
        assert grown["update"] == "full" and grown["trained_windows"] == grown["n_vectors"]
        assert "grew 1.4x since the index was trained" in caplog.text
        assert grown["trained_at"] > first["trained_at"]
        exact = store.build_index(kind="exact")  # another kind: retrained
        assert exact["kind"] == "exact" and exact["update"] == "full"


def test_recall_after_many_increments_matches_a_fresh_build(tmp_path: Path) -> None:
    root = tmp_path / "inc"
    with IndexStore.open(root, IDENTITY, create=True) as store:
        add(store, range(60))
        store.build_index(options=IVF)
        for lo in range(60, 75, 3):  # 5 increments of 5 %
            add(store, range(lo, lo + 3))
            assert store.build_index(options=IVF)["update"] == "incremental"
    rng = np.random.default_rng(4)
    queries = np.vstack([clip(int(t), float(rng.uniform(0, 100))) for t in rng.integers(0, 75, 40)])

    def recall(index: LoadedIndex) -> float:
        _, got = index.knn(queries, 10)
        q = index.prepare(queries)
        ids = index.layout.all_ids()
        sims = q @ index.vectors(ids).T
        want = ids[np.argsort(-sims, axis=1)[:, :10]]
        return float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]))

    incremental = recall(loaded(root))
    with IndexStore.open(root, IDENTITY, create=False) as store:
        again = store.build_index(options=IVF, rebuild=True)
        assert again["update"] == "full" and again["update_reason"] == "a rebuild was asked for"
    fresh = recall(loaded(root))
    assert incremental >= fresh - 0.01, (incremental, fresh)


def test_ids_stay_stable_across_adds_and_removes(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(8))
        store.build_index()
        before = loaded(tmp_path)
        ids_of_7 = before.track_windows(7)[0]
        store.remove([str(tmp_path / "nothing")], [1, 2])  # catalog ids of t0 and t1
        add(store, range(8, 10))
        info = store.build_index()
    after = loaded(tmp_path)
    runs = {int(r[4]): r for r in after.runs}
    assert 1 not in runs and 2 not in runs and len(after.runs) == 8
    run7 = next(i for i, r in enumerate(after.runs) if after.paths[i].endswith("t7.mp3"))
    assert np.array_equal(after.track_windows(run7)[0], ids_of_7)  # the same ids as before
    assert info["next_id"] > int(ids_of_7[-1])
    # Every live window's nearest neighbour (exact index) is itself, under its stable id.
    ids = after.layout.all_ids()
    _, got = after.knn(after.segments.gather(*after.locate(ids)[1:]), 1)
    assert np.array_equal(got[:, 0], ids)
    generation = json.loads((tmp_path / INDEX_DIR / info["generation"] / "info.json").read_text())
    assert generation["format"] == 2 and generation["tombstones"] == []


def test_search_excludes_tracks_whose_removal_did_not_commit(tmp_path: Path) -> None:
    """A generation written inside a remove whose catalog COMMIT failed keeps the tracks out."""
    from mert_indexer.indexer import faults

    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(6))
        store.build_index()
        with faults.inject("catalog.commit"), pytest.raises(OSError):
            store.remove(["t2.mp3"])
        assert store.status("t2.mp3")[0] == "indexed"  # rolled back
        add(store, range(6, 7))
        info = store.build_index()  # the next run: t2 stays out of the index
    assert info["tombstones"] == [3]
    with Searcher(tmp_path, options=SearchOptions(min_score=None)) as s:
        assert not any(m.track.endswith("t2.mp3") for m in s.search(clip(2), CLIP, top=10))
    report = verify_store(tmp_path)  # consistent by design: said, not flagged
    assert report.ok, report.problems
    assert any("keeps 1 catalogued tracks out of search" in n for n in report.notes)


def test_client_rebuild_flag() -> None:
    from mert_indexer.client.cli import build_parser, main

    args = build_parser().parse_args(["--input", "x", "--rebuild"])
    assert args.rebuild and not args.no_build
    assert not build_parser().parse_args(["--input", "x"]).rebuild
    with pytest.raises(SystemExit) as exc:
        main(["--input", "x", "--rebuild", "--no-build"])
    assert exc.value.code == 2


def test_exact_calibration_after_removes_sees_ids_not_positions(tmp_path: Path) -> None:
    """Calibrating an updated exact index (ids with gaps) gives a fresh build's floor."""
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(12))
        store.build_index()
        store.remove(["t0.mp3", "t1.mp3", "t2.mp3"])  # a 25 % change: measured again
        updated = store.build_index()["params"]["null_similarity"]
        fresh = store.build_index(rebuild=True)["params"]["null_similarity"]
    assert updated == pytest.approx(fresh, abs=0.02)
