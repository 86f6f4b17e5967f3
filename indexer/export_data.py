"""Export a store's embeddings for downstream work: Parquet (pyarrow) or plain ``.npy``.

Two tables, each carrying the model identity, so that embeddings of different
models are never mixed unknowingly:

    windows   track, track_id, start_seconds, vector   one row per indexed window
    tracks    track, track_id, content_hash, duration_seconds, n_windows, vector

The window vectors are the store's own (float16, exported as float32: exact);
a track's vector is the time-weighted mean of its raw window vectors
(:func:`mert_indexer.indexer.similarity.pooled_windows` without centring): in
the model's space, independent of the catalogue, unlike the similarity index's
centred vectors.

Output, a folder made beside ``OUT`` and renamed into place when complete:

    parquet:  windows.parquet, tracks.parquet   (metadata key ``mert_indexer``, JSON)
    npy:      window_vectors.npy [n, D], window_track_ids.npy, window_starts.npy,
              track_vectors.npy [t, D], track_ids.npy, track_durations.npy,
              metadata.json (the same metadata, plus the track paths and hashes)

Streaming with bounded memory: windows are read from the memory-mapped
segments ``chunk_rows`` at a time; Parquet gets one row group per chunk, the
``.npy`` files are written through ``open_memmap`` (sized from the catalog).

Incremental exports: ``since_track_id`` exports only tracks with a larger
catalog id. Track ids are the store's own cursor -- assigned in increasing
order and never reused, so "ids above the last export's ``max_track_id``" is
exactly what was added since, whatever index generations were built in
between (a generation records what was indexed, not when a track arrived,
and only the live one is kept). A track whose file changed gets a new id and
is exported again; renames and removals are not seen by an incremental
export (compare ``track_id`` lists, or export in full).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.atomic import atomic_write_text, fsync_dir, fsync_file
from mert_indexer.errors import ConfigError, StoreError
from mert_indexer.indexer.catalog import TrackRow
from mert_indexer.indexer.layout import TrackRun
from mert_indexer.indexer.similarity import pooled_windows
from mert_indexer.indexer.store import IndexStore
from mert_indexer.progress import progress_bar

log = logging.getLogger(__name__)

FORMATS = ("parquet", "npy")
METADATA_KEY = "mert_indexer"
FORMAT_VERSION = 1
TRACK_POOLING = "time-weighted mean of the raw window vectors"


@dataclass(frozen=True)
class ExportOptions:
    format: str = "parquet"  # "parquet" | "npy"
    since_track_id: int = 0  # export tracks with a larger catalog id only
    dtype: str = "float32"  # "float32" (exact) | "float16" (the store's own, half the size)
    chunk_rows: int = 65536

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown export format {self.format!r}: use parquet or npy")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"dtype is float32 or float16, got {self.dtype!r}")
        if self.since_track_id < 0 or self.chunk_rows < 1:
            raise ConfigError("since_track_id must be >= 0 and chunk_rows >= 1")


def export(
    index_dir: str | Path, out: str | Path, options: ExportOptions, *, progress: bool = False
) -> dict[str, Any]:
    """Write the export of the store at ``index_dir`` to the folder ``out``; its metadata."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out}: already exists; export into a new folder")
    with IndexStore.open(index_dir, None, create=False) as store:
        tracks = [t for t in store.tracks() if t.id > options.since_track_id]
        identity = dict(store.identity)
        meta = _metadata(store, identity, tracks, options)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        reader = store.reader()
        try:
            writer = _parquet if options.format == "parquet" else _npy
            writer(tmp, tracks, reader, meta, options, progress)
            for p in tmp.iterdir():
                fsync_file(p)
            fsync_dir(tmp)
            os.replace(tmp, out)
            fsync_dir(out.parent)
        except OSError as exc:
            raise StoreError(
                f"{exc.filename or out}: cannot write the export: {exc.strerror}"
            ) from exc
        finally:
            reader.close()
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _metadata(
    store: IndexStore, identity: dict[str, Any], tracks: list[TrackRow], options: ExportOptions
) -> dict[str, Any]:
    sr = int(identity["sample_rate"])
    return {
        "format_version": FORMAT_VERSION,
        "model_id": identity.get("model_id"),
        "weights_sha256": identity.get("weights_sha256"),
        "layers": identity.get("layers"),
        "pooling": identity.get("pooling"),
        # Not part of the store's identity (an fp16/INT8 export of the same weights
        # shares an index with fp32), so not known here unless the store records it.
        "precision": identity.get("precision"),
        "window_samples": identity.get("window_samples"),
        "window_seconds": int(identity["window_samples"]) / sr,
        "hop_samples": identity.get("hop_samples"),
        "sample_rate": sr,
        "embedding_dim": int(identity["embedding_dim"]),
        "identity": identity,
        "track_pooling": TRACK_POOLING,
        "vector_dtype": options.dtype,
        "since_track_id": options.since_track_id,
        "max_track_id": max([t.id for t in tracks], default=options.since_track_id),
        "n_tracks": len(tracks),
        "n_windows": sum(t.n_windows for t in tracks),
        "store": str(Path(store.root).resolve()),
        "exported_at": time.time(),
    }


