"""IndexStore: the durable, resumable store of one catalogue's window embeddings.

Longer than the project's ~400-line norm on purpose: opening (lock, schema
checks, migration), the two-phase commit with its recovery, and the checks on
what a store may hold are one protocol, read best in one place; the index
half lives in ``upkeep.py``, locking in ``locking.py``.

The facade the client's writer stage talks to. It joins the catalog
(``catalog.py``: every SQL statement), the segments (``segments.py``), the
ingest planning (``plan.py``) and the index build (``build.py``); each keeps
its own job. What is left here is the two-phase commit and the checks on what
a store may hold.

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

A failure of the catalog transaction itself (disk full, or an exception such
as KeyboardInterrupt that Python raises after SQLite's COMMIT returned) is
judged by the catalog, never by the exception: the segments are cut back only
to what the catalog counts once the exception arrived, so a committed commit
is never undone, and an uncommitted one leaves only unrecorded bytes.

A copy of a file that this run embeds (same content, another path) is recorded
as its duplicate in the transaction that commits the original, never before:
a duplicate always points at committed content.

Not thread-safe: one thread adds and commits (the client's writer stage). One
process at a time may hold a store open for writing (``LOCK``); readers
(``identity=None``, :class:`mert_indexer.indexer.search.Searcher`) need no lock.
The lock is an ``flock`` plus an owner record in ``LOCK``: opening refuses a
filesystem whose ``flock`` does not exclude a second descriptor, and every
commit checks that the record still names this process, so a second writer
let in by a network filesystem whose locks do not reach across machines stops
the first one at its next commit instead of interleaving rows (best effort:
supported are local filesystems, and on network volumes one writer per store).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.errors import ModelMismatchError, StoreError
from mert_indexer.indexer import faults
from mert_indexer.indexer.catalog import (
    CATALOG_FILE,
    READABLE_SCHEMAS,
    SCHEMA_VERSION,
    Catalog,
    TrackRow,
    existing_catalog,
    identity_differences,
)
from mert_indexer.indexer.generation import INDEX_DIR, current_info
from mert_indexer.indexer.hashing import HASH_ALGORITHM
from mert_indexer.indexer.locking import LOCK_FILE, read_owner, take_lock
from mert_indexer.indexer.migrate import migrate_paths
from mert_indexer.indexer.plan import IngestPlan, PendingFile, plan_ingest
from mert_indexer.indexer.segments import (
    DEFAULT_SEGMENT_BYTES,
    SEGMENTS_DIR,
    START_DTYPE,
    VECTOR_DTYPE,
    SegmentReader,
    SegmentWriter,
)
from mert_indexer.indexer.upkeep import IndexUpkeep

log = logging.getLogger(__name__)

REQUIRED_IDENTITY = ("embedding_dim", "window_samples", "sample_rate")
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class StoreSnapshot:
    """One consistent committed state of a store (:meth:`IndexStore.snapshot`)."""

    tracks: list[TrackRow]
    duplicates: dict[str, tuple[str, int, int]]
    failures: dict[str, str]
    reader: SegmentReader


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


class IndexStore(IndexUpkeep):
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
        owner: str | None = None,
    ) -> None:
        self.root = root
        self.identity = identity
        self.read_only = read_only
        self._catalog = catalog
        self._lock_fd = lock_fd
        self._owner = owner  # this writer's token in LOCK
        self.dim = int(identity["embedding_dim"])
        self._window_seconds = int(identity["window_samples"]) / int(identity["sample_rate"])
        self._rows_per_segment = max(1, segment_bytes // (self.dim * VECTOR_DTYPE.itemsize))
        self._writer = None if read_only else SegmentWriter(root / SEGMENTS_DIR, self.dim)
        self._tracks: dict[str, _Buffered] = {}
        self._failures: dict[str, tuple[str, bool]] = {}  # path -> (reason, transient)
        # original path -> copies of it (apply()) recorded when the original commits
        self._waiting: dict[str, list[PendingFile]] = {}

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
        path_base: str | Path | None = None,
    ) -> IndexStore:
        """Open (or with ``create`` make) the store in ``index_dir``.

        ``identity`` is the model's (``ModelContract.identity() | {"hop_samples": ...}``);
        an existing store built by another model raises :class:`ModelMismatchError`
        naming the fields. ``identity=None`` accepts whatever model built the store
        and opens read-only unless ``read_only=False``. Opening a schema-1 store
        for writing migrates its relative paths against ``path_base`` (default:
        the current directory), see :func:`migrate_paths`.
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
        if not create:
            existing_catalog(root)  # StoreError when there is no store here
        elif not catalog_path.exists():
            if identity is None or read_only:
                raise StoreError(
                    f"{root}: creating a store needs the model identity and write access"
                )
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{root}: cannot create the store: {exc.strerror}") from exc
        lock_fd, owner = (None, None) if read_only else take_lock(root)
        try:
            catalog = Catalog(catalog_path, read_only=read_only)
            try:
                stored = cls._check_meta(root, catalog, identity, read_only)
                if not read_only and catalog.get_meta("schema_version") != SCHEMA_VERSION:
                    migrate_paths(catalog, Path.cwd() if path_base is None else Path(path_base))
                store = cls(
                    root,
                    catalog,
                    stored,
                    read_only=read_only,
                    lock_fd=lock_fd,
                    segment_bytes=segment_bytes,
                    owner=owner,
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
            with catalog.transaction() as tx:
                tx.set_meta("identity", identity)
                tx.set_meta("schema_version", SCHEMA_VERSION)
                tx.set_meta("hash_algorithm", HASH_ALGORITHM)
                tx.set_meta("created_at", time.time())
            return identity
        version = catalog.get_meta("schema_version")
        if version not in READABLE_SCHEMAS:
            raise StoreError(
                f"{catalog.path}: catalog schema {version}, this program reads "
                f"{', '.join(map(str, READABLE_SCHEMAS))}"
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

    def plan(
        self,
        paths: Sequence[str | os.PathLike[str]],
        roots: Sequence[str | os.PathLike[str]] | None = None,
    ) -> IngestPlan:
        """Decide, per file, what a run has to do (:func:`plan_ingest`); changes nothing.

        ``roots``: the run's inputs; only catalogued paths under them can be ``gone``.
        The plan names files in their stored form (absolute, ``canonical_path``); the
        other methods take paths as a plan (or the catalog) gives them.
        """
        return plan_ingest(self._catalog, paths, roots)

    def apply(self, plan: IngestPlan) -> None:
        """Record the plan's renames, duplicates and refreshed stats, in one transaction.

        Call before adding the plan's ``todo`` files: a todo file's commit
        replaces whatever the catalog holds at its path. A duplicate of content
        that no committed track holds yet (a copy of a ``todo`` file) is kept
        back and recorded by the commit that records its original; if that
        never happens, the copy is not recorded and the next run plans it again.
        """
        self._writable()
        if not (plan.renamed or plan.duplicates or plan.refreshed):
            return
        deferred: list[tuple[str, PendingFile]] = []
        with self._catalog.transaction() as tx:
            faults.point("store.apply")
            tx.move_tracks(
                ((old, p.content_hash, p.path, p.size, p.mtime_ns) for old, p in plan.renamed),
                os.path.exists,
            )
            for p, original in plan.duplicates:
                tx.clear_path(p.path, os.path.exists)
                if self._catalog.tracks_by_hash(p.content_hash):  # this transaction's view
                    tx.add_duplicate(p.path, p.content_hash, p.size, p.mtime_ns)
                else:
                    deferred.append((original, p))
            for p in plan.refreshed:
                tx.refresh_stat(p.path, p.content_hash, p.size, p.mtime_ns)
        for original, p in deferred:
            self._waiting.setdefault(original, []).append(p)

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

    def record_failure(self, path: str, reason: str, *, transient: bool = False) -> None:
        """Note that ``path`` could not be embedded; recorded at :meth:`commit`, retried next run.

        The catalog then holds nothing else for ``path``: a file that fails
        after a change no longer has its old embeddings searched. ``transient``:
        the file could not be read this time (unmounted, permissions, I/O error,
        a broken link), which says nothing about its content: whatever the
        catalog holds for ``path`` stays, and the failure is recorded only
        where it holds nothing. Copies of ``path`` waiting for it (see
        :meth:`apply`) are recorded as failed with it.
        """
        self._writable()
        self._tracks.pop(path, None)
        self._failures[path] = (reason, transient)
        for copy in self._waiting.pop(path, []):
            self._tracks.pop(copy.path, None)
            self._failures[copy.path] = (f"same content as {path}, which failed: {reason}", False)

    @property
    def pending_windows(self) -> int:
        """Windows buffered since the last commit (the caller decides when to commit)."""
        return sum(len(b.starts) for b in self._tracks.values())

    def commit(self) -> None:
        """Make everything added so far durable: segments written and fsynced, then the catalog.

        On failure (disk full, I/O error) raises :class:`StoreError`, records
        nothing and keeps the buffer: free space and commit again, or close.
        Any exception that arrives once the catalog transaction committed
        (KeyboardInterrupt raised after COMMIT returned) propagates with the
        commit kept and the buffer emptied: what the catalog counts is never cut.
        """
        self._writable()
        if not self._tracks and not self._failures:
            return
        assert self._writer is not None
        self._check_owner()
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
        ends = {seg: first + len(buf.starts) for buf, seg, first in placed}
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
            self._undo(touched)
            what = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise StoreError(
                f"{exc.filename or self.root / SEGMENTS_DIR}: cannot write embeddings ({what}); "
                f"nothing of this commit was recorded, {len(self._tracks)} tracks still buffered"
            ) from exc
        except BaseException:
            self._undo(touched)
            raise
        copies = {
            buf.pending.path: [
                c
                for c in self._waiting.get(buf.pending.path, [])
                if c.content_hash == buf.pending.content_hash
            ]
            for buf, _, _ in placed
        }
        try:
            with self._catalog.transaction() as tx:
                self._check_owner()  # under the catalog's write lock
                for seg, end in ends.items():
                    tx.set_segment_rows(seg, end)
                for buf, seg, first in placed:
                    p = buf.pending
                    tx.clear_path(p.path, os.path.exists)
                    tx.insert_track(
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
                    for c in copies[p.path]:
                        tx.clear_path(c.path, os.path.exists)
                        tx.add_duplicate(c.path, c.content_hash, c.size, c.mtime_ns)
                for path, (reason, transient) in self._failures.items():
                    if transient and self._catalog.status(path) is not None:
                        continue  # not readable this time: what is indexed for it stays
                    tx.clear_path(path, os.path.exists)
                    tx.record_failure(path, reason)
        except BaseException:
            if ends and self._counts(ends):
                self._committed(copies)
            else:
                self._undo(touched)
            raise
        self._committed(copies)

    def _counts(self, ends: dict[int, int]) -> bool:
        """Whether the committed catalog counts exactly these segment ends (one writer: ours)."""
        try:
            now = self._catalog.segment_rows()
        except StoreError:
            return False  # cannot tell: keep the buffer (a recommit replaces, never loses)
        return all(now.get(seg) == end for seg, end in ends.items())

    def _committed(self, copies: dict[str, list[PendingFile]]) -> None:
        for original in copies:
            self._waiting.pop(original, None)
        self._tracks.clear()
        self._failures.clear()

    def _undo(self, touched: list[int]) -> None:
        """Cut the touched segments back to what the catalog counts now (best effort).

        Asked of the catalog after the failure, not remembered from before it:
        a transaction that committed although an exception followed keeps its rows.
        Whatever is left is cut when the store is next opened for writing.
        """
        assert self._writer is not None
        try:
            committed = self._catalog.segment_rows()
        except StoreError as exc:
            log.warning("cannot read the catalog after a failed commit: %s", exc)
            return
        for seg in touched:
            try:
                self._writer.truncate(seg, committed.get(seg, 0))
            except OSError as exc:  # the next open for writing truncates again
                log.warning("cannot cut back segment %s after a failed commit: %s", seg, exc)

    def _check_owner(self) -> None:
        """Stop if another writer has taken ``LOCK`` over (a filesystem whose locks leak)."""
        if self._owner is None:
            return
        record = read_owner(self.root / LOCK_FILE)
        if record.get("token") != self._owner:
            raise StoreError(
                f"{self.root}: another writer (host {record.get('host', '?')}, "
                f"pid {record.get('pid', '?')}) opened this store while this process was "
                "writing it: the filesystem's locks do not exclude writers (some NFS, SMB or "
                "FUSE mounts). Nothing of this commit was recorded; run one writer per store"
            )

    # -- removing ------------------------------------------------------------

    def prune(self, paths: Iterable[str], *, hand_over: bool = True) -> int:
        """Forget ``paths`` (files gone from disk); returns how many catalog entries went.

        When a pruned track's content survives as a recorded duplicate that is
        still on disk, the duplicate takes the track over instead of losing it
        (``hand_over=False``: exactly these paths go, as a merge mirrors its
        sources). Failures recorded for ``paths`` are forgotten too.
        Pruned windows stay in their segment as dead rows until a compaction
        (``merge_stores([this], new_dir)``).
        """
        self._writable()
        targets = list(dict.fromkeys(paths))
        if not targets:
            return 0
        doomed = frozenset(targets)
        on_disk = os.path.exists if hand_over else (lambda _path: False)
        with self._catalog.transaction() as tx:
            faults.point("store.prune")
            return sum(tx.clear_path(path, on_disk, doomed) for path in targets)

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

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[StoreSnapshot]:
        """The committed state as of one read transaction, with a reader of exactly its rows.

        What a merge copies from: tracks, duplicates, failures and the segment
        row counts all come from the same transaction, however long the copy
        runs and whatever a writer commits meanwhile.
        """
        with self._catalog.snapshot() as cat:
            rows = cat.segment_rows()
            snap = StoreSnapshot(
                cat.tracks(),
                cat.duplicates(),
                cat.failures(),
                SegmentReader(self.root / SEGMENTS_DIR, self.dim, rows),
            )
            try:
                yield snap
            finally:
                snap.reader.close()

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
            "index": current_info(self.root / INDEX_DIR),
        }

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

    def __exit__(self, *exc: object) -> None:
        self.close()
