"""IndexStore: the durable, resumable store of one catalogue's window embeddings.

The facade the client's writer stage talks to. It joins the catalog
(``catalog.py``), the segments (``segments.py``) and the index build
(``faiss_index.py``); each keeps its own job.

    index_dir/
      LOCK              flock()ed by the one process that may write
      catalog.sqlite    tracks, duplicates, failures, segments, meta (WAL mode)
      segments/         000001.f16 + 000001.starts, ... (append-only)
      index/            CURRENT + one generation directory per build

Durability rule, what makes resume exact: a track exists only once a catalog
transaction has recorded it, and that transaction runs only after its vectors
are written and fsynced. A crash or a full disk in between leaves bytes that
no catalog row counts; they are overwritten by the next commit and cut off
when the store is next opened for writing. A rerun then finds the file not
indexed and embeds it again: no half track, no duplicate, no gap.

Not thread-safe: one thread adds and commits (the client's writer stage). One
process at a time may hold a store open for writing (``LOCK``); readers
(``identity=None``, :class:`mert_indexer.indexer.search.Searcher`) need no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from mert_indexer.errors import ModelMismatchError, StoreError
from mert_indexer.indexer import faiss_index
from mert_indexer.indexer.catalog import SCHEMA_VERSION, Catalog, TrackRow
from mert_indexer.indexer.hashing import HASH_ALGORITHM, content_hash
from mert_indexer.indexer.segments import (
    DEFAULT_SEGMENT_BYTES,
    START_DTYPE,
    VECTOR_DTYPE,
    SegmentReader,
    SegmentWriter,
)

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite"
SEGMENTS_DIR = "segments"
LOCK_FILE = "LOCK"
REQUIRED_IDENTITY = ("embedding_dim", "window_samples", "sample_rate")
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class PendingFile:
    """A file to embed, as :meth:`IndexStore.plan` saw it."""

    path: str
    content_hash: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class IngestPlan:
    """What a run has to do with each of its files; :meth:`IndexStore.plan` makes it.

    ``refreshed``: same path, same content, new size/mtime record (touched);
    ``renamed``: (old path, the file now holding that content);
    ``duplicates``: (file, path that already holds the same content);
    ``unreadable``: (path, reason) for files that could not be stat'ed or read.
    """

    todo: tuple[PendingFile, ...] = ()
    unchanged: tuple[str, ...] = ()
    refreshed: tuple[PendingFile, ...] = ()
    renamed: tuple[tuple[str, PendingFile], ...] = ()
    duplicates: tuple[tuple[PendingFile, str], ...] = ()
    gone: tuple[str, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()

    def summary(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in self.__dataclass_fields__}


@dataclass
class _Buffered:
    pending: PendingFile
    n_samples: int
    sample_rate: int
    starts: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float16 [n, dim]


def _canonical(identity: dict[str, Any]) -> dict[str, Any]:
    """Identity as JSON gives it back (tuples become lists), so comparisons are exact."""
    try:
        return json.loads(json.dumps(identity, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"model identity is not JSON-serialisable: {exc}") from exc


def identity_differences(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Human-readable ``field: stored != given`` for every differing field."""
    return [
        f"{key}: {stored.get(key, '<absent>')!r} != {given.get(key, '<absent>')!r}"
        for key in sorted(set(stored) | set(given))
        if stored.get(key) != given.get(key)
    ]


