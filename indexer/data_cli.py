"""Command-line entry points over a built store: ``indexer-duplicates`` and ``indexer-export``.

Argument parsing and logging set-up live here only; errors become one line on
stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mert_indexer.defaults import default_of
from mert_indexer.errors import IndexerError
from mert_indexer.indexer.duplicates import DuplicateOptions

FIELDS = (
    "track_a",
    "track_b",
    "track_id_a",
    "track_id_b",
    "offset_a_seconds",
    "offset_b_seconds",
    "overlap_seconds",
    "score",
    "windows",
    "match",
)


def _setup(verbose: bool) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before FAISS's OpenMP starts
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="index folder (a built store)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="show a progress bar (default: on a terminal)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def duplicates_main(argv: Sequence[str] | None = None) -> int:
    """``indexer-duplicates --index DIR [--json|--csv]``: tracks sharing a recording."""
    p = argparse.ArgumentParser(
        prog="indexer-duplicates",
        description="Report pairs of catalogue tracks that contain the same recording, "
        "whole or in part, with the aligned offsets, the overlap and a score.",
    )
    _common(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON array of pairs")
    out.add_argument("--csv", action="store_true", help="CSV with a header row")
    p.add_argument(
        "--min-score",
        type=float,
        default=default_of(DuplicateOptions, "min_score"),
        help="report pairs scoring at least this (0..1; default: %(default)s, measured)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help="shortest shared stretch reported (default: "
        f"{default_of(DuplicateOptions, 'min_windows')} windows)",
    )
    p.add_argument(
        "--no-identical",
        action="store_true",
        help="leave out files with identical bytes (the catalog's recorded duplicates)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.min_score <= 1.0:
        p.error("--min-score is between 0 and 1")
    if args.min_seconds is not None and args.min_seconds <= 0:
        p.error("--min-seconds must be positive")
    _setup(args.verbose)
    from mert_indexer.indexer.duplicates import find_duplicates, identical_pairs
    from mert_indexer.indexer.similarity import TrackFinder

    try:
        with TrackFinder.open(args.index) as finder:
            loaded = finder.loaded
            min_windows = default_of(DuplicateOptions, "min_windows")
            if args.min_seconds is not None:
                hop = int(loaded.identity.get("hop_samples") or loaded.identity["window_samples"])
                hop_s = hop / int(loaded.identity["sample_rate"])
                min_windows = max(1, round(args.min_seconds / hop_s))
            options = DuplicateOptions(min_score=args.min_score, min_windows=min_windows)
            pairs = find_duplicates(loaded, options, progress=args.progress)
            if not args.no_identical:
                pairs = identical_pairs(loaded, *finder.catalog_facts()) + pairs
    except IndexerError as exc:
        print(f"indexer-duplicates: error: {exc}", file=sys.stderr)
        return 1
    rows = [pair.as_dict() for pair in pairs]
    if args.json:
        print(json.dumps(rows))
    elif args.csv:
        w = csv.DictWriter(sys.stdout, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    else:
        if not rows:
            print("no tracks share a recording")
        for r in rows:
            print(
                f"{r['track_a']} @ {r['offset_a_seconds']:.1f} s  ==  {r['track_b']} @ "
                f"{r['offset_b_seconds']:.1f} s  ({r['overlap_seconds']:.1f} s, "
                f"score {r['score']:.3f}{', identical file' if r['match'] == 'identical' else ''})"
            )
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    """``indexer-export --index DIR --out FOLDER --format parquet|npy``."""
    from mert_indexer.indexer.export_data import FORMATS, ExportOptions, export

    p = argparse.ArgumentParser(
        prog="indexer-export",
        description="Export window and track embeddings with the model identity: Parquet "
        "(windows.parquet, tracks.parquet) or .npy arrays with a JSON sidecar.",
    )
    _common(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    p.add_argument("--format", choices=FORMATS, default="parquet")
    p.add_argument(
        "--since-track-id",
        type=int,
        default=0,
        metavar="N",
        help="only tracks with a catalog id above N (the last export's max_track_id)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default=default_of(ExportOptions, "dtype"),
        help="vector values (default: %(default)s; the store holds float16, so both are exact)",
    )
    args = p.parse_args(argv)
    if args.since_track_id < 0:
        p.error("--since-track-id must be >= 0")
    _setup(args.verbose)
    try:
        meta = export(
            args.index,
            args.out,
            ExportOptions(format=args.format, since_track_id=args.since_track_id, dtype=args.dtype),
            progress=args.progress,
        )
    except IndexerError as exc:
        print(f"indexer-export: error: {exc}", file=sys.stderr)
        return 1
    keys = ("n_tracks", "n_windows", "since_track_id", "max_track_id", "model_id")
    print(json.dumps({"out": str(args.out), **{k: meta[k] for k in keys}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(duplicates_main())
