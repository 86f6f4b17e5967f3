"""The durable store: round trip, identity, resume after a crash, renames, duplicates, disk full.

Real SQLite, real files; synthetic embeddings (``mert_indexer.indexer.synthetic``). Faults are
injected only where a real part cannot be made to fail on demand: a killed
child process for the crash, a patched ``os.write`` for a full disk.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.errors import ModelMismatchError, StoreError
from mert_indexer.indexer import segments
from mert_indexer.indexer.catalog import Catalog
from mert_indexer.indexer.store import IndexStore, PendingFile
from mert_indexer.indexer.synthetic import SyntheticEmbedder, indexed_track, synthetic_identity

SR = 100
IDENTITY = synthetic_identity(32, SR)
EMB = SyntheticEmbedder(dim=32, latent_dim=16, seed=7)
ROOT = Path(__file__).resolve().parents[1]


def make_files(folder: Path, n: int, start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"track{i:02d}.mp3"
        p.write_bytes(np.random.default_rng(i).bytes(3000 + 100 * i))
        paths.append(str(p))
    return paths


def track_no(path: str) -> int:
    return int(Path(path).stem.removeprefix("track"))


def add(
    store: IndexStore, pending: PendingFile, seconds: float | None = None, number: int | None = None
) -> None:
    number = track_no(pending.path) if number is None else number
    n, starts, emb = indexed_track(EMB, number, seconds or 20.0 + 3.3 * number, SR)
    store.add_track(pending, n_samples=n, sample_rate=SR, starts=starts, embeddings=emb)


def index_files(store: IndexStore, paths: list[str]) -> None:
    plan = store.plan(paths)
    store.apply(plan)
    for p in plan.todo:
        add(store, p)
    store.commit()


def contents(store: IndexStore) -> set[tuple[str, int, bytes]]:
    """The (track, window) set: path, start and vector bytes of every stored window."""
    return {
        (t.path, int(s), v.tobytes())
        for t, starts, vecs in store.iter_windows()
        for s, v in zip(starts, vecs, strict=True)
    }


def assert_no_gaps_no_duplicates(store: IndexStore, *, dense: bool = True) -> None:
    """Each path once, no two tracks sharing rows, every committed row in exactly one
    track (``dense``; replaced and pruned tracks leave dead rows), files cut to the catalog."""
    tracks = store.tracks()
    assert len({t.path for t in tracks}) == len(tracks)
    rows = store._catalog.segment_rows()
    for seg, n in rows.items():
        used = sorted((t.first_row, t.n_windows) for t in tracks if t.segment == seg)
        pos = 0
        for first, k in used:
            assert first == pos if dense else first >= pos, (
                f"segment {seg}: gap or overlap at row {pos}"
            )
            pos = first + k
        assert pos == n if dense else pos <= n
        assert (store.root / "segments" / f"{seg:06d}.f16").stat().st_size == n * 32 * 2


def test_round_trip_and_unchanged_files_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_files(tmp_path / "music", 4)
    with IndexStore.open(tmp_path / "idx", IDENTITY, create=True) as store:
        plan = store.plan(files)
        assert [p.path for p in plan.todo] == files
        index_files(store, files)
        stats = store.stats()
    assert stats["tracks"] == 4 and stats["failures"] == 0 and stats["dead_windows"] == 0

    with IndexStore.open(tmp_path / "idx", dict(IDENTITY), create=False) as store:
        for t, starts, vecs in store.iter_windows():
            n, want_starts, want = indexed_track(
                EMB, track_no(t.path), 20.0 + 3.3 * track_no(t.path), SR
            )
            assert t.n_samples == n and t.sample_rate == SR
            np.testing.assert_array_equal(starts, want_starts)
            np.testing.assert_allclose(vecs.astype(np.float32), want, rtol=1e-3, atol=1e-3)
        monkeypatch.setattr(
            "mert_indexer.indexer.store.content_hash", lambda p: pytest.fail(f"{p} was hashed")
        )
        plan = store.plan(files)
        assert plan.unchanged == tuple(files) and not plan.todo
        assert store.stats()["windows"] == sum(t.n_windows for t in store.tracks())


def test_identity_mismatch_is_refused_naming_the_fields(tmp_path: Path) -> None:
    IndexStore.open(tmp_path, IDENTITY, create=True).close()
    other = IDENTITY | {"embedding_dim": 64, "weights_sha256": "f" * 64}
    with pytest.raises(ModelMismatchError, match=r"embedding_dim: 32 != 64.*weights_sha256"):
        IndexStore.open(tmp_path, other, create=True)
    with pytest.raises(StoreError, match="lacks embedding_dim"):
        IndexStore.open(
            tmp_path, {"model_id": "x", "window_samples": 1, "sample_rate": 1}, create=True
        )
    with pytest.raises(StoreError, match="no index store"):
        IndexStore.open(tmp_path / "absent", None, create=False)
    with IndexStore.open(tmp_path, None, create=False) as ro:  # any model, read-only
        assert ro.identity == IDENTITY
        with pytest.raises(StoreError, match="read-only"):
            ro.record_failure("x", "y")


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, IDENTITY, create=True):
        with pytest.raises(StoreError, match="another process is writing"):
            IndexStore.open(tmp_path, IDENTITY, create=True)
        IndexStore.open(tmp_path, None, create=False).close()  # readers need no lock


def test_bad_embeddings_are_refused_naming_the_file(tmp_path: Path) -> None:
    p = PendingFile("a.mp3", "h", 1, 1)
    good = np.zeros((2, 32), np.float32)
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        nan, big = np.full((2, 32), np.nan, np.float32), np.full((2, 32), 1e6, np.float32)
        cases = [
            ({"starts": np.array([0, 500]), "embeddings": np.zeros((2, 16), np.float32)}, "shape"),
            ({"starts": np.array([0, 500]), "embeddings": nan}, "NaN"),
            ({"starts": np.array([0, 500]), "embeddings": big}, "float16"),
            ({"starts": np.array([0, 600]), "embeddings": good}, "past the track's end"),
            ({"starts": np.array([500, 0]), "embeddings": good}, "increasing"),
            ({"starts": np.array([0.0, 500.0]), "embeddings": good}, "integers"),
        ]
        for kwargs, message in cases:
            with pytest.raises(StoreError, match=f"a.mp3: .*{message}"):
                store.add_track(p, n_samples=1000, sample_rate=SR, **kwargs)
        # A track shorter than one window, sent alone and unpadded, is accepted.
        store.add_track(p, n_samples=300, sample_rate=SR, starts=np.array([0]), embeddings=good[:1])
        store.commit()
        assert store.stats()["windows"] == 1


CRASH_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_store import IDENTITY, add
    from mert_indexer.indexer.catalog import Catalog
    from mert_indexer.indexer.store import IndexStore
    store = IndexStore.open({index!r}, IDENTITY, create=True)
    plan = store.plan({files!r})
    for p in plan.todo[:2]:
        add(store, p)
    store.commit()
    for p in plan.todo[2:]:
        add(store, p)
    def crash(self):  # the segments are written and fsynced: die before the catalog records them
        os._exit(17)
    Catalog.transaction = crash
    store.commit()
    """
)


