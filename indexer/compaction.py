"""Compaction: rewrite the segments that hold dead rows, every live vector kept bit for bit.

Dead rows are what replaced, pruned and removed tracks leave in the
append-only segments. :meth:`IndexStore.compact` rewrites each segment that
holds any, when the store's dead rows exceed ``COMPACT_DEAD_FRACTION`` = 25 %
of its stored rows (or whenever asked, ``indexer-admin compact``): then a
compaction copies at most three live rows per dead row it frees, so its cost
stays proportional to the garbage it collects. Segments without dead rows are
left alone.

Crash-safe by the store's own rule (a row exists once the catalog counts it,
and ``SegmentWriter.recover`` drops what it does not count when the store is
next opened for writing). The steps, each behind a fault-injection point:

1. ``compact.write``: copy the live tracks of those segments, in storage order,
   into *new* segment numbers beside the old ones, chunk by chunk
   (``COPY_ROWS`` = 32,768 rows: 48 MiB of float16 at D = 768, the most a
   compaction holds), each chunk fsynced. A crash leaves files no commit
   counts: dropped at the next open.
2. ``compact.register``: one catalog transaction counts the new segments'
   rows. Both copies are committed; the tracks still point at the old one and
   the new rows are dead space until step 4.
3. ``compact.index``: a new index generation whose runs point at the new rows
   (same FAISS ids, same codes: nothing re-encoded), switched atomically.
4. ``compact.switch``: one catalog transaction points each track at its copy
   and forgets the old segments. A crash between 3 and 4 leaves the catalog on
   the old rows and the index on the new: both committed, both whole; the next
   build or compaction puts them back in step.
5. ``compact.cleanup``: the old segments' files are deleted (a crash before:
   the next open deletes them, no commit counts them any more).

A search loaded before the switch keeps its own maps of the old files
(``LoadedIndex`` maps every segment at load), so it finishes on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mert_indexer.indexer import faults
from mert_indexer.indexer.catalog import TrackRow
from mert_indexer.indexer.segments import START_DTYPE, VECTOR_DTYPE, SegmentReader, SegmentWriter

COMPACT_DEAD_FRACTION = 0.25
COPY_ROWS = 32768


@dataclass(frozen=True)
class CompactionPlan:
    """Which segments a compaction rewrites and what it keeps of them."""

    victims: tuple[int, ...]  # segments with dead rows, rewritten
    tracks: tuple[TrackRow, ...]  # their live tracks, storage order
    live_rows: int  # rows copied
    dead_rows: int  # rows freed
    stored_rows: int  # all committed rows of the store

    @property
    def dead_fraction(self) -> float:
        return self.dead_rows / self.stored_rows if self.stored_rows else 0.0


def plan_compaction(tracks: list[TrackRow], segment_rows: dict[int, int]) -> CompactionPlan:
    """The segments holding dead rows (committed rows no track uses) and their live tracks."""
    live: dict[int, int] = {}
    for t in tracks:
        live[t.segment] = live.get(t.segment, 0) + t.n_windows
    victims = tuple(s for s, rows in sorted(segment_rows.items()) if rows > live.get(s, 0))
    chosen = set(victims)
    moving = tuple(t for t in tracks if t.segment in chosen)
    return CompactionPlan(
        victims,
        moving,
        sum(t.n_windows for t in moving),
        sum(segment_rows[s] - live.get(s, 0) for s in victims),
        sum(segment_rows.values()),
    )


def copy_rows(
    reader: SegmentReader,
    writer: SegmentWriter,
    tracks: tuple[TrackRow, ...],
    first_segment: int,
    rows_per_segment: int,
    *,
    on_rows: Callable[[int], None] | None = None,
) -> tuple[dict[int, tuple[int, int]], dict[int, int]]:
    """Copy ``tracks``' rows, bytes unchanged, into new segments from ``first_segment`` on.

    A track stays whole within one segment, as commits place it. Returns
    ``{track id: (segment, first row)}`` of the copies and the new segments'
    row counts. Raises ``OSError`` (disk full, ...) with the copies unrecorded.
    """
    moves: dict[int, tuple[int, int]] = {}
    rows: dict[int, int] = {}
    segment, at = first_segment, 0
    vec_parts: list[np.ndarray] = []
    start_parts: list[np.ndarray] = []
    held, flush_at = 0, 0  # rows buffered; row of the segment where they go

    def flush() -> None:
        nonlocal vec_parts, start_parts, held, flush_at
        if held:
            faults.point("compact.write")
            writer.write(
                segment,
                flush_at,
                np.concatenate(vec_parts).astype(VECTOR_DTYPE, copy=False),
                np.concatenate(start_parts).astype(START_DTYPE, copy=False),
            )
            if on_rows is not None:
                on_rows(held)
        vec_parts, start_parts, held, flush_at = [], [], 0, at

    for t in tracks:
        if at and at + t.n_windows > rows_per_segment:
            flush()
            rows[segment] = at
            segment, at = segment + 1, 0
            flush_at = 0
        moves[t.id] = (segment, at)
        lo = t.first_row
        while lo < t.first_row + t.n_windows:
            take = min(t.first_row + t.n_windows - lo, COPY_ROWS - held)
            vec_parts.append(np.asarray(reader.vectors(t.segment)[lo : lo + take]))
            start_parts.append(np.asarray(reader.starts(t.segment)[lo : lo + take]))
            held += take
            at += take
            lo += take
            if held == COPY_ROWS:
                flush()
    flush()
    if at:
        rows[segment] = at
    return moves, rows
