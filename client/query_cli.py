"""``indexer-query``: which indexed track, and where in it, does each clip come from?"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mert_indexer.client.cli import (
    DEFAULT_INDEX,
    add_clip_args,
    add_connection_args,
    connect_options,
    setup_logging,
)
from mert_indexer.client.identify import (
    INDEX_THRESHOLD,
    Identifier,
    MinScore,
    QueryOptions,
)
from mert_indexer.client.triton_io import TritonPool
from mert_indexer.defaults import add_defaulted
from mert_indexer.errors import DecodeError, IndexerError, QueryError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexer-query",
        description="Find the indexed tracks each clip comes from, with the time offset.",
    )
    add_connection_args(p)
    # Accepted, and ignored, for scripts that pass indexer-client's flags to both
    # programs: a query shows no progress bar.
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--index", type=Path, default=DEFAULT_INDEX, help="index folder (default: ./%(default)s)"
    )
    add_defaulted(p, "--top", QueryOptions, "top", "matches per clip")
    add_clip_args(p)
    p.add_argument(
        "--min-score",
        type=_min_score,
        default=None,
        metavar="SCORE|off",
        help="answer 'no match' below this score (default: the index's own, "
        "calibrated when it was built); 'off' ranks best guesses without a threshold",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON array: per clip, its matches best first"
    )
    # Track similarity (mert_indexer.indexer.similarity): rankings, not identification.
    p.add_argument(
        "--similar",
        action="append",
        metavar="TRACK",
        help="rank the catalogue tracks most like TRACK (its catalogue path or id), "
        "itself and its identical copies left out; repeatable; needs no server",
    )
    p.add_argument(
        "--similar-to",
        action="append",
        type=Path,
        metavar="CLIP",
        help="rank the catalogue tracks most like an audio clip (not identification); repeatable",
    )
    p.add_argument("clips", nargs="*", type=Path, metavar="CLIP")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    if args.hop_seconds <= 0:
        parser.error("--hop-seconds must be positive")
    if args.max_clip_seconds <= 0:
        parser.error("--max-clip-seconds must be positive")
    modes = sum(bool(m) for m in (args.clips, args.similar, args.similar_to))
    if modes != 1:
        parser.error("give clips to identify, or --similar TRACK, or --similar-to CLIP (one kind)")
    if (args.similar or args.similar_to) and args.min_score is not None:
        parser.error("--min-score applies to identification only")
    setup_logging(args.verbose)
    if args.similar or args.similar_to:
        return _similar_main(args)
    from mert_indexer.indexer.search import Match, Searcher

    options = QueryOptions(
        hop_seconds=args.hop_seconds, top=args.top, max_clip_seconds=args.max_clip_seconds
    )
    min_score: MinScore = INDEX_THRESHOLD
    if args.min_score is not None:
        min_score = None if args.min_score == "off" else args.min_score
    results: list[tuple[Path, tuple[Match, ...]]] = []
    failed = 0
    try:
        with Searcher(args.index) as searcher:
            pool = TritonPool(connect_options(args))
            try:
                identifier = Identifier(searcher, pool.connect(), pool.infer, options)
                for clip in args.clips:
                    try:
                        matches = identifier.identify(clip, min_score=min_score).matches
                    except (DecodeError, QueryError) as exc:
                        print(f"indexer-query: error: {exc}", file=sys.stderr)
                        failed += 1
                        matches = ()
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


def _similar_main(args: argparse.Namespace) -> int:
    """``--similar`` / ``--similar-to``: per query, the most similar tracks, best first."""
    from mert_indexer.client.identify import check_identity, embed_source
    from mert_indexer.indexer.similarity import SimilarTrack, TrackFinder

    results: list[tuple[str, list[SimilarTrack]]] = []
    failed = 0
    try:
        with TrackFinder.open(args.index) as finder:
            if args.similar:
                for track in args.similar:
                    try:
                        results.append((track, finder.similar(track, top=args.top)))
                    except QueryError as exc:
                        print(f"indexer-query: error: {exc}", file=sys.stderr)
                        failed += 1
                        results.append((track, []))
            else:
                options = QueryOptions(
                    hop_seconds=args.hop_seconds, max_clip_seconds=args.max_clip_seconds
                )
                pool = TritonPool(connect_options(args))
                try:
                    contract = pool.connect()
                    check_identity(finder.identity, contract, index=args.index)
                    for clip in args.similar_to:
                        try:
                            _, emb, _ = embed_source(clip, contract, pool.infer, options)
                            results.append((str(clip), finder.similar_to(emb, top=args.top)))
                        except (DecodeError, QueryError) as exc:
                            print(f"indexer-query: error: {exc}", file=sys.stderr)
                            failed += 1
                            results.append((str(clip), []))
                finally:
                    pool.close()
    except IndexerError as exc:
        print(f"indexer-query: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([[{"track": t.track, "score": t.score} for t in r] for _, r in results]))
    else:
        for query, ranked in results:
            print(f"{query}:")
            if not ranked:
                print("  nothing")
            for rank, t in enumerate(ranked, 1):
                print(f"  {rank}. {t.track}  (id {t.track_id}, score {t.score:.3f})")
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
