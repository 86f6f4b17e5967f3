"""The SQLite catalog: which files are indexed, where their vectors lie, what failed.

One database, ``catalog.sqlite``, in WAL mode with ``synchronous=FULL``: a
commit is durable when :meth:`Catalog.transaction` returns, readers never
block the writer, and a crash leaves the last committed state. The catalog is
the single source of truth for the segments: a row of a segment exists for
readers only once a committed transaction counts it.

    meta        key -> JSON value: schema, model identity, hash algorithm, index info
    segments    id -> committed row count
    tracks      one indexed file: path, content hash, stat, duration, where its rows lie
    duplicates  a file whose content is already indexed under another path
    failures    a file that could not be embedded, with the reason (retried next run)
    files       a view of the three above: path, status, content hash

Track ids are never reused (AUTOINCREMENT), so an index built earlier never
names a different file by a reused id.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mert_indexer.errors import StoreError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments (id INTEGER PRIMARY KEY, rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tracks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    sample_rate INTEGER NOT NULL,
    n_windows INTEGER NOT NULL,
    segment INTEGER NOT NULL REFERENCES segments(id),
    first_row INTEGER NOT NULL,
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tracks_by_hash ON tracks(content_hash);
CREATE INDEX IF NOT EXISTS tracks_by_place ON tracks(segment, first_row);
CREATE TABLE IF NOT EXISTS duplicates (
    path TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS duplicates_by_hash ON duplicates(content_hash);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_at REAL NOT NULL
);
CREATE VIEW IF NOT EXISTS files AS
    SELECT path, 'indexed' AS status, content_hash FROM tracks
    UNION ALL SELECT path, 'duplicate', content_hash FROM duplicates
    UNION ALL SELECT path, 'failed', NULL FROM failures;
"""


@dataclass(frozen=True)
class TrackRow:
    """One indexed file as the catalog records it."""

    id: int
    path: str
    content_hash: str
    size: int
    mtime_ns: int
    n_samples: int
    sample_rate: int
    n_windows: int
    segment: int
    first_row: int


_TRACK_COLUMNS = (
    "id, path, content_hash, size, mtime_ns, n_samples, sample_rate, n_windows, segment, first_row"
)


class Catalog:
    """Typed access to ``catalog.sqlite``. One writer; not thread-safe."""

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        try:
            if read_only:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            else:
                self._db = sqlite3.connect(path, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the catalog: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    # -- transactions --------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing; ``sqlite3.Error`` (disk full, ...) becomes :class:`StoreError`."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot start a transaction: {exc}") from exc
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(
                    f"{self.path}: catalog write failed, nothing recorded: {exc}"
                ) from exc
            raise

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: catalog read failed: {exc}") from exc

    # -- meta ----------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    @staticmethod
    def set_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value, sort_keys=True)),
        )

    # -- segments ------------------------------------------------------------

    def segment_rows(self) -> dict[int, int]:
        return dict(self._query("SELECT id, rows FROM segments ORDER BY id"))

    @staticmethod
    def set_segment_rows(db: sqlite3.Connection, segment: int, rows: int) -> None:
        db.execute(
            "INSERT INTO segments(id, rows) VALUES (?, ?) "
            "ON CONFLICT(id) DO UPDATE SET rows = excluded.rows",
            (segment, rows),
        )

    # -- tracks --------------------------------------------------------------

    def track_by_path(self, path: str) -> TrackRow | None:
        rows = self._query(f"SELECT {_TRACK_COLUMNS} FROM tracks WHERE path = ?", (path,))
        return TrackRow(*rows[0]) if rows else None

    def tracks_by_hash(self, content_hash: str) -> list[TrackRow]:
        rows = self._query(
            f"SELECT {_TRACK_COLUMNS} FROM tracks WHERE content_hash = ? ORDER BY id",
            (content_hash,),
        )
        return [TrackRow(*r) for r in rows]

    def tracks(self) -> list[TrackRow]:
        """Every track, in storage order (segment, row): the order vectors are indexed in."""
        rows = self._query(f"SELECT {_TRACK_COLUMNS} FROM tracks ORDER BY segment, first_row")
        return [TrackRow(*r) for r in rows]

    @staticmethod
    def insert_track(db: sqlite3.Connection, t: TrackRow) -> int:
        cur = db.execute(
            "INSERT INTO tracks(path, content_hash, size, mtime_ns, n_samples, sample_rate, "
            "n_windows, segment, first_row, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                t.path,
                t.content_hash,
                t.size,
                t.mtime_ns,
                t.n_samples,
                t.sample_rate,
                t.n_windows,
                t.segment,
                t.first_row,
                time.time(),
            ),
        )
        return int(cur.lastrowid)

    def status(self, path: str) -> tuple[str, str | None] | None:
        """(status, content hash) of ``path``: indexed, duplicate or failed; ``None`` if unknown."""
        rows = self._query("SELECT status, content_hash FROM files WHERE path = ?", (path,))
        return (rows[0][0], rows[0][1]) if rows else None

    def all_paths(self) -> list[str]:
        """Every path the catalog knows: indexed, duplicate or failed."""
        return [p for (p,) in self._query("SELECT path FROM files")]

    # -- duplicates and failures ---------------------------------------------

    def duplicates(self) -> dict[str, tuple[str, int, int]]:
        """path -> (content hash, size, mtime_ns)."""
        rows = self._query("SELECT path, content_hash, size, mtime_ns FROM duplicates")
        return {p: (h, s, m) for p, h, s, m in rows}

    def failures(self) -> dict[str, str]:
        return dict(self._query("SELECT path, reason FROM failures ORDER BY path"))

    @staticmethod
    def record_failure(db: sqlite3.Connection, path: str, reason: str) -> None:
        db.execute(
            "INSERT INTO failures(path, reason, attempts, last_at) VALUES (?, ?, 1, ?) "
            "ON CONFLICT(path) DO UPDATE SET reason = excluded.reason, "
            "attempts = attempts + 1, last_at = excluded.last_at",
            (path, reason, time.time()),
        )

    def counts(self) -> dict[str, int]:
        ((tracks, windows, samples_s),) = self._query(
            "SELECT count(*), coalesce(sum(n_windows), 0), "
            "coalesce(sum(CAST(n_samples AS REAL) / sample_rate), 0) FROM tracks"
        )
        ((dups,),) = self._query("SELECT count(*) FROM duplicates")
        ((fails,),) = self._query("SELECT count(*) FROM failures")
        ((stored,),) = self._query("SELECT coalesce(sum(rows), 0) FROM segments")
        return {
            "tracks": tracks,
            "windows": windows,
            "seconds": samples_s,
            "duplicates": dups,
            "failures": fails,
            "stored_rows": stored,
        }
