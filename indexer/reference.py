"""A catalogue's calibration reference: another store's windows, music the catalogue does not hold.

How near un-indexed music comes to a catalogue cannot be read off the
catalogue alone when it holds one track (or few): that depends on music it
does not hold. A *reference* is such music, embedded into a store of its own
by the same model at the same hop (``indexer-client --input OTHER_MUSIC
--index REF``). A catalogue records the reference's folder in its catalog
meta (``calibration_reference``: ``indexer-client --calibrate-with REF``),
and every build of its index then reads the reference's committed windows,
read-only and as of one read transaction, and calibrates the no-match floor
and thresholds against them too (:func:`mert_indexer.indexer.calibration.calibrate`).
The reference is never searched: it only says what chance looks like.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mert_indexer.errors import StoreError
from mert_indexer.indexer.catalog import (
    CATALOG_FILE,
    Catalog,
    existing_catalog,
    identity_differences,
)
from mert_indexer.indexer.layout import TrackRun, track_runs
from mert_indexer.indexer.segments import SEGMENTS_DIR, SegmentReader

REFERENCE_META = "calibration_reference"  # catalog meta key: the reference's folder, or absent
NO_REFERENCE = "none"  # what --calibrate-with takes to forget the reference


@dataclass(frozen=True)
class Reference:
    """A reference store's committed windows, as the calibration reads them."""

    index: str  # its folder, as the catalogue records it
    runs: list[TrackRun]
    reader: SegmentReader

    @property
    def windows(self) -> int:
        return sum(r.n_windows for r in self.runs)

    def describe(self) -> dict[str, Any]:
        """What an index's parameters say it was calibrated against."""
        return {"index": self.index, "tracks": len(self.runs), "windows": self.windows}


@contextlib.contextmanager
def open_reference(
    index_dir: str | Path, identity: dict[str, Any], catalogue_root: Path
) -> Iterator[Reference]:
    """The committed windows of the store at ``index_dir``, checked against the catalogue's.

    Raises :class:`StoreError` naming the folder when it is no store, is the
    catalogue's own, holds no windows, or was embedded by another model or at
    another hop than ``identity`` says.
    """
    root = Path(os.path.abspath(index_dir))
    role = "the calibration reference"
    what = f"{root}: {role}"
    catalog_file = existing_catalog(root, role)
    own = catalogue_root / CATALOG_FILE
    if own.exists() and os.path.samefile(catalog_file, own):
        raise StoreError(
            f"{what} is the catalogue itself: give an index of music the catalogue does not hold"
        )
    catalog = Catalog(catalog_file, read_only=True)
    try:
        with catalog.snapshot() as snap:
            stored = snap.get_meta("identity") or {}
            diffs = identity_differences(stored, identity)
            if diffs:
                raise StoreError(
                    f"{what} was embedded by another model or at another hop "
                    f"({'; '.join(diffs)}): index it again with the catalogue's model "
                    "and --hop-seconds"
                )
            runs = track_runs(snap.tracks())
            if not any(r.n_windows for r in runs):
                raise StoreError(f"{what} holds no windows: index music into it first")
            reader = SegmentReader(
                root / SEGMENTS_DIR, int(identity["embedding_dim"]), snap.segment_rows()
            )
            try:
                yield Reference(str(root), runs, reader)
            finally:
                reader.close()
    finally:
        catalog.close()
