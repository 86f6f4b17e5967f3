"""The on-disk format of a built index: generation directories and the ``CURRENT`` pointer.

A built index is a generation directory, written beside the old one, fsynced
and renamed into place; ``index/CURRENT`` names the live generation and is
replaced atomically last. A crash at any point leaves the previous index whole.

    index/CURRENT                 {"generation": "000007"}
    index/000007/vectors.faiss    the FAISS index, under stable ids (``layout.py``)
    index/000007/runs.npy         int64 [tracks, 5]: first_id, segment, first_row,
                                  n_windows, track_id; sorted by first_id
    index/000007/tracks.json      {"path": [...], "sample_rate": [...]} aligned with runs
    index/000007/mean.npy         float32 [dim]: the centring vector (fixed at training)
    index/000007/norms.npy        float32 [windows]: norms of the centred vectors
                                  (re-ranking), in runs order (``Layout.position``)
    index/000007/info.json        kind, params, counts, bytes, model identity, and
                                  the index's history: when and on how many windows
                                  it was trained, ``next_id``, tombstones (``build.py``)

Every generation is complete on its own: an incremental add or a delete writes
a whole new generation (the FAISS index read, changed, written again), never
edits a live one, so readers of the old one are never disturbed.
``format`` 2 is the stable-id format; a generation without it (ids =
positions) is searched as before, and the next build retrains it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.atomic import atomic_write, atomic_write_text, fsync_dir, fsync_file
from mert_indexer.errors import StoreError
from mert_indexer.indexer import faults
from mert_indexer.indexer.kinds import KINDS, ExactIndex, IvfPqIndex, load_faiss
from mert_indexer.indexer.layout import Layout, TrackRun

INDEX_DIR = "index"
CURRENT = "CURRENT"
FAISS_FILE = "vectors.faiss"
RUN_COLUMNS = ("first_id", "segment", "first_row", "n_windows", "track_id")
FORMAT = 2  # stable ids: explicit first ids, norms by position, next_id


@dataclass
class Generation:
    """The files of one generation, read back."""

    path: Path
    info: dict[str, Any]
    runs: np.ndarray  # int64 [tracks, len(RUN_COLUMNS)]
    mean: np.ndarray
    norms: np.ndarray
    paths: list[str]
    sample_rates: np.ndarray
    index: ExactIndex | IvfPqIndex

    @property
    def layout(self) -> Layout:
        """FAISS ids to (run, segment, row) and positions (``runs`` columns 0-3)."""
        r = self.runs
        return Layout(r[:, 0], r[:, 1], r[:, 2], r[:, 3])


def write_generation(
    index_root: Path,
    index: ExactIndex | IvfPqIndex,
    runs: Sequence[TrackRun],
    mean: np.ndarray,
    norms: np.ndarray,
    identity: dict[str, Any],
    n: int,
    extra: Mapping[str, Callable[[Path], dict[str, Any]]] | None = None,
    *,
    first_ids: np.ndarray | None = None,
    history: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a new generation beside the live one and switch ``CURRENT`` to it; its info.

    ``extra``: ``info.json`` key -> a writer of more files into the generation
    being written (its folder as argument), returning that key's entry
    (``track_index``: :mod:`mert_indexer.indexer.similarity`).
    ``first_ids``: each run's first FAISS id (default: consecutive from 0);
    ``history``: more ``info.json`` entries (training, next id, tombstones).
    """
    faiss = load_faiss()
    index_root.mkdir(parents=True, exist_ok=True)
    number = 1 + max([int(p.name) for p in index_root.iterdir() if p.name.isdigit()] + [0])
    generation = f"{number:06d}"
    tmp = index_root / f".{generation}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        faults.point("generation.write")
        firsts = (
            np.cumsum([0] + [r.n_windows for r in runs])[:-1]
            if first_ids is None
            else np.asarray(first_ids, np.int64)
        )
        table = np.array(
            [
                (f, r.segment, r.first_row, r.n_windows, r.track_id)
                for f, r in zip(firsts, runs, strict=True)
            ],
            np.int64,
        ).reshape(-1, len(RUN_COLUMNS))
        for name, array in (("runs.npy", table), ("mean.npy", mean), ("norms.npy", norms)):
            with atomic_write(tmp / name) as fh:
                np.save(fh, array, allow_pickle=False)
        tracks = {"path": [r.path for r in runs], "sample_rate": [r.sample_rate for r in runs]}
        atomic_write_text(tmp / "tracks.json", json.dumps(tracks))
        faiss.write_index(index.index, str(tmp / FAISS_FILE))
        fsync_file(tmp / FAISS_FILE)
        extra_info, extra_seconds = {}, {}
        for key, write in (extra or {}).items():
            started = time.perf_counter()
            extra_info[key] = write(tmp)
            extra_seconds[key] = round(time.perf_counter() - started, 3)
        nbytes = sum(p.stat().st_size for p in tmp.iterdir())
        info = {
            "generation": generation,
            "kind": index.name,
            "params": index.params,
            "n_vectors": int(n),
            "n_tracks": len(runs),
            "dim": int(mean.shape[0]),
            "bytes": int(nbytes),
            "bytes_per_vector": round(nbytes / max(n, 1), 2),
            "identity": identity,
            "built_at": time.time(),
            "run_columns": list(RUN_COLUMNS),
            "format": FORMAT,
            # A search loads every file of a generation whole; the segments are
            # memory-mapped (page cache, not counted).
            "ram_bytes": int(nbytes),
            **dict(history or {}),
            "extra_write_seconds": extra_seconds,
            **extra_info,
        }
        atomic_write_text(tmp / "info.json", json.dumps(info, indent=1, sort_keys=True))
        faults.point("generation.rename")
        os.replace(tmp, index_root / generation)
        fsync_dir(index_root)
    except (OSError, RuntimeError) as exc:  # faiss.write_index raises RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        where = getattr(exc, "filename", None) or tmp
        reason = getattr(exc, "strerror", None) or str(exc)
        raise StoreError(
            f"{where}: cannot write the index: {reason}; the previous index stays"
        ) from exc
    try:
        faults.point("generation.current")
        atomic_write_text(index_root / CURRENT, json.dumps({"generation": generation}))
    except OSError as exc:
        raise StoreError(
            f"{index_root / CURRENT}: cannot switch to the new index: {exc.strerror}; "
            "the previous index stays"
        ) from exc
    faults.point("generation.retire")
    for p in index_root.iterdir():  # older generations and leftovers of crashed builds
        if p.name not in (generation, CURRENT) and (p.name.isdigit() or p.name.endswith(".tmp")):
            shutil.rmtree(p, ignore_errors=True)
    return info


