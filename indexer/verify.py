"""Check a store: catalog vs segments vs the live index generation.

What ``indexer-admin verify`` runs, and what the fault-injection tests run
after every injected crash. Reads only (one read transaction, memory-mapped
segments); every inconsistency is one line naming what is wrong and where.

- catalog vs segments: each segment's files hold at least the rows the
  catalog counts (more is a crash's unrecorded tail: a note, cut at the next
  write); each track's rows lie inside its segment's committed rows, no two
  tracks share a row; window starts increase and lie within the track; every
  vector is finite; each duplicate's content is held by a track; a path has
  one role (indexed, duplicate or failed).
- catalog vs index: the live generation names the same tracks, with the same
  paths and window counts at the same rows, and its FAISS ids fit its vectors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mert_indexer.errors import StoreError
from mert_indexer.indexer.catalog import Catalog
from mert_indexer.indexer.generation import INDEX_DIR, read_current, read_generation
from mert_indexer.indexer.segments import (
    SEGMENTS_DIR,
    START_DTYPE,
    VECTOR_DTYPE,
    starts_path,
    vectors_path,
)
from mert_indexer.indexer.store import CATALOG_FILE, IndexStore, StoreSnapshot


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(index_dir: str | Path, *, check_index: bool = True) -> Report:
    """Every inconsistency of the store at ``index_dir`` (empty ``problems``: sound)."""
    root = Path(index_dir)
    report = Report()
    try:
        store = IndexStore.open(root, None, create=False)
    except StoreError as exc:
        if _unfinished_creation(root):
            report.notes.append(
                "the store's creation did not finish (no model identity recorded, nothing "
                "stored); the next writer completes it"
            )
        else:
            report.problems.append(f"cannot open the store: {exc}")
        return report
    with store, store.snapshot() as snap:
        window_seconds = int(store.identity["window_samples"]) / int(store.identity["sample_rate"])
        _segments(root, store.dim, snap, report)
        _tracks(snap, window_seconds, report)
        _entries(snap, report)
        if check_index:
            _index(root, store.identity, snap, report)
        windows = sum(t.n_windows for t in snap.tracks)
        report.summary = (
            f"{len(snap.tracks)} tracks, {windows} windows, {len(snap.duplicates)} duplicates, "
            f"{len(snap.failures)} failures, {len(snap.reader.rows)} segments"
        )
    return report


def _unfinished_creation(root: Path) -> bool:
    """A catalog made but killed before its first transaction recorded the identity."""
    try:
        catalog = Catalog(root / CATALOG_FILE, read_only=True)
    except StoreError:
        return False
    try:
        return catalog.get_meta("identity") is None and not catalog.counts()["stored_rows"]
    except StoreError:
        return False
    finally:
        catalog.close()


def _segments(root: Path, dim: int, snap: StoreSnapshot, report: Report) -> None:
    seg_root = root / SEGMENTS_DIR
    for seg, rows in snap.reader.rows.items():
        for path, row_bytes in (
            (vectors_path(seg_root, seg), dim * VECTOR_DTYPE.itemsize),
            (starts_path(seg_root, seg), START_DTYPE.itemsize),
        ):
            need = rows * row_bytes
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < need:
                report.problems.append(
                    f"{path.name}: {size} bytes, the catalog counts {rows} rows ({need} bytes)"
                )
            elif size > need:
                report.notes.append(
                    f"{path.name}: {size - need} bytes past the committed rows "
                    "(an interrupted write; cut when the store is next opened for writing)"
                )


def _tracks(snap: StoreSnapshot, window_seconds: float, report: Report) -> None:
    by_segment: dict[int, list[tuple[int, int, str]]] = {}
    for t in snap.tracks:
        name = f"track {t.id} ({t.path})"
        rows = snap.reader.rows.get(t.segment)
        if rows is None:
            report.problems.append(f"{name}: in segment {t.segment}, which the catalog lacks")
            continue
        if t.n_windows < 1 or t.first_row < 0 or t.first_row + t.n_windows > rows:
            report.problems.append(
                f"{name}: rows {t.first_row}..{t.first_row + t.n_windows} outside segment "
                f"{t.segment}'s {rows} committed rows"
            )
            continue
        by_segment.setdefault(t.segment, []).append((t.first_row, t.n_windows, name))
        try:
            starts = np.asarray(
                snap.reader.starts(t.segment)[t.first_row : t.first_row + t.n_windows]
            )
            vectors = snap.reader.vectors(t.segment)[t.first_row : t.first_row + t.n_windows]
        except StoreError:
            continue  # the segment's size is reported above
        window = round(window_seconds * t.sample_rate)
        if starts[0] < 0 or np.any(np.diff(starts) <= 0):
            report.problems.append(f"{name}: window starts not increasing from 0 or later")
        elif starts[-1] + window > t.n_samples and not (len(starts) == 1 and starts[0] == 0):
            report.problems.append(
                f"{name}: window at {int(starts[-1])} runs past the track's end ({t.n_samples})"
            )
        if not np.isfinite(np.asarray(vectors, np.float32)).all():
            report.problems.append(f"{name}: vectors with NaN or Inf")
    for seg, runs in by_segment.items():
        runs.sort()
        for (first, n, name), (next_first, _, next_name) in itertools.pairwise(runs):
            if first + n > next_first:
                report.problems.append(
                    f"segment {seg}: {name} and {next_name} share rows from {next_first}"
                )


def _entries(snap: StoreSnapshot, report: Report) -> None:
    held = {t.content_hash for t in snap.tracks}
    indexed = {t.path for t in snap.tracks}
    for path, (content, _, _) in sorted(snap.duplicates.items()):
        if content not in held:
            report.problems.append(f"duplicate {path}: no track holds its content {content}")
        if path in indexed:
            report.problems.append(f"{path}: both a track and a duplicate")
    for path in sorted(snap.failures):
        if path in indexed or path in snap.duplicates:
            report.problems.append(f"{path}: recorded as failed and as indexed")


def _index(root: Path, identity: dict, snap: StoreSnapshot, report: Report) -> None:
    index_root = root / INDEX_DIR
    try:
        generation = read_current(index_root)
        if generation is None:
            report.notes.append("no index built (indexer-client without --no-build builds one)")
            return
        gen = read_generation(index_root / generation)
    except (StoreError, FileNotFoundError) as exc:
        report.problems.append(f"index: unreadable live generation: {exc}")
        return
    where = f"index generation {generation}"
    if gen.info.get("identity") != identity:
        report.problems.append(f"{where}: built for another model identity than the store's")
    ntotal = int(gen.index.index.ntotal)
    if ntotal != int(gen.info.get("n_vectors", -1)):
        report.problems.append(
            f"{where}: FAISS holds {ntotal} vectors, info.json says {gen.info.get('n_vectors')}"
        )
    tracks = {t.id: t for t in snap.tracks}
    if len(gen.paths) != len(gen.runs):
        report.problems.append(f"{where}: {len(gen.runs)} runs but {len(gen.paths)} track paths")
        return
    seen: set[int] = set()
    spans = sorted((int(r[0]), int(r[3]), p) for r, p in zip(gen.runs, gen.paths, strict=True))
    for (first, n, path), (next_first, _, next_path) in itertools.pairwise(spans):
        if first + n > next_first:
            report.problems.append(
                f"{where}: {path} and {next_path} share FAISS ids from {next_first}"
            )
    if sum(n for _, n, _ in spans) > ntotal:
        report.problems.append(
            f"{where}: its tracks have {sum(n for _, n, _ in spans)} windows, FAISS holds {ntotal}"
        )
    for (_first_id, segment, first_row, n_windows, track_id), path in zip(
        gen.runs.tolist(), gen.paths, strict=True
    ):
        t = tracks.get(track_id)
        seen.add(track_id)
        if t is None:
            report.problems.append(
                f"{where}: names track {track_id} ({path}), which the catalog no longer holds "
                "(index out of date: rebuild)"
            )
        elif (t.path, t.segment, t.first_row, t.n_windows) != (
            path,
            segment,
            first_row,
            n_windows,
        ):
            report.problems.append(
                f"{where}: track {track_id} is {path} at segment {segment} rows {first_row}+"
                f"{n_windows}; the catalog has {t.path} at segment {t.segment} rows "
                f"{t.first_row}+{t.n_windows}"
            )
    # Tombstones: tracks a remove took out of the index whose catalog COMMIT did
    # not happen; kept out by design (``build.py``), so not an inconsistency.
    tombstones = {int(i) for i in gen.info.get("tombstones", [])}
    kept_out = [t for t in snap.tracks if t.id not in seen and t.id in tombstones]
    if kept_out:
        report.notes.append(
            f"{where}: keeps {len(kept_out)} catalogued tracks out of search (an interrupted "
            f"remove, e.g. {kept_out[0].path}); remove them again to forget them"
        )
    missing = [t for t in snap.tracks if t.id not in seen and t.id not in tombstones]
    if missing:
        report.problems.append(
            f"{where}: lacks {len(missing)} committed tracks (e.g. {missing[0].path}); "
            "index out of date: rebuild"
        )
