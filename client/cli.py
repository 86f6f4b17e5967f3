"""``indexer-client``: index every audio file under a folder into a FAISS-backed store."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from client.discover import Shard, find_audio
from client.pipeline import Pipeline, PipelineOptions, RunSummary
from client.triton_io import ConnectOptions, TritonPool
from indexer.errors import IndexerError

log = logging.getLogger("indexer-client")

DEFAULT_INDEX = Path("index")


def add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", action="append", metavar="HOST:PORT",
                   help="Triton gRPC endpoint; repeat to spread the load over several "
                        "(default: localhost:8001)")
    p.add_argument("--model-name", default="mert", help="served model name (default: mert)")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="seconds to keep retrying an unavailable server (default: %(default)s)")
    p.add_argument("--ssl", action="store_true", help="gRPC over TLS (system CA roots)")
    p.add_argument("--ssl-ca", type=Path, help="PEM CA certificate to verify the server (implies --ssl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")


def connect_options(args: argparse.Namespace) -> ConnectOptions:
    return ConnectOptions(servers=tuple(args.server or ["localhost:8001"]),
                          model_name=args.model_name, deadline_seconds=args.deadline,
                          ssl=args.ssl, ssl_ca=args.ssl_ca)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexer-client",
        description="Decode audio, embed fixed windows with the served MERT model and add "
                    "them to an index. Reruns skip what is already indexed.")
    add_connection_args(p)
    p.add_argument("--input", action="append", type=Path, required=True, metavar="PATH",
                   help="folder (walked) or file to index; repeatable")
    p.add_argument("--index", type=Path, default=DEFAULT_INDEX,
                   help="index folder, created if absent (default: ./%(default)s)")
    p.add_argument("--hop-seconds", type=float,
                   help="window hop (default: the window length, no overlap)")
    p.add_argument("--workers", type=int, help="decoding threads (default: CPU count)")
    p.add_argument("--batch-size", type=int,
                   help="windows per request (default: from the served config, at most 16)")
    p.add_argument("--in-flight", type=int,
                   help="requests in flight (default: 2 per server + 2)")
    p.add_argument("--shard", type=Shard.parse, metavar="i/N",
                   help="index only shard i of N (deterministic split by path)")
    p.add_argument("--prune", action="store_true",
                   help="remove tracks whose files are gone from the index")
    p.add_argument("--no-build", action="store_true",
                   help="store embeddings but do not rebuild the FAISS index")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("workers", "batch_size", "in_flight"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.hop_seconds is not None and args.hop_seconds <= 0:
        parser.error("--hop-seconds must be positive")
    setup_logging(args.verbose)
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print("indexer-client: interrupted; completed tracks are saved, rerun to continue",
              file=sys.stderr)
        return 130
    except IndexerError as exc:
        print(f"indexer-client: error: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0 if summary.ok else 1


def run(args: argparse.Namespace) -> RunSummary:
    from indexer.store import IndexStore

    files = find_audio(args.input, args.shard)
    pool = TritonPool(connect_options(args))
    try:
        contract = pool.connect()
        window = contract.window_samples
        hop = round(args.hop_seconds * contract.sample_rate) if args.hop_seconds else window
        if hop > window:
            raise IndexerError(f"--hop-seconds {args.hop_seconds} exceeds the window "
                               f"({contract.window_seconds} s): audio would be skipped")
        identity = contract.identity() | {"hop_samples": hop}
        summary = RunSummary()
        with IndexStore.open(args.index, identity, create=True) as store:
            plan = store.plan([c.path for c in files])
            store.apply(plan)
            summary.unchanged = len(plan.unchanged)
            summary.renamed = len(plan.renamed)
            summary.duplicates = len(plan.duplicates)
            log.info("%d file(s): %d to index, %d unchanged, %d renamed, %d duplicate(s)",
                     len(files), len(plan.todo), len(plan.unchanged), len(plan.renamed),
                     len(plan.duplicates))
            if args.prune and plan.gone:
                summary.pruned = store.prune(plan.gone)
            options = PipelineOptions(
                hop_samples=hop,
                decode_workers=args.workers or os.cpu_count() or 2,
                batch_size=args.batch_size or max(1, min(contract.max_batch_size or 1, 16)),
                in_flight=args.in_flight or 2 * len(pool.endpoints) + 2,
                progress=not args.no_progress,
            )
            Pipeline(contract, pool.infer, store, options).run(plan.todo, summary)
            if not args.no_build:
                info = store.build_index(progress=not args.no_progress)
                log.info("index: %s", info)
        return summary
    finally:
        pool.close()


def print_summary(s: RunSummary) -> None:
    hours = s.audio_seconds / 3600
    print(f"indexed {s.indexed} track(s) ({s.windows} windows, {hours:.2f} h of audio) in "
          f"{s.wall_seconds:.1f} s: {s.tracks_per_hour:.0f} tracks/hour, "
          f"{s.audio_seconds / s.wall_seconds if s.wall_seconds else 0:.0f}x realtime")
    print(f"unchanged {s.unchanged}, renamed {s.renamed}, duplicates {s.duplicates}, "
          f"pruned {s.pruned}, skipped {len(s.skipped)}, failed {len(s.failed)}")
    for path, reason in s.skipped:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    for path, reason in s.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