def read_current(index_root: Path) -> str | None:
    """The live generation's name, or ``None`` when no index was built."""
    try:
        return str(json.loads((index_root / CURRENT).read_text())["generation"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"{index_root / CURRENT}: unreadable index pointer: {exc}") from exc


def read_generation(gen: Path) -> Generation:
    """Every file of generation ``gen``.

    Raises ``FileNotFoundError`` when the generation vanished (a concurrent
    build retired it: the caller reads ``CURRENT`` again), :class:`StoreError`
    when a file is unreadable.
    """
    try:
        info: dict[str, Any] = json.loads((gen / "info.json").read_text())
        runs = np.load(gen / "runs.npy", allow_pickle=False)
        mean = np.load(gen / "mean.npy", allow_pickle=False)
        norms = np.load(gen / "norms.npy", allow_pickle=False)
        tracks = json.loads((gen / "tracks.json").read_text())
        if not (gen / FAISS_FILE).exists():
            raise FileNotFoundError(gen / FAISS_FILE)
        kind = KINDS[info["kind"]]
        index = kind.read(gen / FAISS_FILE, info["params"])
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise StoreError(f"{gen}: unreadable index files: {exc}") from exc
    return Generation(
        path=gen,
        info=info,
        runs=runs,
        mean=mean,
        norms=norms,
        paths=list(tracks["path"]),
        sample_rates=np.asarray(tracks["sample_rate"], np.float64),
        index=index,
    )


def current_info(index_root: Path) -> dict[str, Any] | None:
    """``info.json`` of the live generation, or ``None``."""
    generation = read_current(index_root)
    if generation is None:
        return None
    with contextlib.suppress(FileNotFoundError):
        info: dict[str, Any] = json.loads((index_root / generation / "info.json").read_text())
        return info
    return None
