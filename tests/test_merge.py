"""Merging shard stores: equal to one store built from all files; mixed models refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.errors import ModelMismatchError
from mert_indexer.indexer import merge
from mert_indexer.indexer.cli import merge_main
from mert_indexer.indexer.merge import merge_stores
from mert_indexer.indexer.search import Searcher
from mert_indexer.indexer.store import IndexStore
from mert_indexer.indexer.synthetic import clip_starts
from mert_indexer.indexer.verify import verify_store
from tests.test_store import EMB, IDENTITY, contents, index_files, make_files, track_no


@pytest.fixture()
def shards(tmp_path: Path) -> tuple[list[str], Path, Path]:
    files = make_files(tmp_path / "music", 8)
    copy = tmp_path / "music" / "track08.mp3"  # the same bytes as track02, in the other shard
    copy.write_bytes(Path(files[2]).read_bytes())
    files.append(str(copy))
    a, b = tmp_path / "shard0", tmp_path / "shard1"
    with IndexStore.open(a, IDENTITY, create=True) as store:
        index_files(store, files[:4])
        store.record_failure(str(tmp_path / "music" / "bad.mp3"), "cannot decode")
        store.commit()
    with IndexStore.open(b, IDENTITY, create=True) as store:
        index_files(store, files[4:])
    return files, a, b


def test_merge_equals_one_store_built_from_all(shards, tmp_path: Path) -> None:
    files, a, b = shards
    result = merge_stores([a, b], tmp_path / "merged")
    assert result["tracks_added"] == 8 and result["duplicates"] == 1 and result["failures"] == 1
    assert result["index"]["n_vectors"] == result["stats"]["windows"]

    with IndexStore.open(tmp_path / "single", IDENTITY, create=True) as single:
        index_files(single, files)
        single.record_failure(str(tmp_path / "music" / "bad.mp3"), "cannot decode")
        single.commit()
        single.build_index()
        want, want_dups = contents(single), single.duplicates()
    with IndexStore.open(tmp_path / "merged", None, create=False) as merged:
        assert contents(merged) == want
        assert merged.duplicates() == want_dups
        assert merged.failures() == {str(tmp_path / "music" / "bad.mp3"): "cannot decode"}
        assert merged.stats()["dead_windows"] == 0

    cs = clip_starts(10.0)
    t = track_no(files[5])
    clip = EMB.windows(t, 4.2 + cs, track_seconds=20.0 + 3.3 * t, noise=0.05)
    with Searcher(tmp_path / "merged") as m, Searcher(tmp_path / "single") as s:
        got, expected = m.search(clip, cs), s.search(clip, cs)
    assert [x.track for x in got] == [x.track for x in expected] == [files[5]]
    assert got[0].offset_seconds == pytest.approx(expected[0].offset_seconds, abs=1e-6)

    again = merge_stores([a, b], tmp_path / "merged")  # a rerun changes nothing
    assert again["tracks_added"] == 0 and again["tracks_already_present"] == 8
    assert again["entries_removed"] == 0 and again["duplicates"] == 0
    with IndexStore.open(tmp_path / "merged", None, create=False) as merged:
        assert contents(merged) == want


def test_merge_refuses_mixed_models(shards, tmp_path: Path) -> None:
    _, a, _ = shards
    other = tmp_path / "other"
    with IndexStore.open(other, IDENTITY | {"weights_sha256": "1" * 64}, create=True) as store:
        index_files(store, make_files(tmp_path / "more", 1, start=20))
    with pytest.raises(ModelMismatchError, match=r"other: built by another model .*weights_sha256"):
        merge_stores([a, other], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_cli(shards, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, a, b = shards
    assert merge_main([str(tmp_path / "merged"), str(a), str(b), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tracks_added"] == 8 and summary["index"]["kind"] == "exact"
    assert merge_main([str(tmp_path / "m2"), str(a), str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("indexer-merge: error: ") and "missing" in err[0]
    assert np.isfinite(Searcher(tmp_path / "merged").info["params"]["null_similarity"])


def single_store(folder: Path, files: list[str], failure: str | None = None) -> Path:
    with IndexStore.open(folder, IDENTITY, create=True) as single:
        index_files(single, files)
        if failure:
            single.record_failure(failure, "cannot decode")
            single.commit()
    return folder


def state(index: Path) -> tuple[set, dict, dict]:
    with IndexStore.open(index, None, create=False) as store:
        return contents(store), store.duplicates(), store.failures()


def test_merge_is_incremental_after_sources_change(shards, tmp_path: Path) -> None:
    """Item 9: a rerun into an existing destination follows its sources: a track pruned in a
    shard goes, a changed file replaces its entry, new ones arrive; vectors are the sources'."""
    files, a, b = shards
    bad = str(tmp_path / "music" / "bad.mp3")
    merge_stores([a, b], tmp_path / "merged")
    os.remove(files[5])  # pruned in shard 1
    Path(files[6]).write_bytes(b"changed" * 999)  # re-embedded in shard 1
    extra = make_files(tmp_path / "music", 1, start=30)
    with IndexStore.open(b, IDENTITY, create=True) as store:
        current = [f for f in files[4:] if f != files[5]] + extra
        plan = store.plan(current)
        store.prune(plan.gone)
        index_files(store, current)
    result = merge_stores([a, b], tmp_path / "merged")
    assert result["tracks_added"] == 2 and result["entries_removed"] == 2  # 5 gone, 6 replaced
    now = [f for f in files if f != files[5]] + extra
    want = state(single_store(tmp_path / "single", now, failure=bad))
    assert state(tmp_path / "merged") == want
    assert verify_store(tmp_path / "merged").ok


