"""Deletes, compaction and the indexer-admin maintenance subcommands, on real FAISS.

Deleted tracks must never come back in search results; compaction must keep
every live vector bit for bit, and leave a whole store at every step it can
fail at (the fault-injection points ``compact.*``, ``remove.index``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.errors import StoreError
from mert_indexer.indexer import admin, faults
from mert_indexer.indexer.generation import INDEX_DIR
from mert_indexer.indexer.kinds import IndexOptions
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

SR = 100
DIM = 32
IDENTITY = synthetic_identity(DIM, SR)
EMB = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=8, offset=8.0)
IVF = IndexOptions(exact_max=1000, nlist=32)
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


RANK_ALL = SearchOptions(min_score=None)  # best guesses: no threshold hides anything


def seconds_of(t: int) -> float:
    return 150.0 + (t % 5)


def add(store: IndexStore, tracks: range, *, version: int = 0) -> None:
    for t in tracks:
        n, starts, x = indexed_track(EMB, t + 1000 * version, seconds_of(t), SR)
        store.add_track(
            PendingFile(f"t{t}.mp3", f"h{t}-{version}", 1, 1),
            n_samples=n,
            sample_rate=SR,
            starts=starts,
            embeddings=x,
        )
    store.commit()


def clip(t: int, at: float = 30.0) -> np.ndarray:
    return EMB.windows(t, at + CLIP, track_seconds=seconds_of(t), noise=0.05, noise_seed=t)


def contents(store: IndexStore) -> dict[int, tuple[str, bytes, bytes]]:
    """Track id -> (path, vector bytes, start bytes): what compaction must keep exactly."""
    return {t.id: (t.path, v.tobytes(), s.tobytes()) for t, s, v in store.iter_windows()}


def returned(root: Path, tracks: list[int]) -> list[str]:
    """Paths of ``tracks`` that any of their own clips bring back, top 10, no threshold."""
    hits = []
    with Searcher(root, options=RANK_ALL) as s:
        for t in tracks:
            for at in (5.0, 120.0):
                hits += [m.track for m in s.search(clip(t, at), CLIP, top=10)]
    return sorted({h for h in hits if os.path.basename(h) in {f"t{t}.mp3" for t in tracks}})


@pytest.fixture(params=["exact", "ivfpq"])
def store_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(40 if request.param == "ivfpq" else 14))  # IVF-PQ needs >= 1,024
        store.build_index(kind=request.param, options=IVF)
    return tmp_path


def test_removed_tracks_never_come_back(store_dir: Path) -> None:
    assert returned(store_dir, [3, 7, 11]) != []  # they are found before
    early = LoadedIndex(store_dir / INDEX_DIR, store_dir / SEGMENTS_DIR)
    assert early.is_live()
    with IndexStore.open(store_dir, IDENTITY, create=False) as store:
        ids = {os.path.basename(t.path): t.id for t in store.tracks()}
        done = store.remove(["t3.mp3", "t7.mp3"], [ids["t11.mp3"]])
        assert sorted(os.path.basename(p) for p in done["removed_tracks"]) == [
            "t11.mp3",
            "t3.mp3",
            "t7.mp3",
        ]
        assert done["index"]["update"] == "incremental" and store.stats()["dead_windows"] > 0
        assert returned(store_dir, [3, 7, 11]) == []  # at once, without a rebuild
        assert not early.is_live()  # a service holding the old snapshot can tell
        add(store, range(50, 52))  # the next client run adds, and they stay gone
        store.build_index(options=IVF, compact=False)
        assert returned(store_dir, [3, 7, 11]) == []
        assert store.compact()["compacted"]
        assert store.stats()["dead_windows"] == 0
    assert returned(store_dir, [3, 7, 11]) == []
    assert returned(store_dir, [2, 50]) != []  # the others are still found
    # No removed window's own vector finds it: the ids are out of the index.
    with Searcher(store_dir, options=RANK_ALL) as s:
        for t in (3, 7, 11):
            x = EMB.windows(t, np.arange(0.0, 140.0, 5.0), track_seconds=seconds_of(t))
            _, hit_ids = s._index.knn(x, 20)
            runs = s._index.locate(hit_ids[hit_ids >= 0])[0]
            assert not any(os.path.basename(s._index.paths[r]) == f"t{t}.mp3" for r in runs)


def test_compaction_keeps_every_live_vector_bit_for_bit(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True, segment_bytes=40 * 30 * DIM * 2) as store:
        add(store, range(40))  # segments of 1,200 rows: several
        add(store, range(5, 12), version=1)  # replaced: their old rows are dead
        store.build_index(compact=False)
        store.remove(["t20.mp3", "t33.mp3"])
        segments_before = set(store.reader().rows)
        before = contents(store)
        with Searcher(tmp_path) as s:
            answers = [s.search(clip(t), CLIP) for t in (1, 8, 25, 39)]
        result = store.compact()
        assert result["compacted"] and result["dead_rows"] > 0
        assert contents(store) == before  # same tracks, same ids, same bytes
        assert store.stats()["dead_windows"] == 0
        after_rows = store.reader().rows
        assert set(after_rows) - segments_before  # rewritten into new segment numbers
    files = {int(p.name.split(".")[0]) for p in (tmp_path / SEGMENTS_DIR).iterdir()}
    assert files == set(after_rows)  # the old files are gone
    with Searcher(tmp_path) as s:
        assert [s.search(clip(t), CLIP) for t in (1, 8, 25, 39)] == answers


@pytest.mark.parametrize(
    "step",
    ["compact.write", "compact.register", "compact.index", "compact.switch", "compact.cleanup"],
)
def test_a_compaction_failing_at_any_step_leaves_a_whole_store(tmp_path: Path, step: str) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(12))
        add(store, range(3), version=1)
        store.build_index(compact=False)
        before = contents(store)
        with Searcher(tmp_path) as s:
            answers = [s.search(clip(t), CLIP) for t in (1, 5, 11)]
        with faults.inject(step) as armed, pytest.raises((OSError, StoreError)):
            store.compact()
        assert armed.fired
    # As after a crash: reopened for writing (which drops uncommitted rows), then used.
    with IndexStore.open(tmp_path, IDENTITY, create=False) as store:
        assert contents(store) == before
        with Searcher(tmp_path) as s:
            assert [s.search(clip(t), CLIP) for t in (1, 5, 11)] == answers
        store.build_index(compact=False)  # puts index and catalog back in step
        store.compact()
        assert contents(store) == before and store.stats()["dead_windows"] == 0
    with Searcher(tmp_path) as s:
        assert [s.search(clip(t), CLIP) for t in (1, 5, 11)] == answers


def test_build_compacts_past_the_dead_fraction(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(8))
        store.build_index()
        add(store, range(2), version=1)  # 2 of 10 tracks' rows dead: 20 %, below 25 %
        store.build_index()
        assert store.stats()["dead_windows"] > 0
        add(store, range(2, 4), version=1)  # 4 of 12: above
        store.build_index()
        assert store.stats()["dead_windows"] == 0


def test_admin_stats_remove_compact_rebuild(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        add(store, range(40))
        store.build_index(kind="ivfpq", options=IVF)
        ids = {os.path.basename(t.path): t.id for t in store.tracks()}
    index = str(tmp_path)
    assert admin.main(["stats", "--index", index, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["index_kind"] == "ivfpq" and st["tracks"] == 40 and st["dead_windows"] == 0
    assert st["trained_on"] > 0 and st["windows"] == st["index_windows"]
    assert st["bytes_on_disk"]["total"] > st["bytes_on_disk"]["segments"] > 0
    assert st["bytes_in_ram"]["index"] > 0

    path = "t4.mp3"  # as the catalog holds it
    code = admin.main(["remove", "--index", index, path, "nothere.mp3", "--id", str(ids["t9.mp3"])])
    out, err = capsys.readouterr()
    assert code == 1 and "removed " + path in out and "no such track" in err
    assert admin.main(["remove", "--index", index, "--id", "99999"]) == 1
    assert "no track with id 99999" in capsys.readouterr().err
    assert admin.main(["remove", "--index", index]) == 1  # nothing named
    assert "name at least one PATH" in capsys.readouterr().err

    assert admin.main(["stats", "--index", index, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["tracks"] == 38 and st["dead_windows"] > 0 and st["index_kind"] == "ivfpq"
    assert admin.main(["compact", "--index", index]) == 0
    assert "dead freed" in capsys.readouterr().out
    assert admin.main(["compact", "--index", index]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    assert admin.main(["rebuild", "--index", index, "--kind", "exact"]) == 0
    assert "rebuilt: exact index" in capsys.readouterr().out
    assert admin.main(["stats", "--index", index]) == 0
    assert "index           exact" in capsys.readouterr().out
    assert admin.main(["stats", "--index", str(tmp_path / "none")]) == 1
    assert "no index store here" in capsys.readouterr().err
    assert returned(tmp_path, [4, 9]) == []
