"""Merge stores built separately (shards) into one, refusing mixed models.

The destination mirrors its sources: after a merge it holds exactly what one
run over all the sources' files would hold, every (track, window) once, and
nothing else. Content indexed in two shards under two paths is kept once and
the later path recorded as its duplicate, as a single run records it; a path
present in two sources with the same content is taken once.

Incremental and re-runnable: a merge into an existing destination copies only
tracks it lacks, replaces a track whose content changed in its source, and
removes what no source holds any more (a track pruned in a shard). Each source
is read from one read transaction (:meth:`IndexStore.snapshot`), so a shard
still being written is copied as of one commit, never half of one. Vectors are
copied segment by segment in commits of bounded size, so a merge never holds a
shard in memory; only live rows are copied, which makes
``merge_stores([store], new_dir)`` a compaction. An interrupted merge leaves
a destination that the next merge completes. The sources' calibration
reference (:mod:`mert_indexer.indexer.reference`) is carried over, so the
merged index's no-match threshold is measured as each shard's was.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.errors import ModelMismatchError, StoreError
from mert_indexer.indexer import faults
from mert_indexer.indexer.catalog import TrackRow
from mert_indexer.indexer.kinds import IndexOptions
from mert_indexer.indexer.plan import IngestPlan, PendingFile
from mert_indexer.indexer.reference import NO_REFERENCE, open_reference
from mert_indexer.indexer.store import IndexStore, StoreSnapshot, identity_differences

log = logging.getLogger(__name__)

COMMIT_WINDOWS = 50_000  # ~77 MB of float16 vectors at D = 768 between commits


def merge_stores(
    sources: Sequence[str | Path],
    dest: str | Path,
    *,
    build: bool = True,
    kind: str = "auto",
    options: IndexOptions | None = None,
    progress: bool = False,
    calibrate_with: str | Path | None = None,
) -> dict[str, Any]:
    """Make ``dest`` (made if absent) mirror the source stores, and build its index.

    ``calibrate_with``: the calibration reference ``dest`` records (a store's
    folder, or ``"none"`` to forget it), as ``indexer-client --calibrate-with``;
    by default the sources' own is carried over (:func:`_carry_reference`).
    Raises :class:`ModelMismatchError` when the sources (or an existing
    ``dest``) were built by different models, naming the store and the fields,
    and :class:`StoreError` for a ``calibrate_with`` that cannot serve, before
    ``dest`` is touched.
    """
    if not sources:
        raise StoreError("merge: no source stores given")
    dest = Path(dest)
    if any(Path(s).resolve() == dest.resolve() for s in sources):
        raise StoreError(f"{dest}: the destination is also a source")
    stores: list[IndexStore] = []
    with contextlib.ExitStack() as stack:
        for src in sources:
            stores.append(stack.enter_context(IndexStore.open(src, None, create=False)))
        first = stores[0]
        for other in stores[1:]:
            diffs = identity_differences(first.identity, other.identity)
            if diffs:
                raise ModelMismatchError(
                    f"{other.root}: built by another model than {first.root} ({'; '.join(diffs)})"
                )
        explicit = None if calibrate_with in (None, NO_REFERENCE) else calibrate_with
        if explicit is not None:  # checked before dest is made or changed
            with open_reference(explicit, first.identity, dest.resolve()):
                pass
        snaps = [(s.root, stack.enter_context(s.snapshot())) for s in stores]
        wanted = _wanted(snaps)
        with IndexStore.open(dest, first.identity, create=True) as out:
            if calibrate_with is None:
                _carry_reference(stores, out)
            else:
                out.set_calibration_reference(explicit)
            counts = _sync(wanted, out)
            counts["sources"] = len(stores)
            counts["calibration_reference"] = out.calibration_reference()
            counts["index"] = (
                out.build_index(kind=kind, options=options, progress=progress) if build else None
            )
            counts["stats"] = {
                k: v for k, v in out.stats().items() if k not in ("identity", "index")
            }
    counts["dest"] = str(dest)
    return counts


def _carry_reference(stores: list[IndexStore], out: IndexStore) -> None:
    """Record the sources' calibration reference on ``out``.

    Shards of one catalogue are calibrated against one reference
    (``indexer-client --calibrate-with``), and so is their merge. Sources that
    record none leave the destination's own setting alone; sources that record
    different ones, or a reference that cannot serve the destination (gone,
    another model, the destination itself), leave it too, with a warning: the
    merge goes through, and ``--calibrate-with`` on the destination decides.
    """
    recorded = sorted({r for s in stores if (r := s.calibration_reference()) is not None})
    if len(recorded) > 1:
        log.warning(
            "merge: the sources are calibrated against different references (%s); %s keeps "
            "its own (choose one with indexer-merge --calibrate-with)",
            ", ".join(recorded),
            out.root,
        )
    elif recorded:
        try:
            out.set_calibration_reference(recorded[0])
        except StoreError as exc:
            log.warning("merge: the sources' reference is not carried to %s: %s", out.root, exc)


@dataclass
class _Wanted:
    """What the destination must hold: the union of the sources' snapshots."""

    tracks: dict[str, tuple[StoreSnapshot, TrackRow]] = field(default_factory=dict)
    duplicates: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)  # content hash -> path of its track
    dangling: int = 0