def test_resume_after_crash_between_segment_write_and_catalog(tmp_path: Path) -> None:
    files = make_files(tmp_path / "music", 5)
    index = str(tmp_path / "idx")
    code = CRASH_CHILD.format(tests=str(ROOT / "tests"), index=index, files=files)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 17, proc.stderr
    seg = Path(index) / "segments" / "000001.f16"
    crashed_size = seg.stat().st_size

    with IndexStore.open(index, IDENTITY, create=True) as store:  # recovery cuts the orphan tail
        assert seg.stat().st_size < crashed_size
        assert {t.path for t in store.tracks()} == set(files[:2])
        assert_no_gaps_no_duplicates(store)
        plan = store.plan(files)
        assert [p.path for p in plan.todo] == files[2:]
        index_files(store, files)
        assert_no_gaps_no_duplicates(store)
        resumed = contents(store)
    with IndexStore.open(tmp_path / "clean", IDENTITY, create=True) as clean:
        index_files(clean, files)
        assert resumed == contents(clean)


def test_rename_duplicate_change_prune_and_failures(tmp_path: Path) -> None:
    music = tmp_path / "music"
    a, b, c = make_files(music, 3)
    with IndexStore.open(tmp_path / "idx", IDENTITY, create=True) as store:
        index_files(store, [a, b, c])
        rows = store.stats()["stored_rows"]

        moved = str(music / "renamed.mp3")
        os.rename(a, moved)
        copy = str(music / "copy.mp3")
        Path(copy).write_bytes(Path(b).read_bytes())
        plan = store.plan([moved, b, c, copy])
        assert plan.renamed == ((a, plan.renamed[0][1]),) and plan.renamed[0][1].path == moved
        assert [(d.path, orig) for d, orig in plan.duplicates] == [(copy, b)]
        assert set(plan.unchanged) == {b, c} and not plan.todo and not plan.gone
        store.apply(plan)
        assert store.stats()["stored_rows"] == rows  # nothing re-embedded
        assert store.status(moved)[0] == "indexed" and store.status(a) is None
        assert store.status(copy)[0] == "duplicate"

        # b changes: re-embedded and replacing its old version; the copy inherits b's old vectors.
        old_b = store.status(b)[1]
        Path(b).write_bytes(b"new content" * 500)
        plan = store.plan([moved, b, c, copy])
        assert [p.path for p in plan.todo] == [b] and set(plan.unchanged) == {moved, c, copy}
        store.apply(plan)
        add(store, plan.todo[0], number=99)
        store.commit()
        assert store.status(b)[1] == plan.todo[0].content_hash
        assert store.status(copy) == ("indexed", old_b)
        assert store.stats()["tracks"] == 4 and store.stats()["duplicates"] == 0

        # c fails on the next run: recorded, its stale vectors dropped, retried later.
        Path(c).write_bytes(b"broken")
        plan = store.plan([moved, b, c, copy])
        assert [p.path for p in plan.todo] == [c]
        store.record_failure(c, "cannot decode: invalid data")
        store.commit()
        assert (
            store.failures() == {c: "cannot decode: invalid data"}
            and store.status(c)[0] == "failed"
        )
        assert [p.path for p in store.plan([moved, b, c, copy]).todo] == [c]

        os.remove(moved)
        plan = store.plan([b, c, copy])
        assert plan.gone == (moved,)
        assert store.prune(plan.gone) == 1
        assert {t.path for t in store.tracks()} == {b, copy}
        assert_no_gaps_no_duplicates(store, dense=False)
        assert store.stats()["dead_windows"] > 0  # replaced and pruned rows wait for a compaction


