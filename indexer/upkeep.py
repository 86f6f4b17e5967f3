"""Keeping a store's FAISS index in step with its catalog: build, remove, compact.

The index half of :class:`mert_indexer.indexer.store.IndexStore`, kept apart
from the durable half (open, lock, the two-phase commit) that store.py owns:
:class:`IndexUpkeep` is mixed into the store and works on its catalog and
segments. Every step is crash-safe; the index generations it writes are
:mod:`mert_indexer.indexer.build`'s, the segment rewrite
:mod:`mert_indexer.indexer.compaction`'s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from mert_indexer.errors import StoreError
from mert_indexer.indexer import build, faults
from mert_indexer.indexer.catalog import Catalog, TrackRow
from mert_indexer.indexer.compaction import COMPACT_DEAD_FRACTION
from mert_indexer.indexer.generation import INDEX_DIR
from mert_indexer.indexer.kinds import IndexOptions
from mert_indexer.indexer.layout import track_runs
from mert_indexer.indexer.reference import REFERENCE_META, Reference, open_reference
from mert_indexer.indexer.segments import SEGMENTS_DIR, SegmentReader, SegmentWriter
from mert_indexer.progress import progress_bar

log = logging.getLogger(__name__)


class IndexUpkeep:
    """Build, remove and compact for :class:`~mert_indexer.indexer.store.IndexStore`."""

    # What the store provides (set in IndexStore.__init__).
    root: Path
    identity: dict[str, Any]
    dim: int
    _catalog: Catalog
    _writer: SegmentWriter | None
    _rows_per_segment: int
    _tracks: dict[str, Any]

    def _writable(self) -> None:
        raise NotImplementedError

    def tracks(self) -> list[TrackRow]:
        raise NotImplementedError

    def reader(self) -> SegmentReader:
        raise NotImplementedError

    # -- indexing ------------------------------------------------------------

    def build_index(
        self,
        *,
        kind: str = "auto",
        progress: bool = False,
        options: IndexOptions | None = None,
        rebuild: bool = False,
        compact: bool = True,
    ) -> dict[str, Any]:
        """Bring the FAISS index in step with every committed track; returns its info.

        Adds new tracks and drops gone ones without retraining, unless a
        retrain pays (:func:`mert_indexer.indexer.build.retrain_reason`) or
        ``rebuild`` asks for it. ``kind``: "auto" (exact up to
        ``IndexOptions.exact_max`` windows, else IVF-PQ; an IVF-PQ index stays
        IVF-PQ), "exact" or "ivfpq" (a kind other than the live one retrains).
        The new index replaces the old atomically; its info is recorded in the
        catalog. With ``compact``, segments are then compacted when dead rows
        exceed ``COMPACT_DEAD_FRACTION`` of the stored rows (:meth:`compact`).
        """
        self._writable()
        if self._tracks:
            log.warning(
                "%s: %d uncommitted tracks are left out of the index", self.root, len(self._tracks)
            )
        opts = options or IndexOptions()
        if kind != "auto":
            opts = replace(opts, kind=kind)
        reader = self.reader()
        try:
            info = self._build(
                self.tracks(), reader, options=opts, progress=progress, rebuild=rebuild
            )
        finally:
            reader.close()
        with self._catalog.transaction() as tx:
            tx.set_meta("index", {k: v for k, v in info.items() if k != "identity"})
        if compact:
            done = self.compact(min_dead_fraction=COMPACT_DEAD_FRACTION, progress=progress)
            info = done.get("index") or info
        return info

    # -- deleting and compacting ---------------------------------------------

    def remove(
        self,
        paths: Iterable[str] = (),
        ids: Iterable[int] = (),
        *,
        options: IndexOptions | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Take tracks out of the catalog and the index, by path and by catalog id, at once.

        The index generation without them is written and switched to inside the
        catalog transaction that forgets them, before its COMMIT: once this
        returns, no search loaded from then on can return them, and a crash in
        between cannot bring them back (the generation's tombstones keep them
        out while the catalog still lists them; :mod:`mert_indexer.indexer.build`).
        Nothing is retrained or added. As ``--prune`` does, a removed path whose
        content is also recorded as a duplicate at another existing path hands
        the track over to it; name both paths to drop the content. Their rows
        become dead space until a compaction. Returns what was removed and the
        names and ids the catalog does not know (``unknown_paths``, ``unknown_ids``).
        """
        from mert_indexer.indexer.generation import read_current

        self._writable()
        if self._tracks:
            raise StoreError(f"{self.root}: commit or drop the buffered tracks before removing")
        before = {t.id: t for t in self.tracks()}
        wanted = [self._stored_form(os.fspath(p)) for p in paths]
        unknown_ids = [i for i in ids if i not in before]
        wanted += [before[i].path for i in ids if i in before]
        targets = [p for p in dict.fromkeys(wanted) if self._catalog.status(p) is not None]
        unknown_paths = [p for p in dict.fromkeys(wanted) if p not in targets]
        index_root = self.root / INDEX_DIR
        info = None
        with self._catalog.transaction() as tx:
            doomed = frozenset(targets)
            entries = sum(tx.clear_path(p, os.path.exists, doomed) for p in targets)
            after = self._catalog.tracks()  # this transaction's view, not yet committed
            if read_current(index_root) is not None and len(after) < len(before):
                faults.point("remove.index")
                reader = SegmentReader(
                    self.root / SEGMENTS_DIR, self.dim, self._catalog.segment_rows()
                )
                info = self._rewrite_index(after, reader, options, progress)
                tx.set_meta("index", {k: v for k, v in info.items() if k != "identity"})
        gone = [before[i] for i in sorted(set(before) - {t.id for t in after})]
        return {
            "removed_entries": entries,
            "removed_tracks": [t.path for t in gone],
            "removed_windows": sum(t.n_windows for t in gone),
            "unknown_paths": unknown_paths,
            "unknown_ids": unknown_ids,
            "index": info,
        }

    def _stored_form(self, path: str) -> str:
        """``path`` as the catalog holds it: as given, else its absolute form if that is known."""
        if self._catalog.status(path) is None:
            absolute = os.path.abspath(path)
            if self._catalog.status(absolute) is not None:
                return absolute
        return path

    def compact(
        self,
        *,
        min_dead_fraction: float = 0.0,
        options: IndexOptions | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Rewrite the segments holding dead rows; every live vector keeps its bytes.

        Runs when dead rows exceed ``min_dead_fraction`` of the stored rows (0:
        whenever there are any). Crash-safe; the steps and why are in
        :mod:`mert_indexer.indexer.compaction`. The index keeps its ids and
        codes; only where its runs point changes. Returns what was done.
        """
        from mert_indexer.atomic import fsync_dir
        from mert_indexer.indexer.compaction import copy_rows, plan_compaction
        from mert_indexer.indexer.generation import read_current
        from mert_indexer.indexer.segments import segment_ids_on_disk

        self._writable()
        if self._tracks:
            raise StoreError(f"{self.root}: commit or drop the buffered tracks before compacting")
        assert self._writer is not None
        committed = self._catalog.segment_rows()
        tracks = self.tracks()
        plan = plan_compaction(tracks, committed)
        result: dict[str, Any] = {
            "compacted": False,
            "dead_rows": plan.dead_rows,
            "stored_rows": plan.stored_rows,
            "dead_fraction": round(plan.dead_fraction, 4),
            "segments_rewritten": 0,
            "rows_copied": 0,
            "index": None,
        }
        if not plan.dead_rows or plan.dead_fraction <= min_dead_fraction:
            return result
        seg_dir = self.root / SEGMENTS_DIR
        first = 1 + max(segment_ids_on_disk(seg_dir) | set(committed))
        bar = progress_bar(progress, plan.live_rows, "compacting")
        reader = self.reader()
        try:
            moves, new_rows = copy_rows(
                reader,
                self._writer,
                plan.tracks,
                first,
                self._rows_per_segment,
                on_rows=None if bar is None else bar.update,
            )
        except OSError as exc:
            for seg in range(first, first + len(committed) + 1):
                with contextlib.suppress(OSError):
                    self._writer.truncate(seg, 0)
            what = "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise StoreError(
                f"{exc.filename or seg_dir}: cannot write the compacted segments ({what}); "
                "nothing changed"
            ) from exc
        finally:
            reader.close()
            if bar is not None:
                bar.close()
        faults.point("compact.register")
        with self._catalog.transaction() as tx:
            for seg, rows in new_rows.items():
                tx.set_segment_rows(seg, rows)
        moved = [
            replace(t, segment=moves[t.id][0], first_row=moves[t.id][1]) if t.id in moves else t
            for t in tracks
        ]
        info = None
        index_root = self.root / INDEX_DIR
        if read_current(index_root) is not None:
            faults.point("compact.index")
            info = self._rewrite_index(moved, self.reader(), options, progress)
        faults.point("compact.switch")
        with self._catalog.transaction() as tx:
            for t in tracks:
                if t.id in moves:
                    tx.move_track_rows(t.id, *moves[t.id])
            for seg in plan.victims:
                tx.drop_segment(seg)
            if info is not None:
                tx.set_meta("index", {k: v for k, v in info.items() if k != "identity"})
        faults.point("compact.cleanup")
        for seg in plan.victims:
            try:
                self._writer.truncate(seg, 0)
            except OSError as exc:  # the next open for writing deletes them
                log.warning("%s: cannot delete compacted segment %d: %s", seg_dir, seg, exc)
        fsync_dir(seg_dir)
        log.info(
            "%s: compacted %d segment(s): %d live rows copied, %d dead rows freed",
            self.root,
            len(plan.victims),
            plan.live_rows,
            plan.dead_rows,
        )
        result |= {
            "compacted": True,
            "segments_rewritten": len(plan.victims),
            "rows_copied": plan.live_rows,
            "index": info,
        }
        return result

    def _rewrite_index(
        self,
        tracks: list[TrackRow],
        reader: SegmentReader,
        options: IndexOptions | None,
        progress: bool,
    ) -> dict[str, Any]:
        """A new generation over ``tracks`` with nothing added or retrained (remove, compact).

        Closes ``reader`` when done.
        """
        try:
            return self._build(tracks, reader, options=options, progress=progress, add=False)
        finally:
            reader.close()

    def _build(self, tracks: list[TrackRow], reader: SegmentReader, **how: Any) -> dict[str, Any]:
        """:func:`build.build` over ``tracks``, calibrated against the recorded reference."""
        with self._reference() as reference:
            return build.build(
                track_runs(tracks),
                reader,
                self.root / INDEX_DIR,
                identity=self.identity,
                reference=reference,
                **how,
            )

    # -- the calibration reference -------------------------------------------

    def calibration_reference(self) -> str | None:
        """The folder of the store this catalogue's no-match calibration is measured against."""
        value = self._catalog.get_meta(REFERENCE_META)
        return str(value) if value else None

    def set_calibration_reference(self, index_dir: str | Path | None) -> bool:
        """Calibrate against the store at ``index_dir`` from the next build on (``None``: no more).

        The store is checked now (:func:`~mert_indexer.indexer.reference.open_reference`:
        a store of the same model and hop, not this one, with windows); its
        absolute path is recorded in the catalog. Returns whether it changed.
        """
        self._writable()
        value = None
        if index_dir is not None:
            with open_reference(index_dir, self.identity, self.root) as reference:
                value = reference.index
        if value == self.calibration_reference():
            return False
        with self._catalog.transaction() as tx:
            tx.set_meta(REFERENCE_META, value)
        return True

    @contextlib.contextmanager
    def _reference(self) -> Iterator[Reference | None]:
        """The recorded reference for one build; ``None`` when there is none or it cannot be read.

        A build never fails for its reference (a delete must go through): it
        calibrates without it and says so.
        """
        recorded = self.calibration_reference()
        with contextlib.ExitStack() as stack:
            reference = None
            if recorded is not None:
                try:
                    reference = stack.enter_context(
                        open_reference(recorded, self.identity, self.root)
                    )
                except (StoreError, OSError) as exc:
                    log.warning(
                        "%s: calibrating without the recorded reference: %s "
                        "(indexer-client --calibrate-with NEW, or none)",
                        self.root,
                        exc,
                    )
            yield reference