def test_merge_reads_each_source_as_of_one_snapshot(
    shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 9: a shard written while the merge copies it is copied as of the merge's start."""
    files, a, b = shards
    before = state(single_store(tmp_path / "single", files, str(tmp_path / "music" / "bad.mp3")))
    real_point = merge.faults.point
    changed = []

    def write_to_source_meanwhile(name: str) -> None:
        if name == "merge.copy" and not changed:
            changed.append(name)
            with IndexStore.open(a, IDENTITY, create=True) as src:
                os.remove(files[0])
                src.prune(src.plan(files[1:4]).gone)  # a track goes while it is being copied
                index_files(src, make_files(tmp_path / "music", 1, start=40))
        real_point(name)

    monkeypatch.setattr(merge.faults, "point", write_to_source_meanwhile)
    merge_stores([a, b], tmp_path / "merged")
    assert changed and state(tmp_path / "merged") == before
    monkeypatch.undo()
    merge_stores([a, b], tmp_path / "merged")  # the next merge catches up
    with IndexStore.open(tmp_path / "merged", None, create=False) as merged:
        paths = {t.path for t in merged.tracks()}
    assert files[0] not in paths and str(tmp_path / "music" / "track40.mp3") in paths


def reference_store(folder: Path, music: Path, start: int) -> Path:
    """A store of other music, as a calibration reference (indexer-client --calibrate-with)."""
    with IndexStore.open(folder, IDENTITY, create=True) as store:
        index_files(store, make_files(music, 4, start=start))
    return folder


def test_merge_carries_the_sources_calibration_reference(
    shards, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Shards of one catalogue are calibrated against one reference, and so is their merge:
    # the merged index's no-match threshold is measured against it too.
    _, a, b = shards
    ref = reference_store(tmp_path / "reference", tmp_path / "other", 60)
    for shard in (a, b):
        with IndexStore.open(shard, IDENTITY, create=True) as store:
            store.set_calibration_reference(ref)
    result = merge_stores([a, b], tmp_path / "merged")
    assert result["calibration_reference"] == str(ref)
    with Searcher(tmp_path / "merged") as searcher:
        assert searcher.info["params"]["calibrated_against"]["index"] == str(ref)
        assert searcher.info["params"]["calibrated_against"]["tracks"] == 4

    # Sources that disagree leave the destination's own setting, with a warning.
    other = reference_store(tmp_path / "reference2", tmp_path / "other2", 70)
    with IndexStore.open(b, IDENTITY, create=True) as store:
        store.set_calibration_reference(other)
    merge_stores([a, b], tmp_path / "merged")
    assert "calibrated against different references" in caplog.text
    with IndexStore.open(tmp_path / "merged", None, create=False) as merged:
        assert merged.calibration_reference() == str(ref)

    # Chosen on the command line: set, forgotten, or refused before DEST is made.
    args = [str(a), str(b), "--no-progress"]
    assert merge_main([str(tmp_path / "merged"), *args, "--calibrate-with", str(other)]) == 0
    assert json.loads(capsys.readouterr().out)["calibration_reference"] == str(other)
    assert merge_main([str(tmp_path / "merged"), *args, "--calibrate-with", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration_reference"] is None
    with Searcher(tmp_path / "merged") as searcher:
        assert searcher.info["params"]["calibrated_against"] is None
    fresh = tmp_path / "fresh"
    assert merge_main([str(fresh), *args, "--calibrate-with", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: the calibration reference is no index store" in err[0]
    assert not fresh.exists()