def test_unreadable_paths_are_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "dir.mp3").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "broken.mp3")
    with IndexStore.open(tmp_path / "idx", IDENTITY, create=True) as store:
        plan = store.plan([str(tmp_path / "dir.mp3"), str(tmp_path / "broken.mp3")])
    assert [p for p, _ in plan.unreadable] == [
        str(tmp_path / "dir.mp3"),
        str(tmp_path / "broken.mp3"),
    ]
    assert dict(plan.unreadable)[str(tmp_path / "dir.mp3")] == "not a regular file"


def test_disk_full_while_writing_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = make_files(tmp_path / "music", 4)
    with IndexStore.open(tmp_path / "idx", IDENTITY, create=True) as store:
        index_files(store, files[:2])
        before = contents(store)
        plan = store.plan(files)
        for p in plan.todo:
            add(store, p)
        real_write = os.write
        calls = {"n": 0}

        def write_then_fill(fd: int, data: bytes) -> int:
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data[: len(data) // 2])  # a partial write lands first

        monkeypatch.setattr(segments.os, "write", write_then_fill)
        with pytest.raises(StoreError, match=r"000001\.f16: cannot write embeddings \(disk full\)"):
            store.commit()
        monkeypatch.undo()
        assert contents(store) == before
        assert_no_gaps_no_duplicates(store)  # the partial write was cut off
        with IndexStore.open(tmp_path / "idx", None, create=False) as reader:
            assert contents(reader) == before
        store.commit()  # space freed: the kept buffer commits
        assert {t.path for t in store.tracks()} == set(files)
        assert_no_gaps_no_duplicates(store)


def test_disk_full_while_writing_the_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_files(tmp_path / "music", 3)
    with IndexStore.open(tmp_path / "idx", IDENTITY, create=True) as store:
        index_files(store, files[:1])
        before = contents(store)
        for p in store.plan(files).todo:
            add(store, p)

        def full(*args: object) -> int:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(Catalog, "insert_track", staticmethod(full))
        with pytest.raises(
            StoreError, match="catalog write failed, nothing recorded: database or disk is full"
        ):
            store.commit()
        monkeypatch.undo()
        assert contents(store) == before
        assert_no_gaps_no_duplicates(store)
    with IndexStore.open(tmp_path / "idx", IDENTITY, create=True) as store:
        assert contents(store) == before
        index_files(store, files)
        assert len(store.tracks()) == 3
        assert_no_gaps_no_duplicates(store)


def test_segments_roll_over_and_tracks_stay_contiguous(tmp_path: Path) -> None:
    files = make_files(tmp_path / "music", 6)
    with IndexStore.open(
        tmp_path / "idx", IDENTITY, create=True, segment_bytes=12 * 32 * 2
    ) as store:
        for f in files:  # one commit per track, as a slow client would
            index_files(store, [f])
        assert store.stats()["segments"] >= 3
        assert_no_gaps_no_duplicates(store)