class IndexStore:
    """Catalog + segments of one index directory. Open with :meth:`open`."""

    def __init__(
        self,
        root: Path,
        catalog: Catalog,
        identity: dict[str, Any],
        *,
        read_only: bool,
        lock_fd: int | None,
        segment_bytes: int,
    ) -> None:
        self.root = root
        self.identity = identity
        self.read_only = read_only
        self._catalog = catalog
        self._lock_fd = lock_fd
        self.dim = int(identity["embedding_dim"])
        self._window_seconds = int(identity["window_samples"]) / int(identity["sample_rate"])
        self._rows_per_segment = max(1, segment_bytes // (self.dim * VECTOR_DTYPE.itemsize))
        self._writer = None if read_only else SegmentWriter(root / SEGMENTS_DIR, self.dim)
        self._tracks: dict[str, _Buffered] = {}
        self._failures: dict[str, str] = {}

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        identity: dict[str, Any] | None,
        *,
        create: bool,
        read_only: bool | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> IndexStore:
        """Open (or with ``create`` make) the store in ``index_dir``.

        ``identity`` is the model's (``ModelContract.identity() | {"hop_samples": ...}``);
        an existing store built by another model raises :class:`ModelMismatchError`
        naming the fields. ``identity=None`` accepts whatever model built the store
        and opens read-only unless ``read_only=False``.
        """
        root = Path(index_dir)
        catalog_path = root / CATALOG_FILE
        if read_only is None:
            read_only = identity is None
        if identity is not None:
            identity = _canonical(identity)
            missing = [k for k in REQUIRED_IDENTITY if k not in identity]
            if missing:
                raise StoreError(f"{root}: model identity lacks {', '.join(missing)}")
        if not catalog_path.exists():
            if not create:
                raise StoreError(f"{root}: no index store here ({CATALOG_FILE} missing)")
            if identity is None or read_only:
                raise StoreError(
                    f"{root}: creating a store needs the model identity and write access"
                )
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{root}: cannot create the store: {exc.strerror}") from exc
        lock_fd = None if read_only else _lock(root)
        try:
            catalog = Catalog(catalog_path, read_only=read_only)
            try:
                stored = cls._check_meta(root, catalog, identity, read_only)
                store = cls(
                    root,
                    catalog,
                    stored,
                    read_only=read_only,
                    lock_fd=lock_fd,
                    segment_bytes=segment_bytes,
                )
                if store._writer is not None:
                    store._writer.recover(catalog.segment_rows())
            except BaseException:
                catalog.close()
                raise
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return store

    @staticmethod
    def _check_meta(
        root: Path, catalog: Catalog, identity: dict[str, Any] | None, read_only: bool
    ) -> dict[str, Any]:
        stored = catalog.get_meta("identity")
        if stored is None:
            if identity is None or read_only:
                raise StoreError(f"{catalog.path}: the catalog records no model identity")
            with catalog.transaction() as db:
                Catalog.set_meta(db, "identity", identity)
                Catalog.set_meta(db, "schema_version", SCHEMA_VERSION)
                Catalog.set_meta(db, "hash_algorithm", HASH_ALGORITHM)
                Catalog.set_meta(db, "created_at", time.time())
            return identity
        version = catalog.get_meta("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{catalog.path}: catalog schema {version}, this program reads {SCHEMA_VERSION}"
            )
        algorithm = catalog.get_meta("hash_algorithm")
        if algorithm != HASH_ALGORITHM:
            raise StoreError(
                f"{catalog.path}: files were hashed with {algorithm}, "
                f"this program uses {HASH_ALGORITHM}"
            )
        if identity is not None:
            diffs = identity_differences(stored, identity)
            if diffs:
                raise ModelMismatchError(
                    f"{root}: the store was built by another model ({'; '.join(diffs)}); "
                    "use a new index directory or the model that built it"
                )
        return stored

    # -- planning ------------------------------------------------------------

    def plan(self, paths: Sequence[str | os.PathLike[str]]) -> IngestPlan:
        """Decide, per file, what a run has to do; changes nothing.

        A file whose path, size and mtime match the catalog is not read at all;
        any other is hashed (streamed) and matched by content.
        """
        order = list(dict.fromkeys(os.fspath(p) for p in paths))
        dups = self._catalog.duplicates()
        unchanged: list[str] = []
        refreshed: list[PendingFile] = []
        unreadable: list[tuple[str, str]] = []
        changed: list[PendingFile] = []
        content_left: set[str] = set()  # catalogued paths whose content changed
        for path in order:
            try:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):
                    unreadable.append((path, "not a regular file"))
                    continue
                track = self._catalog.track_by_path(path)
                known = (
                    (track.content_hash, track.size, track.mtime_ns) if track else dups.get(path)
                )
                if known is not None and known[1:] == (st.st_size, st.st_mtime_ns):
                    unchanged.append(path)
                    continue
                pending = PendingFile(path, content_hash(path), st.st_size, st.st_mtime_ns)
            except OSError as exc:
                unreadable.append((path, exc.strerror or str(exc)))
                continue
            if known is not None and known[0] == pending.content_hash:
                refreshed.append(pending)
                continue
            if track is not None:
                content_left.add(path)
            changed.append(pending)

        todo: list[PendingFile] = []
        renamed: list[tuple[str, PendingFile]] = []
        duplicates: list[tuple[PendingFile, str]] = []
        holder: dict[str, str] = {}  # content hash -> path that holds it after this plan
        moved_away: set[str] = set()
        for pending in changed:
            h = pending.content_hash
            if h in holder:
                duplicates.append((pending, holder[h]))
                continue
            others = [
                t.path
                for t in self._catalog.tracks_by_hash(h)
                if t.path != pending.path and t.path not in moved_away
            ]
            still_there = [p for p in others if p not in content_left and os.path.exists(p)]
            if still_there:
                duplicates.append((pending, still_there[0]))
                holder[h] = still_there[0]
            elif others:
                renamed.append((others[0], pending))
                moved_away.add(others[0])
                holder[h] = pending.path
            else:
                todo.append(pending)
                holder[h] = pending.path

        listed = set(order)
        gone = [
            p
            for p in self._catalog.all_paths()
            if p not in listed and p not in moved_away and not os.path.exists(p)
        ]
        return IngestPlan(
            todo=tuple(todo),
            unchanged=tuple(unchanged),
            refreshed=tuple(refreshed),
            renamed=tuple(renamed),
            duplicates=tuple(duplicates),
            gone=tuple(gone),
            unreadable=tuple(unreadable),
        )

    def apply(self, plan: IngestPlan) -> None:
        """Record the plan's renames, duplicates and refreshed stats, in one transaction.

        Call before adding the plan's ``todo`` files: a todo file's commit
        replaces whatever the catalog holds at its path.
        """
        self._writable()
        if not (plan.renamed or plan.duplicates or plan.refreshed):
            return
        with self._catalog.transaction() as db:
            moving: list[tuple[int, PendingFile]] = []
            for old, pending in plan.renamed:  # first park every moving track: renames may chain
                row = db.execute(
                    "SELECT id FROM tracks WHERE path = ? AND content_hash = ?",
                    (old, pending.content_hash),
                ).fetchone()
                if row is None:
                    raise StoreError(f"{old}: stale plan: no longer catalogued with that content")
                db.execute(
                    "UPDATE tracks SET path = ? WHERE id = ?", (f"\0moving:{row[0]}", row[0])
                )
                moving.append((row[0], pending))
            for track_id, p in moving:
                self._clear_path(db, p.path)
                db.execute(
                    "UPDATE tracks SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                    (p.path, p.size, p.mtime_ns, track_id),
                )
            for p, _original in plan.duplicates:
                self._clear_path(db, p.path)
                db.execute(
                    "INSERT INTO duplicates(path, content_hash, size, mtime_ns) "
                    "VALUES (?, ?, ?, ?)",
                    (p.path, p.content_hash, p.size, p.mtime_ns),
                )
            for p in plan.refreshed:
                for table in ("tracks", "duplicates"):
                    db.execute(
                        f"UPDATE {table} SET size = ?, mtime_ns = ? "
                        "WHERE path = ? AND content_hash = ?",
                        (p.size, p.mtime_ns, p.path, p.content_hash),
                    )

    @staticmethod
    def _clear_path(db: Any, path: str, doomed: frozenset[str] = frozenset()) -> int:
        """Forget what the catalog holds at ``path``: its content is replaced or gone.

        A track whose content survives as a recorded duplicate still on disk
        (and not in ``doomed``) is handed over to it instead of being dropped,
        so that content stays searchable. Returns the entries removed.
        """
        removed = 0
        row = db.execute("SELECT id, content_hash FROM tracks WHERE path = ?", (path,)).fetchone()
        if row is not None:
            heirs = db.execute(
                "SELECT path, size, mtime_ns FROM duplicates WHERE content_hash = ? AND path != ? "
                "ORDER BY path",
                (row[1], path),
            ).fetchall()
            heir = next((h for h in heirs if h[0] not in doomed and os.path.exists(h[0])), None)
            if heir is None:
                db.execute("DELETE FROM tracks WHERE id = ?", (row[0],))
            else:
                db.execute("DELETE FROM duplicates WHERE path = ?", (heir[0],))
                db.execute(
                    "UPDATE tracks SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                    (*heir, row[0]),
                )
            removed += 1
        for table in ("duplicates", "failures"):
            removed += db.execute(f"DELETE FROM {table} WHERE path = ?", (path,)).rowcount
        return removed

    # -- adding --------------------------------------------------------------

    def add_track(
        self,
        pending: PendingFile,
        *,
        n_samples: int,
        sample_rate: int,
        starts: np.ndarray,
        embeddings: np.ndarray,
    ) -> None:
        """Buffer one file's windows until :meth:`commit`.

        ``starts``: int64 window starts in samples at ``sample_rate``, one per row
        of ``embeddings`` (float32 or float16, ``[n_windows, embedding_dim]``).
        Raises :class:`StoreError` naming the file for anything a store must not hold.
        """
        self._writable()
        path = pending.path
        emb = np.asarray(embeddings)
        st = np.asarray(starts)
        if emb.ndim != 2 or emb.shape[1] != self.dim or len(emb) == 0:
            raise StoreError(
                f"{path}: embeddings of shape {emb.shape}, the store holds [n >= 1, {self.dim}]"
            )
        if st.shape != (len(emb),) or not np.issubdtype(st.dtype, np.integer):
            raise StoreError(
                f"{path}: starts must be {len(emb)} integers, one per window "
                f"(got {st.dtype} {st.shape})"
            )
        if not np.isfinite(emb).all():
            raise StoreError(f"{path}: embeddings contain NaN or Inf")
        if float(np.abs(emb).max()) > FLOAT16_MAX:
            raise StoreError(
                f"{path}: embedding values beyond float16 range (|x| > {FLOAT16_MAX:g})"
            )
        if n_samples <= 0 or sample_rate <= 0:
            raise StoreError(
                f"{path}: n_samples={n_samples} and sample_rate={sample_rate} must be positive"
            )
        window = round(self._window_seconds * sample_rate)
        if st[0] < 0 or np.any(np.diff(st) <= 0):
            raise StoreError(f"{path}: window starts must be non-negative and increasing")
        if st[-1] + window > n_samples and not (len(st) == 1 and st[0] == 0):
            raise StoreError(
                f"{path}: window at {int(st[-1])} runs past the track's end ({n_samples} samples)"
            )
        self._failures.pop(path, None)
        self._tracks[path] = _Buffered(
            pending,
            int(n_samples),
            int(sample_rate),
            st.astype(START_DTYPE),
            emb.astype(VECTOR_DTYPE),
        )

    def record_failure(self, path: str, reason: str) -> None:
        """Note that ``path`` could not be embedded; recorded at :meth:`commit`, retried next run.

        The catalog then holds nothing else for ``path``: a file that fails
        after a change no longer has its old embeddings searched.
        """
        self._writable()
        self._tracks.pop(path, None)
        self._failures[path] = reason

    @property
    def pending_windows(self) -> int:
        """Windows buffered since the last commit (the caller decides when to commit)."""
        return sum(len(b.starts) for b in self._tracks.values())

    def commit(self) -> None:
        """Make everything added so far durable: segments written and fsynced, then the catalog.

        On failure (disk full, I/O error) raises :class:`StoreError`, records
        nothing and keeps the buffer: free space and commit again, or close.
        """
        self._writable()
        if not self._tracks and not self._failures:
            return
        assert self._writer is not None
        committed = self._catalog.segment_rows()
        segment = max(committed, default=1)
        rows = committed.get(segment, 0)
        placed: list[tuple[_Buffered, int, int]] = []
        for buf in self._tracks.values():
            n = len(buf.starts)
            if rows and rows + n > self._rows_per_segment:
                segment, rows = segment + 1, 0
            placed.append((buf, segment, rows))
            rows += n
        touched = sorted({seg for _, seg, _ in placed})
        try:
            for seg in touched:
                group = [(b, first) for b, s, first in placed if s == seg]
                self._writer.write(
                    seg,
                    group[0][1],
                    np.concatenate([b.vectors for b, _ in group]),
                    np.concatenate([b.starts for b, _ in group]),
                )
        except OSError as exc:
            self._undo(touched, committed)
            what = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise StoreError(
                f"{exc.filename or self.root / SEGMENTS_DIR}: cannot write embeddings ({what}); "
                f"nothing of this commit was recorded, {len(self._tracks)} tracks still buffered"
            ) from exc
        try:
            with self._catalog.transaction() as db:
                ends: dict[int, int] = {}
                for buf, seg, first in placed:
                    ends[seg] = first + len(buf.starts)
                for seg, end in ends.items():
                    Catalog.set_segment_rows(db, seg, end)
                for buf, seg, first in placed:
                    p = buf.pending
                    self._clear_path(db, p.path)
                    Catalog.insert_track(
                        db,
                        TrackRow(
                            0,
                            p.path,
                            p.content_hash,
                            p.size,
                            p.mtime_ns,
                            buf.n_samples,
                            buf.sample_rate,
                            len(buf.starts),
                            seg,
                            first,
                        ),
                    )
                for path, reason in self._failures.items():
                    self._clear_path(db, path)
                    Catalog.record_failure(db, path, reason)
        except BaseException:
            self._undo(touched, committed)
            raise
        self._tracks.clear()
        self._failures.clear()

    def _undo(self, touched: list[int], committed: dict[int, int]) -> None:
        """Cut the segments back to their committed rows after a failed commit (best effort)."""
        assert self._writer is not None
        for seg in touched:
            try:
                self._writer.truncate(seg, committed.get(seg, 0))
            except OSError as exc:  # the next open for writing truncates again
                log.warning("cannot cut back segment %s after a failed commit: %s", seg, exc)

    # -- removing ------------------------------------------------------------

    def prune(self, paths: Iterable[str]) -> int:
        """Forget ``paths`` (files gone from disk); returns how many catalog entries went.

        When a pruned track's content survives as a recorded duplicate that is
        still on disk, the duplicate takes the track over instead of losing it.
        Failures recorded for ``paths`` are forgotten too.
        Pruned windows stay in their segment as dead rows until a compaction
        (``merge_stores([this], new_dir)``).
        """
        self._writable()
        targets = list(dict.fromkeys(paths))
        doomed = frozenset(targets)
        with self._catalog.transaction() as db:
            return sum(self._clear_path(db, path, doomed) for path in targets)

    # -- reading -------------------------------------------------------------

    def tracks(self) -> list[TrackRow]:
        """Every committed track, in storage order."""
        return self._catalog.tracks()

    def failures(self) -> dict[str, str]:
        """path -> reason of every recorded failure."""
        return self._catalog.failures()

    def duplicates(self) -> dict[str, tuple[str, int, int]]:
        """path -> (content hash, size, mtime_ns) of every recorded duplicate."""
        return self._catalog.duplicates()

    def status(self, path: str) -> tuple[str, str | None] | None:
        """("indexed" | "duplicate" | "failed", content hash) of ``path``, ``None`` if unknown.

        Committed state only.
        """
        return self._catalog.status(path)

    def reader(self) -> SegmentReader:
        """A memory-mapped view of the committed segments."""
        return SegmentReader(self.root / SEGMENTS_DIR, self.dim, self._catalog.segment_rows())

    def iter_windows(self) -> Iterator[tuple[TrackRow, np.ndarray, np.ndarray]]:
        """(track, int64 starts, float16 vectors) of every committed track, in storage order."""
        reader = self.reader()
        try:
            for t in self.tracks():
                rows = slice(t.first_row, t.first_row + t.n_windows)
                yield (
                    t,
                    np.array(reader.starts(t.segment)[rows]),
                    np.array(reader.vectors(t.segment)[rows]),
                )
        finally:
            reader.close()

    def stats(self) -> dict[str, Any]:
        """Counts for reports: tracks, windows, duplicates, failures, dead rows, bytes, index."""
        counts = self._catalog.counts()
        seg_dir = self.root / SEGMENTS_DIR
        seg_bytes = sum(p.stat().st_size for p in seg_dir.iterdir()) if seg_dir.exists() else 0
        return {
            **counts,
            "dead_windows": counts["stored_rows"] - counts["windows"],
            "segments": len(self._catalog.segment_rows()),
            "segment_bytes": seg_bytes,
            "pending_tracks": len(self._tracks),
            "identity": self.identity,
            "index": faiss_index.current_info(self.root / faiss_index.INDEX_DIR),
        }

    # -- indexing ------------------------------------------------------------

    def build_index(
        self,
        *,
        kind: str = "auto",
        progress: bool = False,
        options: faiss_index.IndexOptions | None = None,
    ) -> dict[str, Any]:
        """(Re)build the FAISS index over every committed track; returns its info.

        ``kind``: "auto" (exact up to ``IndexOptions.exact_max`` windows, else
        IVF-PQ), "exact" or "ivfpq". The new index replaces the old atomically;
        its kind and parameters are recorded in the catalog.
        """
        self._writable()
        if self._tracks:
            log.warning(
                "%s: %d uncommitted tracks are left out of the index", self.root, len(self._tracks)
            )
        opts = options or faiss_index.IndexOptions()
        if kind != opts.kind and kind != "auto":
            opts = faiss_index.IndexOptions(**{**opts.__dict__, "kind": kind})
        tracks = self.tracks()
        runs = [
            faiss_index.TrackRun(t.id, t.path, t.sample_rate, t.segment, t.first_row, t.n_windows)
            for t in tracks
        ]
        reader = self.reader()
        try:
            info = faiss_index.build(
                runs,
                reader,
                self.root / faiss_index.INDEX_DIR,
                identity=self.identity,
                options=opts,
                progress=progress,
            )
        finally:
            reader.close()
        with self._catalog.transaction() as db:
            Catalog.set_meta(db, "index", {k: v for k, v in info.items() if k != "identity"})
        return info

    # -- closing -------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only or self._lock_fd is None:
            raise StoreError(f"{self.root}: the store is open read-only (or closed)")

    def close(self) -> None:
        """Release the store; tracks not committed are dropped, as after a crash."""
        if self._tracks or self._failures:
            log.warning("%s: closing with %d uncommitted tracks", self.root, len(self._tracks))
            self._tracks.clear()
            self._failures.clear()
        self._catalog.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _lock(root: Path) -> int:
    """Hold ``root/LOCK`` for this process: one writer per store."""
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the store for writing: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise StoreError(
            f"{root}: another process is writing this store ({path} is locked)"
        ) from exc
    return fd
