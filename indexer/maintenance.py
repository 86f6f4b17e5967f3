"""``indexer-admin`` subcommands that maintain a store: stats, remove, compact, rebuild.

Each is an (arguments, run) pair in :data:`SUBCOMMANDS`, registered by
:mod:`mert_indexer.indexer.admin`; the work itself is done by
:class:`mert_indexer.indexer.store.IndexStore` (``remove``, ``compact``,
``build_index``). Argument parsing stays here and in ``admin.py``; errors of the
project reach ``admin.main``, which prints them as one line and exits 1.

    indexer-admin stats   --index DIR [--json]
    indexer-admin remove  --index DIR [PATH ...] [--id N ...] [--no-compact]
    indexer-admin compact --index DIR
    indexer-admin rebuild --index DIR [--kind auto|exact|ivfpq]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mert_indexer.errors import ConfigError

Run = Callable[[argparse.Namespace], int]


def _index_arg(p: argparse.ArgumentParser) -> None:
    from mert_indexer.indexer.admin import add_index_arg

    add_index_arg(p)


def _progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="progress bars on long work (default: when stderr is a terminal)",
    )


def _open(index: Path, *, write: bool) -> Any:
    from mert_indexer.indexer.store import IndexStore

    return IndexStore.open(index, None, create=False, read_only=not write)


# -- stats -------------------------------------------------------------------


def store_stats(index: Path) -> dict[str, Any]:
    """What ``stats --json`` prints: counts, the index's kind and history, bytes (disk, RAM)."""
    from mert_indexer.indexer.compaction import COMPACT_DEAD_FRACTION
    from mert_indexer.indexer.generation import INDEX_DIR

    with _open(index, write=False) as store:
        s = store.stats()
    info = s.get("index") or {}
    catalog_bytes = sum(p.stat().st_size for p in index.glob("catalog.sqlite*"))
    index_bytes = sum(p.stat().st_size for p in (index / INDEX_DIR).rglob("*") if p.is_file())
    stored = int(s["stored_rows"])
    return {
        "tracks": s["tracks"],
        "windows": s["windows"],
        "dead_windows": s["dead_windows"],
        "dead_fraction": round(s["dead_windows"] / stored, 4) if stored else 0.0,
        "compaction_threshold": COMPACT_DEAD_FRACTION,
        "duplicates": s["duplicates"],
        "failures": s["failures"],
        "segments": s["segments"],
        "index_kind": info.get("kind"),
        "index_generation": info.get("generation"),
        "index_windows": info.get("n_vectors"),
        "index_factory": (info.get("params") or {}).get("factory"),
        "trained_on": info.get("trained_on"),
        "trained_windows": info.get("trained_windows"),
        "trained_at": info.get("trained_at"),
        "increments_since_training": info.get("increments"),
        "tombstones": len(info.get("tombstones", [])),
        "bytes_on_disk": {
            "segments": s["segment_bytes"],
            "catalog": catalog_bytes,
            "index": index_bytes,
            "total": s["segment_bytes"] + catalog_bytes + index_bytes,
        },
        # A search loads the generation's files whole and memory-maps the segments.
        "bytes_in_ram": {"index": info.get("ram_bytes"), "segments": "memory-mapped"},
    }


def _stats_args(p: argparse.ArgumentParser) -> None:
    _index_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _stats(args: argparse.Namespace) -> int:
    st = store_stats(args.index)
    if args.json:
        print(json.dumps(st, sort_keys=True))
        return 0
    disk, ram = st["bytes_on_disk"], st["bytes_in_ram"]
    lines = [
        f"tracks          {st['tracks']:,}",
        f"windows         {st['windows']:,} live, {st['dead_windows']:,} dead "
        f"({100 * st['dead_fraction']:.1f} %; compaction above "
        f"{100 * st['compaction_threshold']:.0f} %)",
        f"index           {st['index_kind'] or 'none built'}"
        + (
            f" ({st['index_factory'] or 'flat'}), generation {st['index_generation']}, "
            f"{st['index_windows']:,} windows"
            if st["index_kind"]
            else ""
        ),
    ]
    if st["index_kind"]:
        lines.append(
            f"trained         on {st['trained_on']:,} windows of a "
            f"{st['trained_windows']:,}-window catalogue; "
            f"{st['increments_since_training']} increment(s) since"
        )
        lines.append(f"in RAM (search) {_mib(ram['index'])} + memory-mapped segments")
    lines.append(
        f"on disk         {_mib(disk['total'])} (segments {_mib(disk['segments'])}, "
        f"catalog {_mib(disk['catalog'])}, index {_mib(disk['index'])})"
    )
    print("\n".join(lines))
    return 0


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:,.1f} MiB"