def _window_chunks(
    tracks: list[TrackRow], reader: Any, chunk_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(track index, track id, start seconds, float16 vectors) chunks, tracks whole or split."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    held = 0
    for i, t in enumerate(tracks):
        pos = t.first_row
        end = t.first_row + t.n_windows
        while pos < end:
            take = min(end - pos, chunk_rows - held)
            rows = slice(pos, pos + take)
            parts.append(
                (
                    np.full(take, i, np.int64),
                    np.full(take, t.id, np.int64),
                    reader.starts(t.segment)[rows] / t.sample_rate,
                    np.asarray(reader.vectors(t.segment)[rows]),
                )
            )
            held += take
            pos += take
            if held == chunk_rows:
                yield tuple(np.concatenate(c) for c in zip(*parts, strict=True))  # type: ignore[misc]
                parts, held = [], 0
    if held:
        yield tuple(np.concatenate(c) for c in zip(*parts, strict=True))  # type: ignore[misc]


def _track_vectors(tracks: list[TrackRow], reader: Any, window_seconds: float) -> np.ndarray:
    runs = [
        TrackRun(t.id, t.path, t.sample_rate, t.segment, t.first_row, t.n_windows) for t in tracks
    ]
    return pooled_windows(runs, reader, None, window_seconds)


def _parquet(
    tmp: Path,
    tracks: list[TrackRow],
    reader: Any,
    meta: dict[str, Any],
    options: ExportOptions,
    progress: bool,
) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError(
            "Parquet export needs pyarrow: pip install 'mert-indexer[parquet]' "
            "(or use --format npy)"
        ) from exc
    dim = int(meta["embedding_dim"])
    value = pa.float32() if options.dtype == "float32" else pa.float16()
    md = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    windows = pa.schema(
        [
            ("track", pa.string()),
            ("track_id", pa.int64()),
            ("start_seconds", pa.float64()),
            ("vector", pa.list_(value, dim)),
        ],
        metadata=md,
    )
    paths = [t.path for t in tracks]
    bar = progress_bar(progress, int(meta["n_windows"]), "exporting")
    with pq.ParquetWriter(tmp / "windows.parquet", windows) as w:
        for idx, ids, starts, vec in _window_chunks(tracks, reader, options.chunk_rows):
            flat = pa.array(vec.astype(options.dtype).reshape(-1), value)
            w.write_table(
                pa.table(
                    [
                        pa.array([paths[i] for i in idx], pa.string()),
                        pa.array(ids, pa.int64()),
                        pa.array(starts, pa.float64()),
                        pa.FixedSizeListArray.from_arrays(flat, dim),
                    ],
                    schema=windows,
                )
            )
            if bar is not None:
                bar.update(len(ids))
    if bar is not None:
        bar.close()
    pooled = _track_vectors(tracks, reader, float(meta["window_seconds"])).astype(options.dtype)
    table = pa.table(
        {
            "track": pa.array(paths, pa.string()),
            "track_id": pa.array([t.id for t in tracks], pa.int64()),
            "content_hash": pa.array([t.content_hash for t in tracks], pa.string()),
            "duration_seconds": pa.array(
                [t.n_samples / t.sample_rate for t in tracks], pa.float64()
            ),
            "n_windows": pa.array([t.n_windows for t in tracks], pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(pooled.reshape(-1), value), dim),
        }
    ).replace_schema_metadata(md)
    pq.write_table(table, tmp / "tracks.parquet")


def _npy(
    tmp: Path,
    tracks: list[TrackRow],
    reader: Any,
    meta: dict[str, Any],
    options: ExportOptions,
    progress: bool,
) -> None:
    from numpy.lib.format import open_memmap

    n, dim = int(meta["n_windows"]), int(meta["embedding_dim"])
    vec = open_memmap(tmp / "window_vectors.npy", mode="w+", dtype=options.dtype, shape=(n, dim))
    tid = open_memmap(tmp / "window_track_ids.npy", mode="w+", dtype=np.int64, shape=(n,))
    st = open_memmap(tmp / "window_starts.npy", mode="w+", dtype=np.float64, shape=(n,))
    bar = progress_bar(progress, n, "exporting")
    pos = 0
    for _, ids, starts, x in _window_chunks(tracks, reader, options.chunk_rows):
        vec[pos : pos + len(ids)] = x
        tid[pos : pos + len(ids)] = ids
        st[pos : pos + len(ids)] = starts
        pos += len(ids)
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    for mm in (vec, tid, st):
        mm.flush()
    del vec, tid, st
    pooled = _track_vectors(tracks, reader, float(meta["window_seconds"]))
    np.save(tmp / "track_vectors.npy", pooled.astype(options.dtype), allow_pickle=False)
    np.save(tmp / "track_ids.npy", np.array([t.id for t in tracks], np.int64), allow_pickle=False)
    np.save(
        tmp / "track_durations.npy",
        np.array([t.n_samples / t.sample_rate for t in tracks], np.float64),
        allow_pickle=False,
    )
    sidecar = meta | {
        "tracks": [
            {"track_id": t.id, "track": t.path, "content_hash": t.content_hash} for t in tracks
        ]
    }
    atomic_write_text(tmp / "metadata.json", json.dumps(sidecar, indent=1, sort_keys=True))
