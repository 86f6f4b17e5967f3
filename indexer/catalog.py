"""The SQLite catalog: which files are indexed, where their vectors lie, what failed.

Over the ~400-line norm by design: every SQL statement of the project lives
in this one module.

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

Paths are absolute and lexically normalised (``os.path.abspath``; symlinks are
not resolved, see :func:`canonical_path`) since schema 2. A schema-1 catalog
(paths as the run was given them, often relative) is migrated in place when
it is opened for writing: :meth:`Catalog.migrate_paths`.

All SQL of the project lives in this module: :class:`Catalog` reads, and
:class:`Transaction` (what :meth:`Catalog.transaction` yields) writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mert_indexer.errors import StoreError
from mert_indexer.indexer import faults

CATALOG_FILE = "catalog.sqlite"  # in the store's folder
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # schema 1 differs only in its paths, which readers take as stored


def existing_catalog(root: Path, role: str = "") -> Path:
    """The catalog file of the store at ``root``; :class:`StoreError` naming ``root`` if absent.

    ``role`` says what the folder was given as, e.g. "the calibration reference".
    """
    path = root / CATALOG_FILE
    if not path.exists():
        raise StoreError(
            f"{root}: {role + ' is ' if role else ''}no index store here ({CATALOG_FILE} missing)"
        )
    return path


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


def identity_differences(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Human-readable ``field: stored != given`` for every differing field of a model identity."""
    return [
        f"{key}: {stored.get(key, '<absent>')!r} != {given.get(key, '<absent>')!r}"
        for key in sorted(set(stored) | set(given))
        if stored.get(key) != given.get(key)
    ]


def canonical_path(path: str | os.PathLike[str]) -> str:
    """The form the catalog stores a path in: absolute, lexically normalised.

    Symlinks are not resolved: a track is named as the user's inputs name it
    (a link into a mounted volume keeps its name when the volume moves, two
    links to one file are two paths with one content), and a path that cannot
    be resolved this time (an unmounted drive) still has its one stored form.
    """
    return os.path.abspath(os.fspath(path))


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
    """Typed read access to ``catalog.sqlite``, and its transactions.

    One writer; not thread-safe (one connection).
    """

    def __init__(self, path: Path, *, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        try:
            if read_only:
                # A URI: the path is percent-encoded, or '#', '?' and '%' in it break it.
                uri = f"file:{urllib.parse.quote(str(Path(path).absolute()))}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
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
    def transaction(self) -> Iterator[Transaction]:
        """All or nothing; ``sqlite3.Error`` (disk full, ...) becomes :class:`StoreError`.

        An exception that surfaces after COMMIT returned (Ctrl-C lands while
        SQLite commits, and Python raises it on return) propagates although the
        transaction is committed: a caller that undoes work after a failure
        must ask the catalog what is committed (see ``IndexStore.commit``).
        """
        faults.point("catalog.begin")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot start a transaction: {exc}") from exc
        try:
            yield Transaction(self._db)
            faults.point("catalog.commit")
            self._db.execute("COMMIT")
            faults.point("catalog.committed")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(
                    f"{self.path}: catalog write failed, nothing recorded: {exc}"
                ) from exc
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Catalog]:
        """One read transaction: every read in the block sees the same committed state.

        In WAL mode a reader's snapshot is fixed at its first read and holds
        however long the block runs; writers go on meanwhile. With the segment
        row counts read inside the block, the rows they name are immutable
        (segments only grow past committed rows), so the block reads a whole,
        consistent store.
        """
        try:
            self._db.execute("BEGIN DEFERRED")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot start a read transaction: {exc}") from exc
        try:
            yield self
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: catalog read failed: {exc}") from exc

    # -- reading -------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def segment_rows(self) -> dict[int, int]:
        """Committed row count of every segment."""
        return dict(self._query("SELECT id, rows FROM segments ORDER BY id"))

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

    def status(self, path: str) -> tuple[str, str | None] | None:
        """(status, content hash) of ``path``: indexed, duplicate or failed; ``None`` if unknown."""
        rows = self._query("SELECT status, content_hash FROM files WHERE path = ?", (path,))
        return (rows[0][0], rows[0][1]) if rows else None

    def all_paths(self) -> list[str]:
        """Every path the catalog knows: indexed, duplicate or failed."""
        return [p for (p,) in self._query("SELECT path FROM files")]

    def duplicates(self) -> dict[str, tuple[str, int, int]]:
        """path -> (content hash, size, mtime_ns)."""
        rows = self._query("SELECT path, content_hash, size, mtime_ns FROM duplicates")
        return {p: (h, s, m) for p, h, s, m in rows}

    def failures(self) -> dict[str, str]:
        return dict(self._query("SELECT path, reason FROM failures ORDER BY path"))

    def relative_paths(self) -> dict[str, list[tuple[str, int | None, int | None]]]:
        """table -> (path, size, mtime_ns) of every row whose path is not absolute (schema 1)."""
        out: dict[str, list[tuple[str, int | None, int | None]]] = {}
        for table, columns in (
            ("tracks", "path, size, mtime_ns"),
            ("duplicates", "path, size, mtime_ns"),
            ("failures", "path, NULL, NULL"),
        ):
            rows = self._query(f"SELECT {columns} FROM {table} WHERE substr(path, 1, 1) != '/'")
            out[table] = [(p, s, m) for p, s, m in rows if not os.path.isabs(p)]
        return out

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