# -- remove ------------------------------------------------------------------


def _remove_args(p: argparse.ArgumentParser) -> None:
    _index_arg(p)
    p.add_argument("paths", nargs="*", metavar="PATH", help="paths of tracks to remove")
    p.add_argument(
        "--id", type=int, action="append", default=[], metavar="N", help="a catalog track id"
    )
    p.add_argument(
        "--no-compact",
        action="store_true",
        help="do not compact afterwards, even above the dead-row threshold",
    )
    _progress_arg(p)


def _remove(args: argparse.Namespace) -> int:
    from mert_indexer.indexer.compaction import COMPACT_DEAD_FRACTION

    if not args.paths and not args.id:
        raise ConfigError("remove: name at least one PATH or --id N")
    with _open(args.index, write=True) as store:
        done = store.remove(args.paths, args.id, progress=args.progress)
        for path in done["removed_tracks"]:
            print(f"removed {path}")
        print(
            f"{len(done['removed_tracks'])} track(s), {done['removed_windows']:,} windows "
            "removed; no longer searchable"
        )
        if not args.no_compact:
            c = store.compact(min_dead_fraction=COMPACT_DEAD_FRACTION, progress=args.progress)
            if c["compacted"]:
                print(f"compacted: {c['dead_rows']:,} dead rows freed")
    missing = [f"no such track: {p}" for p in done["unknown_paths"]]
    missing += [f"no track with id {i}" for i in done["unknown_ids"]]
    for line in missing:
        print(f"indexer-admin remove: {line}", file=sys.stderr)
    return 1 if missing else 0


# -- compact -----------------------------------------------------------------


def _compact_args(p: argparse.ArgumentParser) -> None:
    _index_arg(p)
    _progress_arg(p)


def _compact(args: argparse.Namespace) -> int:
    with _open(args.index, write=True) as store:
        c = store.compact(progress=args.progress)
    if c["compacted"]:
        print(
            f"compacted {c['segments_rewritten']} segment(s): {c['rows_copied']:,} live windows "
            f"copied, {c['dead_rows']:,} dead freed"
        )
    else:
        print("nothing to compact: no dead windows")
    return 0


# -- rebuild -----------------------------------------------------------------


def _rebuild_args(p: argparse.ArgumentParser) -> None:
    _index_arg(p)
    p.add_argument(
        "--kind",
        choices=("auto", "exact", "ivfpq"),
        default="auto",
        help="index kind (default: auto, by size: exact up to the limit, else IVF-PQ)",
    )
    _progress_arg(p)


def _rebuild(args: argparse.Namespace) -> int:
    with _open(args.index, write=True) as store:
        info = store.build_index(kind=args.kind, rebuild=True, progress=args.progress)
    print(
        f"rebuilt: {info['kind']} index, generation {info['generation']}, "
        f"{info['n_vectors']:,} windows, trained on {info['trained_on']:,}"
    )
    return 0


SUBCOMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None], Run], ...] = (
    (
        "stats",
        "tracks, windows, dead windows, the index's kind and training, bytes on disk and in RAM",
        _stats_args,
        _stats,
    ),
    (
        "remove",
        "remove tracks by path or catalog id from the catalog and the index, at once",
        _remove_args,
        _remove,
    ),
    (
        "compact",
        "rewrite segments without their dead windows (crash-safe)",
        _compact_args,
        _compact,
    ),
    (
        "rebuild",
        "train the index anew over every track (--kind to change its kind)",
        _rebuild_args,
        _rebuild,
    ),
)
