"""Catalog schema 1 -> 2: relative paths made absolute, checked against the files first."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mert_indexer.errors import StoreError
from mert_indexer.indexer.catalog import SCHEMA_VERSION, Catalog, canonical_path

log = logging.getLogger(__name__)


def migrate_paths(catalog: Catalog, base: Path) -> None:
    """Schema 1 -> 2: make the catalog's relative paths absolute against ``base``.

    Schema 1 stored paths as the run was given them; a relative one means
    nothing without the folder that run started in, which the catalog does
    not know. So ``base`` is checked first: every relative track or duplicate
    whose file exists under ``base`` must have its recorded size and mtime, and
    at least one must exist. Otherwise nothing is changed and the store is
    refused with the fix (run once from the right folder). One transaction:
    the migration happens whole or not.
    """
    relative = catalog.relative_paths()
    moves: dict[str, dict[str, str]] = {}
    checked = found = 0
    mismatched: list[str] = []
    for table, rows in relative.items():
        moves[table] = {}
        for path, size, mtime_ns in rows:
            new = canonical_path(os.path.join(base, path))
            moves[table][path] = new
            if size is None:
                continue
            checked += 1
            try:
                st = os.stat(new)
            except OSError:
                continue
            found += 1
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                mismatched.append(path)
    if checked and (mismatched or not found):
        rows = relative["tracks"] + relative["duplicates"]
        example = mismatched[0] if mismatched else (rows[0][0] if rows else "?")
        raise StoreError(
            f"{catalog.path}: catalog schema 1 stores {checked} paths relative to the folder "
            f"its runs started in, and they do not name the recorded files from {base} (e.g. "
            f"{example!r}); run once from that folder to migrate the store to absolute paths"
        )
    with catalog.transaction() as tx:
        for table, table_moves in moves.items():
            tx.rewrite_paths(table, table_moves)
        tx.set_meta("schema_version", SCHEMA_VERSION)
        tx.set_meta("paths_migrated_against", str(base))
    log.info("%s: migrated %d relative paths against %s", catalog.path, checked, base)
