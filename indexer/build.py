"""Keep the FAISS index in step with the store: train when it pays, add and remove otherwise.

Slightly over the ~400-line norm: the retrain policy and the incremental
path share one generation-writing sequence, kept whole here.

A build compares the store's tracks with the live generation and does the
least that makes them agree:

* **incremental** (the usual case): tracks gone from the catalog leave the
  index (``remove_ids``), new tracks are centred on the stored mean, encoded
  with the existing trained quantizers and added under new stable ids
  (``layout.py``), tracks a compaction moved get their new (segment, row).
  Nothing is trained. Chosen over a delta index searched beside the base (the
  Lucene / LanceDB way) by measurement: adding 10k windows to a 1M-window
  IVF-PQ index, reading and rewriting the whole base is a small part of the
  increment (``benchmarks/results/index_bench_scale.md``), so a second index,
  a second search per query and a merge policy would buy almost nothing;
* **full** (train anew, :func:`retrain_reason`): no index yet, ``rebuild``
  asked for, another kind asked for, an exact index grown past
  ``IndexOptions.exact_max`` (it becomes IVF-PQ; an IVF-PQ index stays IVF-PQ
  whatever its size), or the catalogue grown ``RETRAIN_GROWTH`` = 4x since the
  index was trained: IVF's list count follows sqrt(n), so at 4x the lists
  chosen at training are half as many as a fresh build would choose and each
  query scans twice the codes it would; before that, fixed quantizers on
  windows of the same kind of music lose no recall (measured: 10 increments of
  1% each, recall@10 within 0.01 of a fresh build).

The index's history goes into ``info.json``: ``trained_at``, ``trained_on``
(windows in the training sample; 0 for exact), ``trained_windows`` (the
catalogue's size then), ``increments`` since, ``next_id`` and ``tombstones``
(tracks taken out of the index whose catalog removal may not have committed:
they stay out until the catalog agrees, so a crash between the two never brings
a deleted track back). The no-match floor and the threshold
(:mod:`mert_indexer.indexer.calibration`) are measured again when the number of
windows moved by more than ``RECALIBRATE_CHANGE`` = 10 % since it last was.

Memory: building streams the segments chunk by chunk (``IndexOptions.chunk_rows``
= 32,768 rows: 96 MiB of float32 at D = 768), so besides the index itself (the
codes of IVF-PQ, ~70 B a window; every vector for exact) it holds one chunk and,
when training, the training sample (at most 150,000 windows: 440 MiB at D = 768).
An incremental build holds the loaded index and one chunk.
On a shared, oversubscribed machine set ``OMP_WAIT_POLICY=PASSIVE`` before
FAISS starts: spinning OpenMP threads made PQ training 10x slower there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.errors import StoreError
from mert_indexer.indexer.calibration import OVERLAP_TRACKS, Windows, calibrate, index_overlap
from mert_indexer.indexer.generation import (
    FORMAT,
    Generation,
    read_current,
    read_generation,
    write_generation,
)
from mert_indexer.indexer.kinds import (
    ExactIndex,
    IndexOptions,
    IvfPqIndex,
    choose_kind,
    gpu_wanted,
    prepare,
)
from mert_indexer.indexer.layout import Layout, TrackRun
from mert_indexer.indexer.reference import Reference
from mert_indexer.indexer.segments import SegmentReader
from mert_indexer.indexer.similarity import track_index_writer

log = logging.getLogger(__name__)

RETRAIN_GROWTH = 4.0  # retrain when the catalogue is this many times its size at training
RECALIBRATE_CHANGE = 0.10  # measure the no-match floor again past this relative change


@dataclass
class _Built:
    """What a full or incremental pass hands to the generation writer."""

    index: ExactIndex | IvfPqIndex
    runs: list[TrackRun]  # in first-id order
    first_ids: np.ndarray
    mean: np.ndarray
    norms: np.ndarray  # by position in ``runs`` order
    history: dict[str, Any]


def build(
    runs: Sequence[TrackRun],
    reader: SegmentReader,
    index_root: Path,
    *,
    identity: dict[str, Any],
    options: IndexOptions | None = None,
    progress: bool = False,
    rebuild: bool = False,
    add: bool = True,
    reference: Reference | None = None,
) -> dict[str, Any]:
    """Bring the index of ``index_root`` in step with ``runs``; write a generation, switch to it.

    ``runs``: every track of the catalog (storage order). Trains anew only when
    :func:`retrain_reason` says so (or ``rebuild``); otherwise adds and removes.
    ``add=False`` (a delete, a compaction): remove and relocate only -- tracks
    the index lacks stay out, nothing is trained unless the live index cannot
    be updated at all. ``reference``: music the catalogue does not hold, which
    the no-match calibration measures beside the catalogue's own windows
    (:func:`mert_indexer.indexer.calibration.calibrate`); a calibration runs
    again when it changed. Returns the new generation's ``info.json``.
    """
    options = options or IndexOptions()
    t0 = time.perf_counter()
    info = _live_info(index_root)
    old_tombstones = set(info.get("tombstones", [])) if info else set()
    catalog_ids = {r.track_id for r in runs}
    live = [r for r in runs if r.track_id not in old_tombstones]
    n = sum(r.n_windows for r in live)
    if n == 0:
        log.warning(
            "%s: the store holds no windows: the index is empty and matches nothing", index_root
        )
    reason = retrain_reason(info, n, reader.dim, options, rebuild)
    if not add and reason is not None and info is not None and not rebuild:
        reason = _unusable(info, reader.dim)  # what remains a reason when nothing is added
    gen: Generation | None = None
    if reason is None and info is not None:
        try:
            gen = read_generation(index_root / str(info["generation"]))
        except (FileNotFoundError, StoreError) as exc:
            reason = f"the live index is unreadable ({exc})"
    if gen is None:
        log.info("%s: training a new index: %s", index_root, reason)
        built = _full(live, reader, options, progress, reason or "")
    else:
        log.info(
            "%s: no retraining: updating the %s index trained on %d windows "
            "(catalogue then %d windows, now %d)",
            index_root,
            gen.info["kind"],
            gen.info["trained_on"],
            gen.info["trained_windows"],
            n,
        )
        built = _incremental(gen, live, reader, options, progress, add=add)
    # Out of the index now; kept out while the catalog still holds them (see above).
    before = _indexed_track_ids(index_root, info)
    now = {r.track_id for r in built.runs}
    built.history["tombstones"] = sorted((old_tombstones & catalog_ids) | (before - now))

    layout = Layout(
        built.first_ids,
        [r.segment for r in built.runs],
        [r.first_row for r in built.runs],
        [r.n_windows for r in built.runs],
    )
    params = built.index.params
    calibrated = int(built.history.get("calibrated_windows", -1))
    against = reference.describe() if reference is not None else None
    if (
        gen is None
        or abs(n - calibrated) > RECALIBRATE_CHANGE * max(calibrated, 1)
        or against != built.history.get("calibrated_against")
    ):
        calibration = calibrate(
            built.index,
            Windows(layout, _vectors(layout, reader, built.mean), _starts(layout, reader)),
            options.seed,
            options.null_quantile,
            _overlap(built.runs, reader, int(identity["window_samples"])),
            _reference_windows(reference, built.mean),
        )
        params["null_quantile"] = options.null_quantile
        params["null_similarity"] = calibration.null_similarity
        params["min_score"] = calibration.min_score
        params["min_score_by_pairs"] = calibration.pair_thresholds
        params["calibrated_against"] = against
        built.history["calibrated_windows"] = n
        built.history["calibrated_against"] = against
        if len(built.runs) == 1 and against is None:
            log.warning(
                "%s: one track, no other music to calibrate the no-match threshold against: "
                "excerpts of a track that repeats itself mostly get no match (index more "
                "tracks, calibrate against an index of other music with --calibrate-with, "
                "or rank with --min-score off)",
                index_root,
            )
    seconds = round(time.perf_counter() - t0, 3)
    if gen is None:
        params["build_seconds"] = seconds
    built.history["update_seconds"] = seconds  # the window index's part, up to here
    # Track similarity (indexer/similarity.py): pooled track vectors and their index.
    started = time.perf_counter()
    tracks = track_index_writer(
        built.runs, reader, built.mean, identity, progress=progress, previous=gen
    )
    built.history["track_pooling_seconds"] = round(time.perf_counter() - started, 3)
    return write_generation(
        index_root,
        built.index,
        built.runs,
        built.mean,
        built.norms,
        identity,
        n,
        extra={"track_index": tracks},
        first_ids=built.first_ids,
        history=built.history,
    )


def retrain_reason(
    info: dict[str, Any] | None, n: int, dim: int, options: IndexOptions, rebuild: bool
) -> str | None:
    """Why ``n`` windows need a newly trained index rather than the live one; ``None``: add."""
    if rebuild:
        return "a rebuild was asked for"
    if info is None:
        return "no index yet"
    unusable = _unusable(info, dim)
    if unusable:
        return unusable
    kind = info["kind"]
    if options.kind == "auto":
        if kind == "exact" and n > options.exact_max:
            return (
                f"{n} windows exceed the exact index's limit of {options.exact_max}: "
                "it becomes IVF-PQ"
            )
    elif options.kind != kind:
        return f"a {options.kind} index was asked for, the live one is {kind}"
    trained = int(info.get("trained_windows", 0))
    if trained == 0 and n > 0:
        return "the live index was built empty"
    if trained and n > RETRAIN_GROWTH * trained:
        return (
            f"the catalogue grew {n / trained:.1f}x since the index was trained "
            f"({trained} -> {n} windows; retraining above {RETRAIN_GROWTH:g}x)"
        )
    return None


def _unusable(info: dict[str, Any], dim: int) -> str | None:
    """Why the live index cannot be updated in place at all (not merely: should be retrained)."""
    if info.get("format") != FORMAT or "next_id" not in info:
        return "the live index predates stable ids"
    if int(info.get("dim", -1)) != dim:
        return f"the live index holds {info.get('dim')}-dimensional vectors, the store {dim}"
    return None


def _full(
    runs: list[TrackRun],
    reader: SegmentReader,
    options: IndexOptions,
    progress: bool,
    reason: str,
) -> _Built:
    """Mean, training, fill: a new index over ``runs`` with ids = positions."""
    n = sum(r.n_windows for r in runs)
    dim = reader.dim
    kind = choose_kind(n, options)
    params = kind.resolve(n, dim, options)
    ranges = [(r.segment, r.first_row, r.n_windows) for r in runs]
    layout = Layout.of(ranges)
    use_gpu = gpu_wanted(options.use_gpu)  # before the long passes: a missing GPU fails fast

    mean = np.zeros(dim, np.float64)
    for chunk in reader.iter_chunks(ranges, options.chunk_rows):
        mean += chunk.sum(axis=0, dtype=np.float64)
    mean32 = (mean / n).astype(np.float32) if n >= 2 else np.zeros(dim, np.float32)
    vectors = _vectors(layout, reader, mean32)

    def training_sample() -> np.ndarray:
        size = int(params["train_size"])
        pick = np.sort(np.random.default_rng(options.seed).choice(n, size, replace=False))
        return vectors(pick)

    index = kind.create(dim, params, training_sample, use_gpu=use_gpu, seed=options.seed)
    norms = _fill(index, reader, ranges, mean32, 0, options.chunk_rows, progress, kind.name)
    trained_on = int(params.get("train_size", 0)) if kind is IvfPqIndex else 0
    history = {
        "update": "full",
        "update_reason": reason,
        "trained_at": time.time(),
        "trained_on": trained_on,
        "trained_windows": n,
        "increments": 0,
        "next_id": n,
    }
    return _Built(index, list(runs), layout.first_ids, mean32, norms, history)


def _incremental(
    gen: Generation,
    runs: list[TrackRun],
    reader: SegmentReader,
    options: IndexOptions,
    progress: bool,
    *,
    add: bool,
) -> _Built:
    """The live index with gone tracks removed and new ones encoded and added; no training."""
    old = gen.runs
    wanted = {r.track_id: r for r in runs}
    keep = np.array(
        [
            int(t) in wanted and wanted[int(t)].n_windows == int(w)
            for t, w in zip(old[:, 4], old[:, 3], strict=True)
        ],
        bool,
    )
    index = gen.index
    gone = old[~keep]
    if len(gone):
        ids = np.concatenate([np.arange(f, f + w, dtype=np.int64) for f, w in gone[:, [0, 3]]])
        removed = index.remove(ids)
        if removed != len(ids):
            raise StoreError(
                f"{gen.path}: the index held {removed} of the {len(ids)} windows to remove; "
                "rebuild it (indexer-admin rebuild)"
            )
    kept_ids = {int(t) for t in old[keep, 4]}
    kept = [wanted[int(t)] for t in old[keep, 4]]  # new placement (a compaction moves rows)
    added = [r for r in runs if r.track_id not in kept_ids] if add else []
    next_id = int(gen.info["next_id"])
    sizes = np.array([r.n_windows for r in added], np.int64)
    added_first = next_id + np.cumsum(sizes) - sizes
    norms = _fill(
        index,
        reader,
        [(r.segment, r.first_row, r.n_windows) for r in added],
        gen.mean,
        next_id,
        options.chunk_rows,
        progress,
        f"adding to {gen.info['kind']}",
    )
    history: dict[str, Any] = {
        k: gen.info[k]
        for k in (
            "trained_at",
            "trained_on",
            "trained_windows",
            "calibrated_windows",
            "calibrated_against",
        )
        if k in gen.info
    }
    history |= {
        "update": "incremental",
        "update_reason": "",
        "increments": int(gen.info.get("increments", 0)) + 1,
        "next_id": int(next_id + sizes.sum()),
        "last_added_windows": int(sizes.sum()),
        "last_removed_windows": int(gone[:, 3].sum()) if len(gone) else 0,
    }
    index.params = dict(gen.info["params"])
    return _Built(
        index,
        kept + added,
        np.concatenate([old[keep, 0], added_first]).astype(np.int64),
        gen.mean,
        np.concatenate([gen.norms[np.repeat(keep, old[:, 3])], norms]).astype(np.float32),
        history,
    )


def _fill(
    index: ExactIndex | IvfPqIndex,
    reader: SegmentReader,
    ranges: list[tuple[int, int, int]],
    mean: np.ndarray,
    first_id: int,
    chunk_rows: int,
    progress: bool,
    desc: str,
) -> np.ndarray:
    """Centre, normalise and add the windows of ``ranges`` under consecutive ids from ``first_id``.

    Returns the norms of the centred vectors (what lets re-ranking skip
    normalising what it reads). Holds one chunk at a time.
    """
    bar = _progress_bar(progress, sum(r[2] for r in ranges), f"indexing ({desc})")
    norms = []
    at = first_id
    for chunk in reader.iter_chunks(ranges, chunk_rows):
        chunk -= mean
        norm = np.linalg.norm(chunk, axis=1, keepdims=True)
        norms.append(norm[:, 0])
        np.divide(chunk, norm, out=chunk, where=norm > 0)
        index.add(chunk, np.arange(at, at + len(chunk), dtype=np.int64))
        at += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return np.concatenate(norms).astype(np.float32) if norms else np.zeros(0, np.float32)


def _vectors(
    layout: Layout, reader: SegmentReader, mean: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """Prepared stored vectors by id (training sample, calibration)."""

    def vectors(ids: np.ndarray) -> np.ndarray:
        _, segs, rows = layout.place(ids)
        return prepare(reader.gather(segs, rows), mean)

    return vectors


def _reference_windows(reference: Reference | None, mean: np.ndarray) -> Windows | None:
    """The reference's windows, prepared as the catalogue's are (centred on its mean)."""
    if reference is None:
        return None
    layout = Layout.of([(r.segment, r.first_row, r.n_windows) for r in reference.runs])
    return Windows(
        layout, _vectors(layout, reference.reader, mean), _starts(layout, reference.reader)
    )


def _starts(layout: Layout, reader: SegmentReader) -> Callable[[np.ndarray], np.ndarray]:
    """Stored window starts (samples into the track) by id (calibration)."""

    def starts(ids: np.ndarray) -> np.ndarray:
        _, segs, rows = layout.place(ids)
        out = np.empty(len(ids), np.int64)
        for seg in np.unique(segs).tolist():
            at = segs == seg
            out[at] = reader.starts(seg)[rows[at]]
        return out

    return starts


def _overlap(runs: Sequence[TrackRun], reader: SegmentReader, window_samples: int) -> int:
    """Window / index hop of the catalogue, from its first tracks' window starts."""
    starts = [
        reader.starts(r.segment)[r.first_row : r.first_row + r.n_windows]
        for r in runs[:OVERLAP_TRACKS]
    ]
    return index_overlap(starts, window_samples)


def _live_info(index_root: Path) -> dict[str, Any] | None:
    """``info.json`` of the live generation; ``None`` when there is none or it is unreadable."""
    try:
        generation = read_current(index_root)
        if generation is None:
            return None
        info: dict[str, Any] = json.loads((index_root / generation / "info.json").read_text())
    except (OSError, ValueError, StoreError) as exc:
        log.warning("%s: the live index is unreadable, it will be rebuilt: %s", index_root, exc)
        return None
    return info


def _indexed_track_ids(index_root: Path, info: dict[str, Any] | None) -> set[int]:
    """Catalog ids of the tracks the live generation holds (empty when unreadable)."""
    if info is None:
        return set()
    try:
        runs = np.load(index_root / str(info["generation"]) / "runs.npy", allow_pickle=False)
    except (OSError, ValueError):
        return set()
    return {int(t) for t in runs[:, 4]} if len(runs) else set()


def _progress_bar(on: bool, total: int, desc: str) -> Any:
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="win", unit_scale=True)
