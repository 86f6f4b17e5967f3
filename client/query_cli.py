"""``indexer-query``: which indexed track, and where in it, does each clip come from?"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mert_indexer.client.cli import (
    DEFAULT_INDEX,
    add_connection_args,
    connect_options,
    setup_logging,
)
from mert_indexer.client.query import DEFAULT_QUERY_HOP_SECONDS, embed_clip
from mert_indexer.client.triton_io import TritonPool
from mert_indexer.errors import DecodeError, IndexerError, ModelMismatchError, QueryError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexer-query",
        description="Find the indexed tracks each clip comes from, with the time offset.",
    )
    add_connection_args(p)
    p.add_argument(
        "--index", type=Path, default=DEFAULT_INDEX, help="index folder (default: ./%(default)s)"
    )
    p.add_argument("--top", type=int, default=5, help="matches per clip (default: %(default)s)")
    p.add_argument(
        "--hop-seconds",
        type=float,
        default=DEFAULT_QUERY_HOP_SECONDS,
        help="hop between the clip's windows (default: %(default)s)",
    )
    p.add_argument(
        "--min-score",
        type=_min_score,
        default=None,
        metavar="SCORE|off",
        help="answer 'no match' below this score (default: the index's documented "
        "threshold); 'off' ranks best guesses without a threshold",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON array: per clip, its matches best first"
    )
    p.add_argument("clips", nargs="+", type=Path, metavar="CLIP")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    if args.hop_seconds <= 0:
        parser.error("--hop-seconds must be positive")
    setup_logging(args.verbose)
    from mert_indexer.indexer.search import Searcher, SearchOptions

    options = SearchOptions()
    if args.min_score is not None:
        options = dataclasses.replace(
            options, min_score=None if args.min_score == "off" else args.min_score
        )
    try:
        searcher = Searcher(args.index, options=options)
        pool = TritonPool(connect_options(args))
        try:
            contract = pool.connect()
            if searcher.identity:
                expected = {k: searcher.identity.get(k) for k in contract.identity()}
                if expected != contract.identity():
                    raise ModelMismatchError(
                        f"{args.index} was built with {expected.get('model_id')} "
                        f"(weights {str(expected.get('weights_sha256'))[:12]}); the server "
                        f"serves {contract.model_id} (weights {contract.weights_sha256[:12]})"
                    )
            results, failed = [], 0
            for clip in args.clips:
                try:
                    emb, starts = embed_clip(
                        clip, contract, pool.infer, hop_seconds=args.hop_seconds
                    )
                    matches = searcher.search(emb, starts, top=args.top)
                except (DecodeError, QueryError) as exc:
                    print(f"indexer-query: error: {exc}", file=sys.stderr)
                    failed += 1
                    matches = []
                results.append((clip, matches))
        finally:
            pool.close()
    except IndexerError as exc:
        print(f"indexer-query: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                [
                    [
                        {
                            "track": m.track,
                            "offset_seconds": round(m.offset_seconds, 3),
                            "score": round(m.score, 4),
                        }
                        for m in matches
                    ]
                    for _, matches in results
                ],
                indent=None,
            )
        )
    else:
        for clip, matches in results:
            print(f"{clip}:")
            if not matches:
                print("  no match")
            for rank, m in enumerate(matches, 1):
                print(
                    f"  {rank}. {m.track}  at {_clock(m.offset_seconds)}  "
                    f"(offset {m.offset_seconds:.2f} s, score {m.score:.3f})"
                )
    return 1 if failed else 0


def _min_score(text: str) -> float | str:
    if text == "off":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("the score is between 0 and 1")
    return value


def _clock(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    return f"{int(m)}:{s:05.2f}"


if __name__ == "__main__":
    sys.exit(main())