class Transaction:
    """The writes of one catalog transaction (see :meth:`Catalog.transaction`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value, sort_keys=True)),
        )

    def set_segment_rows(self, segment: int, rows: int) -> None:
        self._db.execute(
            "INSERT INTO segments(id, rows) VALUES (?, ?) "
            "ON CONFLICT(id) DO UPDATE SET rows = excluded.rows",
            (segment, rows),
        )

    def insert_track(self, t: TrackRow) -> int:
        """Record a track (``t.id`` is ignored: ids are assigned here); returns its id."""
        cur = self._db.execute(
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
        return int(cur.lastrowid or 0)

    def record_failure(self, path: str, reason: str) -> None:
        self._db.execute(
            "INSERT INTO failures(path, reason, attempts, last_at) VALUES (?, ?, 1, ?) "
            "ON CONFLICT(path) DO UPDATE SET reason = excluded.reason, "
            "attempts = attempts + 1, last_at = excluded.last_at",
            (path, reason, time.time()),
        )

    def add_duplicate(self, path: str, content_hash: str, size: int, mtime_ns: int) -> None:
        self._db.execute(
            "INSERT INTO duplicates(path, content_hash, size, mtime_ns) VALUES (?, ?, ?, ?)",
            (path, content_hash, size, mtime_ns),
        )

    def refresh_stat(self, path: str, content_hash: str, size: int, mtime_ns: int) -> None:
        """New size/mtime for ``path`` where it is recorded with that content."""
        for table in ("tracks", "duplicates"):
            self._db.execute(
                f"UPDATE {table} SET size = ?, mtime_ns = ? WHERE path = ? AND content_hash = ?",
                (size, mtime_ns, path, content_hash),
            )

    def move_tracks(
        self, moves: Iterable[tuple[str, str, str, int, int]], on_disk: Callable[[str], bool]
    ) -> None:
        """Give tracks new paths: ``(old path, content hash, new path, size, mtime_ns)`` each.

        Every moving track is parked first, so renames may chain (a -> b, b -> c)
        and swap. Whatever the catalog held at a new path is cleared first (see
        :meth:`clear_path`). Raises :class:`StoreError` for a stale move.
        """
        parked: list[tuple[int, str, int, int]] = []
        for old, content_hash, new, size, mtime_ns in moves:
            row = self._db.execute(
                "SELECT id FROM tracks WHERE path = ? AND content_hash = ?", (old, content_hash)
            ).fetchone()
            if row is None:
                raise StoreError(f"{old}: stale plan: no longer catalogued with that content")
            self._db.execute(
                "UPDATE tracks SET path = ? WHERE id = ?", (f"\0moving:{row[0]}", row[0])
            )
            parked.append((row[0], new, size, mtime_ns))
        for track_id, new, size, mtime_ns in parked:
            self.clear_path(new, on_disk)
            self._db.execute(
                "UPDATE tracks SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                (new, size, mtime_ns, track_id),
            )

    def rewrite_paths(self, table: str, moves: dict[str, str]) -> None:
        """Give rows of ``table`` new paths (schema migration); a row whose new path is
        already taken in that table is dropped (both named the same file)."""
        assert table in ("tracks", "duplicates", "failures")
        for old, new in moves.items():
            taken = self._db.execute(f"SELECT 1 FROM {table} WHERE path = ?", (new,)).fetchone()
            if taken:
                self._db.execute(f"DELETE FROM {table} WHERE path = ?", (old,))
            else:
                self._db.execute(f"UPDATE {table} SET path = ? WHERE path = ?", (new, old))

    def move_track_rows(self, track_id: int, segment: int, first_row: int) -> None:
        """Point a track at a copy of its rows elsewhere (compaction: same vectors, new place)."""
        cur = self._db.execute(
            "UPDATE tracks SET segment = ?, first_row = ? WHERE id = ?",
            (segment, first_row, track_id),
        )
        if cur.rowcount != 1:
            raise StoreError(f"track {track_id}: not in the catalog, cannot move its rows")

    def drop_segment(self, segment: int) -> None:
        """Forget a segment no track uses any more (compaction); its files go when next opened.

        Raises :class:`StoreError` (a foreign-key failure) while a track still uses it.
        """
        self._db.execute("DELETE FROM segments WHERE id = ?", (segment,))

    def clear_path(
        self, path: str, on_disk: Callable[[str], bool], doomed: frozenset[str] = frozenset()
    ) -> int:
        """Forget what the catalog holds at ``path``: its content is replaced or gone.

        A track whose content survives as a recorded duplicate that is still on
        disk (``on_disk``) and not in ``doomed`` is handed over to it instead of
        being dropped, so that content stays searchable. When no track holds
        the content any more, its remaining duplicates are forgotten too: a
        duplicate never points at nothing, and such a file, if it is still
        there, is embedded by the next run. Returns the entries removed.
        """
        removed = 0
        row = self._db.execute(
            "SELECT id, content_hash FROM tracks WHERE path = ?", (path,)
        ).fetchone()
        if row is not None:
            heirs = self._db.execute(
                "SELECT path, size, mtime_ns FROM duplicates WHERE content_hash = ? AND path != ? "
                "ORDER BY path",
                (row[1], path),
            ).fetchall()
            heir = next((h for h in heirs if h[0] not in doomed and on_disk(h[0])), None)
            if heir is None:
                self._db.execute("DELETE FROM tracks WHERE id = ?", (row[0],))
                removed += self._db.execute(
                    "DELETE FROM duplicates WHERE content_hash = ? AND path != ? AND NOT EXISTS "
                    "(SELECT 1 FROM tracks WHERE content_hash = ?)",
                    (row[1], path, row[1]),
                ).rowcount
            else:
                self._db.execute("DELETE FROM duplicates WHERE path = ?", (heir[0],))
                self._db.execute(
                    "UPDATE tracks SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                    (*heir, row[0]),
                )
            removed += 1
        for table in ("duplicates", "failures"):
            removed += self._db.execute(f"DELETE FROM {table} WHERE path = ?", (path,)).rowcount
        return removed
