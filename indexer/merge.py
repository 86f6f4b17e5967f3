"""Merge stores built separately (shards) into one, refusing mixed models.

The merged store holds exactly what one run over all the shards' files would
hold: every (track, window) once. Content indexed in two shards under two
paths is kept once and the later path recorded as its duplicate, as a single
run records it; a path present in two sources with the same content is taken
once (so a merge can be rerun). Vectors are copied segment by segment in
commits of bounded size, so a merge never holds a shard in memory; only live
rows are copied, which makes ``merge_stores([store], new_dir)`` a compaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mert_indexer.errors import ModelMismatchError, StoreError
from mert_indexer.indexer.faiss_index import IndexOptions
from mert_indexer.indexer.store import IndexStore, IngestPlan, PendingFile, identity_differences

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
) -> dict[str, Any]:
    """Copy every source store into ``dest`` (made if absent) and build its index.

    Raises :class:`ModelMismatchError` when the sources (or an existing
    ``dest``) were built by different models, naming the store and the fields.
    """
    if not sources:
        raise StoreError("merge: no source stores given")
    dest = Path(dest)
    if any(Path(s).resolve() == dest.resolve() for s in sources):
        raise StoreError(f"{dest}: the destination is also a source")
    stores = []
    try:
        for src in sources:
            stores.append(IndexStore.open(src, None, create=False))
        first = stores[0]
        for other in stores[1:]:
            diffs = identity_differences(first.identity, other.identity)
            if diffs:
                raise ModelMismatchError(
                    f"{other.root}: built by another model than {first.root} ({'; '.join(diffs)})"
                )
        with IndexStore.open(dest, first.identity, create=True) as out:
            counts = _copy_all(stores, out)
            counts["index"] = (
                out.build_index(kind=kind, options=options, progress=progress) if build else None
            )
            counts["stats"] = {
                k: v for k, v in out.stats().items() if k not in ("identity", "index")
            }
    finally:
        for s in stores:
            s.close()
    counts["dest"] = str(dest)
    return counts


def _copy_all(sources: list[IndexStore], out: IndexStore) -> dict[str, Any]:
    added = present = dup = failed = 0
    holder: dict[str, str] = {}  # content hash -> path holding it in ``out``
    for t in out.tracks():
        holder.setdefault(t.content_hash, t.path)
    for src in sources:
        for track, starts, vectors in src.iter_windows():
            pending = PendingFile(track.path, track.content_hash, track.size, track.mtime_ns)
            status = out.status(track.path)
            if status is not None and status[1] == track.content_hash:
                present += 1
                continue
            if status is not None:
                raise StoreError(
                    f"{track.path}: indexed with different content in {src.root} and in an earlier "
                    "source or the destination; which one is current cannot be told"
                )
            if track.content_hash in holder:
                out.apply(IngestPlan(duplicates=((pending, holder[track.content_hash]),)))
                dup += 1
                continue
            out.add_track(
                pending,
                n_samples=track.n_samples,
                sample_rate=track.sample_rate,
                starts=starts,
                embeddings=vectors,
            )
            holder[track.content_hash] = track.path
            added += 1
            if out.pending_windows >= COMMIT_WINDOWS:
                out.commit()
        out.commit()
        for path, (content, size, mtime_ns) in src.duplicates().items():
            if out.status(path) is None:
                pending = PendingFile(path, content, size, mtime_ns)
                out.apply(IngestPlan(duplicates=((pending, holder.get(content, "")),)))
                dup += 1
        for path, reason in src.failures().items():
            if out.status(path) is None:
                out.record_failure(path, reason)
                failed += 1
        out.commit()
        log.info("merged %s", src.root)
    return {
        "sources": len(sources),
        "tracks_added": added,
        "tracks_already_present": present,
        "duplicates": dup,
        "failures": failed,
    }
