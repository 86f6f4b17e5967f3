"""``indexer-query``: which indexed track, and where in it, does each clip come from?"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from client.cli import DEFAULT_INDEX, add_connection_args, connect_options, setup_logging
from client.query import DEFAULT_QUERY_HOP_SECONDS, embed_clip
from client.triton_io import TritonPool
from indexer.errors import DecodeError, IndexerError, ModelMismatchError, QueryError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexer-query",
        description="Find the indexed tracks each clip comes from, with the time offset.")
    add_connection_args(p)
    p.add_argument("--index", type=Path, default=DEFAULT_INDEX,
                   help="index folder (default: ./%(default)s)")
    p.add_argument("--top", type=int, default=5, help="matches per clip (default: %(default)s)")
    p.add_argument("--hop-seconds", type=float, default=DEFAULT_QUERY_HOP_SECONDS,
                   help="hop between the clip's windows (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON array: per clip, its matches best first")
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
    from indexer.search import Searcher

    try:
        searcher = Searcher(args.index)
        pool = TritonPool(connect_options(args))
        try:
            contract = pool.connect()
            if searcher.identity:
                expected = {k: searcher.identity.get(k) for k in contract.identity()}
                if expected != contract.identity():
                    raise ModelMismatchError(
                        f"{args.index} was built with {expected.get('model_id')} "
                        f"(weights {str(expected.get('weights_sha256'))[:12]}); the server "
                        f"serves {contract.model_id} (weights {contract.weights_sha256[:12]})")
            results, failed = [], 0
            for clip in args.clips:
                try:
                    emb, starts = embed_clip(clip, contract, pool.infer,
                                             hop_seconds=args.hop_seconds)
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
        print(json.dumps([[{"track": m.track, "offset_seconds": round(m.offset_seconds, 3),
                            "score": round(m.score, 4)} for m in matches]
                          for _, matches in results], indent=None))
    else:
        for clip, matches in results:
            print(f"{clip}:")
            if not matches:
                print("  no match")
            for rank, m in enumerate(matches, 1):
                print(f"  {rank}. {m.track}  at {_clock(m.offset_seconds)}  "
                      f"(offset {m.offset_seconds:.2f} s, score {m.score:.3f})")
    return 1 if failed else 0


def _clock(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    return f"{int(m)}:{s:05.2f}"


if __name__ == "__main__":
    sys.exit(main())
