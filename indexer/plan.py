"""Plan a run's ingest: per file, whether it is new, unchanged, touched, renamed or a copy.

Planning reads the catalog and the files and changes nothing; the store then
records the plan (:meth:`mert_indexer.indexer.store.IndexStore.apply`) and
embeds only ``todo``. A file whose path, size and mtime match the catalog is
not read at all; any other is hashed (streamed) and matched by content, so a
renamed or copied file is never embedded again.

Paths are taken in their stored form (:func:`canonical_path`: absolute), so a
plan does not depend on the current directory. Gone and unreadable are two
different things:

- *gone*: the path does not exist (``ENOENT``/``ENOTDIR``, and no dangling
  link is left there). Only gone paths are offered to ``--prune``, and only
  those under the run's input roots.
- *unreadable*: the path exists but cannot be read this time (permissions, an
  I/O error, a broken link, a vanished mount behind a link). Transient by
  definition: the store keeps what it indexed for it, the run reports it, the
  next run tries again (``IndexStore.record_failure(..., transient=True)``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mert_indexer.indexer.catalog import Catalog, TrackRow, canonical_path
from mert_indexer.indexer.hashing import content_hash


@dataclass(frozen=True)
class PendingFile:
    """A file to embed (or to record), as the plan saw it."""

    path: str
    content_hash: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class IngestPlan:
    """What a run has to do with each of its files; :func:`plan_ingest` makes it.

    ``refreshed``: same path, same content, new size/mtime record (touched);
    ``renamed``: (old path, the file now holding that content);
    ``duplicates``: (file, path that already holds the same content);
    ``gone``: catalogued paths under the run's roots, not listed and not on disk
    (what ``--prune`` removes);
    ``unreadable``: (path, reason) for listed files that could not be stat'ed or
    read, and catalogued paths under the roots that exist but cannot be reached.
    """

    todo: tuple[PendingFile, ...] = ()
    unchanged: tuple[str, ...] = ()
    refreshed: tuple[PendingFile, ...] = ()
    renamed: tuple[tuple[str, PendingFile], ...] = ()
    duplicates: tuple[tuple[PendingFile, str], ...] = ()
    gone: tuple[str, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()


@dataclass
class _Seen:
    """The first pass's verdicts: files that need no content matching, and those that do."""

    unchanged: list[str]
    refreshed: list[PendingFile]
    unreadable: list[tuple[str, str]]
    changed: list[PendingFile]
    content_left: set[str]  # catalogued paths whose content changed


def plan_ingest(
    catalog: Catalog,
    paths: Sequence[str | os.PathLike[str]],
    roots: Sequence[str | os.PathLike[str]] | None = None,
) -> IngestPlan:
    """Decide, per file, what a run has to do; changes nothing.

    ``roots``: the run's inputs (folders or files); only catalogued paths under
    them can be ``gone``. ``None``: every catalogued path is in scope.
    """
    order = list(dict.fromkeys(canonical_path(p) for p in paths))
    seen = _stat_and_hash(catalog, order)
    todo: list[PendingFile] = []
    renamed: list[tuple[str, PendingFile]] = []
    duplicates: list[tuple[PendingFile, str]] = []
    holder: dict[str, str] = {}  # content hash -> path that holds it after this plan
    moved_away: set[str] = set()
    for pending in seen.changed:
        h = pending.content_hash
        if h in holder:
            duplicates.append((pending, holder[h]))
            continue
        others = [
            t.path
            for t in catalog.tracks_by_hash(h)
            if t.path != pending.path and t.path not in moved_away
        ]
        still_there = [p for p in others if p not in seen.content_left and os.path.exists(p)]
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
    in_scope = _under(roots)
    gone: list[str] = []
    for p in catalog.all_paths():
        if p in listed or p in moved_away or not in_scope(p):
            continue
        reason = _absence(p)
        if reason == "":
            gone.append(p)
        elif reason is not None:
            seen.unreadable.append((p, reason))
    return IngestPlan(
        todo=tuple(todo),
        unchanged=tuple(seen.unchanged),
        refreshed=tuple(seen.refreshed),
        renamed=tuple(renamed),
        duplicates=tuple(duplicates),
        gone=tuple(gone),
        unreadable=tuple(seen.unreadable),
    )


def _under(roots: Sequence[str | os.PathLike[str]] | None) -> Callable[[str], bool]:
    """Whether a stored path lies under one of ``roots`` (or is one of them)."""
    if roots is None:
        return lambda _path: True
    prefixes = [canonical_path(r) for r in roots]

    def under(path: str) -> bool:
        return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in prefixes)

    return under


def _absence(path: str) -> str | None:
    """``None``: the path is there; ``""``: it is gone; else why it cannot be reached."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.lexists(path):
            return "broken symbolic link (its target is missing)"
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _stat_and_hash(catalog: Catalog, order: list[str]) -> _Seen:
    """Stat every file; hash those whose path, size or mtime the catalog does not match."""
    dups = catalog.duplicates()
    seen = _Seen([], [], [], [], set())
    for path in order:
        track: TrackRow | None = None
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                seen.unreadable.append((path, "not a regular file"))
                continue
            track = catalog.track_by_path(path)
            known = (track.content_hash, track.size, track.mtime_ns) if track else dups.get(path)
            if known is not None and known[1:] == (st.st_size, st.st_mtime_ns):
                seen.unchanged.append(path)
                continue
            pending = PendingFile(path, content_hash(path), st.st_size, st.st_mtime_ns)
        except OSError as exc:
            seen.unreadable.append((path, exc.strerror or str(exc)))
            continue
        if known is not None and known[0] == pending.content_hash:
            seen.refreshed.append(pending)
            continue
        if track is not None:
            seen.content_left.add(path)
        seen.changed.append(pending)
    return seen