def _wanted(snaps: list[tuple[Path, StoreSnapshot]]) -> _Wanted:
    w = _Wanted()
    for root, snap in snaps:
        for t in snap.tracks:
            if not os.path.isabs(t.path):
                raise StoreError(
                    f"{root}: catalog schema 1 with relative paths ({t.path!r}); open it for "
                    "writing once from the folder it was built in (an indexer-client run) to "
                    "migrate it to absolute paths, then merge"
                )
            taken = w.tracks.get(t.path)
            if taken is not None:
                if taken[1].content_hash != t.content_hash:
                    raise StoreError(
                        f"{t.path}: indexed with different content in {root} and in an earlier "
                        "source; which one is current cannot be told"
                    )
                continue
            if t.content_hash in w.holder:
                w.duplicates.setdefault(t.path, (t.content_hash, t.size, t.mtime_ns))
                continue
            w.tracks[t.path] = (snap, t)
            w.holder[t.content_hash] = t.path
    for _, snap in snaps:
        for path, (content, size, mtime_ns) in snap.duplicates.items():
            if path in w.tracks:
                continue
            if content not in w.holder:
                w.dangling += 1  # a copy whose original no source holds: never embedded
                continue
            w.duplicates.setdefault(path, (content, size, mtime_ns))
    for _, snap in snaps:
        for path, reason in snap.failures.items():
            if path not in w.tracks and path not in w.duplicates:
                w.failures.setdefault(path, reason)
    return w


def _sync(w: _Wanted, out: IndexStore) -> dict[str, Any]:
    have = {t.path: t for t in out.tracks()}
    kept = {
        p
        for p, t in have.items()
        if p in w.tracks
        and (w.tracks[p][1].content_hash, w.tracks[p][1].n_windows) == (t.content_hash, t.n_windows)
    }
    have_dups, have_failures = out.duplicates(), out.failures()
    stale = [p for p in have if p not in kept]
    stale += [p for p, d in have_dups.items() if w.duplicates.get(p, ("",))[0] != d[0]]
    stale += [p for p, r in have_failures.items() if w.failures.get(p) != r]
    faults.point("merge.prune")
    removed = out.prune(stale, hand_over=False)

    added = 0
    for path, (snap, t) in w.tracks.items():
        if path in kept:
            continue
        rows = slice(t.first_row, t.first_row + t.n_windows)
        faults.point("merge.copy")
        out.add_track(
            PendingFile(path, t.content_hash, t.size, t.mtime_ns),
            n_samples=t.n_samples,
            sample_rate=t.sample_rate,
            starts=np.array(snap.reader.starts(t.segment)[rows]),
            embeddings=np.array(snap.reader.vectors(t.segment)[rows]),
        )
        added += 1
        if out.pending_windows >= COMMIT_WINDOWS:
            faults.point("merge.commit")
            out.commit()
    faults.point("merge.commit")
    out.commit()

    have_dups = out.duplicates()
    dups = tuple(
        (PendingFile(p, h, size, mtime_ns), w.holder[h])
        for p, (h, size, mtime_ns) in w.duplicates.items()
        if have_dups.get(p, ("",))[0] != h
    )
    out.apply(IngestPlan(duplicates=dups))
    have_failures = out.failures()
    failed = 0
    for path, reason in w.failures.items():
        if have_failures.get(path) != reason:
            out.record_failure(path, reason)
            failed += 1
    faults.point("merge.commit")
    out.commit()
    if w.dangling:
        log.warning("%d duplicates in the sources point at content no source holds", w.dangling)
    return {
        "tracks_added": added,
        "tracks_already_present": len(kept),
        "entries_removed": removed,
        "duplicates": len(dups),
        "failures": failed,
    }
