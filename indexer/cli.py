"""Command-line entry points of the indexer package: ``indexer-merge``.

Argument parsing and logging set-up live here only; errors become one line on
stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mert_indexer.errors import IndexerError
from mert_indexer.indexer.merge import merge_stores


def merge_main(argv: Sequence[str] | None = None) -> int:
    """``indexer-merge DEST SRC...``: merge shard stores into DEST and build its index."""
    parser = argparse.ArgumentParser(
        prog="indexer-merge",
        description="Merge index stores built separately (shards) into one and build its index. "
        "DEST mirrors the sources: rerunning after a source changed copies what is new, "
        "replaces what changed and removes what no source holds. "
        "Refuses stores built by different models.",
    )
    parser.add_argument("dest", type=Path, help="destination index directory (made if absent)")
    parser.add_argument("sources", type=Path, nargs="+", help="source index directories")
    parser.add_argument(
        "--kind",
        choices=("auto", "exact", "ivfpq"),
        default="auto",
        help="index kind (default: auto, by size)",
    )
    parser.add_argument("--no-build", action="store_true", help="merge the stores only")
    parser.add_argument(
        "--calibrate-with",
        metavar="INDEX",
        help="the calibration reference DEST records (as indexer-client --calibrate-with; "
        "'none' forgets it); default: the one the sources record, where they agree",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="show a progress bar while indexing",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    # Before FAISS's OpenMP starts: spinning threads on a busy machine slowed PQ training 10x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = merge_stores(
            args.sources,
            args.dest,
            build=not args.no_build,
            kind=args.kind,
            progress=args.progress,
            calibrate_with=args.calibrate_with,
        )
    except KeyboardInterrupt:
        print(
            "indexer-merge: interrupted; what was committed stays, rerun to finish", file=sys.stderr
        )
        return 130
    except IndexerError as exc:
        print(f"indexer-merge: error: {exc}", file=sys.stderr)
        return 1
    index = result.get("index") or {}
    summary = {
        k: result[k]
        for k in (
            "sources",
            "tracks_added",
            "tracks_already_present",
            "entries_removed",
            "duplicates",
            "failures",
            "calibration_reference",
        )
    }
    summary["index"] = {k: index[k] for k in ("kind", "n_vectors", "bytes") if k in index} or None
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(merge_main())
