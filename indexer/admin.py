"""``indexer-admin``: maintenance of an index store, one subcommand per job.

    indexer-admin verify --index DIR     catalog vs segments vs the live index generation

Each subcommand is one :class:`Subcommand` in :data:`SUBCOMMANDS`: a name, a
one-line help, a function that adds its arguments and a function that runs it
and returns the exit code. Add one by writing those two functions and one
``register(...)`` call in its own section below; :func:`main` knows nothing
about any of them. Errors of the project (:class:`IndexerError`) become one
line on stderr and exit code 1, as in the other programs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mert_indexer.errors import IndexerError
from mert_indexer.indexer import maintenance as _maintenance

PROG = "indexer-admin"


@dataclass(frozen=True)
class Subcommand:
    """One ``indexer-admin NAME``: its arguments and what it does (returns the exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(command: Subcommand) -> Subcommand:
    if command.name in SUBCOMMANDS:
        raise ValueError(f"{PROG}: subcommand {command.name!r} registered twice")
    SUBCOMMANDS[command.name] = command
    return command


def add_index_arg(p: argparse.ArgumentParser) -> None:
    """``--index DIR``, the store every subcommand works on."""
    p.add_argument("--index", type=Path, required=True, metavar="DIR", help="index store directory")


# -- verify ------------------------------------------------------------------


def _verify_args(p: argparse.ArgumentParser) -> None:
    add_index_arg(p)
    p.add_argument(
        "--no-index",
        action="store_true",
        help="check the catalog and the segments only, not the built index "
        "(a store indexed with --no-build, or one whose last run did not finish)",
    )


def _verify(args: argparse.Namespace) -> int:
    from mert_indexer.indexer.verify import verify_store

    report = verify_store(args.index, check_index=not args.no_index)
    for line in report.notes:
        print(f"{args.index}: note: {line}")
    for line in report.problems:
        print(f"{args.index}: {line}")
    if report.problems:
        print(
            f"{PROG} verify: {len(report.problems)} inconsistencies in {args.index}",
            file=sys.stderr,
        )
        return 1
    print(f"{args.index}: sound ({report.summary})")
    return 0


register(
    Subcommand(
        "verify",
        "check catalog vs segments vs the live index generation; exit 1 on any inconsistency",
        _verify_args,
        _verify,
    )
)


# -- stats, remove, compact, rebuild (indexer/maintenance.py) ----------------

for _name, _help, _add_arguments, _run in _maintenance.SUBCOMMANDS:
    register(Subcommand(_name, _help, _add_arguments, _run))


# -- the program -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Maintain an index store.")
    parser.add_argument("-v", "--verbose", action="store_true")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.run(args)
    except IndexerError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
