"""``indexer-client``: index every audio file under a folder into a FAISS-backed store."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from mert_indexer.client.decode import check_readable
from mert_indexer.client.discover import Shard, find_audio
from mert_indexer.client.identify import QueryOptions
from mert_indexer.client.pipeline import Pipeline, PipelineOptions
from mert_indexer.client.report import RunSummary, display, summary_lines
from mert_indexer.client.transport import BatchSender, make_sender
from mert_indexer.client.triton_io import DEFAULT_SERVER, ConnectOptions, TritonPool, is_local
from mert_indexer.client.tuning import choose
from mert_indexer.defaults import add_defaulted, default_of
from mert_indexer.errors import ConfigError, DecodeError, IndexerError, ServerUnavailableError

log = logging.getLogger("indexer-client")

DEFAULT_INDEX = Path("index")


def add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        action="append",
        metavar="HOST:PORT",
        help="Triton gRPC endpoint; repeat to spread the load over several "
        f"(default: {DEFAULT_SERVER})",
    )
    add_defaulted(p, "--model-name", ConnectOptions, "model_name", "served model name")
    add_defaulted(
        p, "--deadline", ConnectOptions, "deadline_seconds",
        "seconds to keep retrying an unavailable server",
    )  # fmt: skip
    add_defaulted(
        p, "--request-timeout", ConnectOptions, "request_timeout",
        "seconds one request may take, queueing included",
    )  # fmt: skip
    p.add_argument("--ssl", action="store_true", help="gRPC over TLS (system CA roots)")
    p.add_argument(
        "--ssl-ca", type=Path, help="PEM CA certificate to verify the server (implies --ssl)"
    )
    p.add_argument("-v", "--verbose", action="store_true")


def add_clip_args(p: argparse.ArgumentParser) -> None:
    """How a query clip is cut: the flags ``indexer-query`` and the search service share."""
    add_defaulted(p, "--hop-seconds", QueryOptions, "hop_seconds", "hop between a clip's windows")
    add_defaulted(
        p, "--max-clip-seconds", QueryOptions, "max_clip_seconds",
        "refuse clips longer than this, without decoding the rest",
    )  # fmt: skip


def connect_options(args: argparse.Namespace) -> ConnectOptions:
    return ConnectOptions(
        servers=tuple(args.server or [DEFAULT_SERVER]),
        model_name=args.model_name,
        deadline_seconds=args.deadline,
        request_timeout=args.request_timeout,
        ssl=args.ssl,
        ssl_ca=args.ssl_ca,
    )


def setup_logging(verbose: bool) -> None:
    # Undecodable file names (surrogate escapes) must never crash a print or a log line.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader narrates every import


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexer-client",
        description="Decode audio, embed fixed windows with the served MERT model and add "
        "them to an index. Reruns skip what is already indexed. Exits 1 if any "
        "file was skipped or failed (each is named with its reason).",
    )
    add_connection_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--input",
        action="append",
        type=Path,
        required=True,
        metavar="PATH",
        help="folder (walked) or file to index; repeatable",
    )
    p.add_argument(
        "--index",
        type=Path,
        default=DEFAULT_INDEX,
        help="index folder, created if absent (default: ./%(default)s)",
    )
    p.add_argument(
        "--hop-seconds",
        type=float,
        help="window hop (default: the window length, no overlap; half the "
        "window gives 50%% overlap)",
    )
    tuning = p.add_argument_group(
        "sizing (default: chosen from this machine and the served model's config)"
    )
    tuning.add_argument("--workers", type=int, help="decoding threads (default: usable cores)")
    tuning.add_argument(
        "--pyav-processes",
        type=int,
        help="processes decoding files only FFmpeg reads, e.g. m4a "
        "(default: as many as --workers; 0 decodes them in the threads)",
    )
    tuning.add_argument(
        "--batch-size",
        type=int,
        help="windows per request (default: 16, at most the model's max_batch_size)",
    )
    tuning.add_argument(
        "--in-flight",
        type=int,
        help="requests in flight over all servers (default: two server batches per model instance)",
    )
    p.add_argument(
        "--shm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send batches through system shared memory (needs every --server on "
        "this host; default: on when they are)",
    )
    p.add_argument(
        "--shard",
        type=Shard.parse,
        metavar="i/N",
        help="index only shard i of N (deterministic split by path)",
    )
    p.add_argument(
        "--prune", action="store_true", help="remove tracks whose files are gone from the index"
    )
    p.add_argument(
        "--no-build",
        action="store_true",
        help="store embeddings but do not update the FAISS index",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="train the FAISS index anew over every track (default: add new tracks to the "
        "trained index, retraining only when the catalogue grew 4x or outgrew the exact index)",
    )
    p.add_argument(
        "--calibrate-with",
        metavar="INDEX",
        help="an index of music this catalogue does not hold, embedded by the same model at "
        "the same hop (indexer-client --input OTHER --index INDEX): the no-match threshold is "
        "calibrated against it too, from this build on; what a catalogue of one or a few "
        "tracks needs. Recorded in the index ('none' forgets it)",
    )
    p.add_argument(
        "--max-track-hours",
        type=float,
        default=default_of(PipelineOptions, "max_track_seconds") / 3600,
        help="longest track indexed; a longer one is named and counted as failed "
        "(a cap on broken or hostile files; default: %(default)g)",
    )
    p.add_argument(
        "--commit-seconds",
        type=float,
        default=default_of(PipelineOptions, "commit_every_seconds"),
        help="make completed tracks durable at least this often; what a crash "
        "can cost (default: %(default)s; 0: after every track)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("workers", "batch_size", "in_flight"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.pyav_processes is not None and args.pyav_processes < 0:
        parser.error("--pyav-processes must be 0 or more")
    if args.hop_seconds is not None and args.hop_seconds <= 0:
        parser.error("--hop-seconds must be positive")
    if args.commit_seconds < 0:
        parser.error("--commit-seconds must be 0 or more")
    if args.rebuild and args.no_build:
        parser.error("--rebuild and --no-build exclude each other")
    if not args.max_track_hours > 0:
        parser.error("--max-track-hours must be positive")
    if args.deadline <= 0 or args.request_timeout <= 0:
        parser.error("--deadline and --request-timeout must be positive")
    if args.shm:
        remote = [s for s in args.server or [DEFAULT_SERVER] if not is_local(s)]
        if remote:
            parser.error(f"--shm needs every server on this host; not local: {', '.join(remote)}")
    setup_logging(args.verbose)
    # FAISS's OpenMP threads spin while idle; on shared cores that slows index builds ~10x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print(
            "indexer-client: interrupted; completed tracks are saved, rerun to continue",
            file=sys.stderr,
        )
        return 130
    except IndexerError as exc:
        print(f"indexer-client: error: {display(str(exc))}", file=sys.stderr)
        return 1
    out, err = summary_lines(summary)
    for line in out:
        print(line)
    for line in err:
        print(line, file=sys.stderr)
    return 0 if summary.ok else 1


def run(args: argparse.Namespace) -> RunSummary:
    from mert_indexer.indexer.reference import NO_REFERENCE
    from mert_indexer.indexer.store import IndexStore

    started = time.monotonic()
    files = find_audio(args.input, args.shard)
    pool = TritonPool(connect_options(args))
    try:
        contract = pool.connect()
        served = pool.served
        assert served is not None
        window = contract.window_samples
        hop = round(args.hop_seconds * contract.sample_rate) if args.hop_seconds else window
        if hop > window:
            raise ConfigError(
                f"--hop-seconds {args.hop_seconds} exceeds the window "
                f"({contract.window_seconds} s): audio would be skipped"
            )
        if args.batch_size and served.max_batch_size and args.batch_size > served.max_batch_size:
            raise ConfigError(
                f"--batch-size {args.batch_size} exceeds the served model's "
                f"max_batch_size {served.max_batch_size}"
            )
        window_bytes = window * (2 if contract.input_dtype == "int16" else 4)
        sizing = choose(
            served,
            window_bytes,
            workers=args.workers,
            pyav_processes=args.pyav_processes,
            batch_size=args.batch_size,
            in_flight=args.in_flight,
        )
        use_shm = pool.all_local if args.shm is None else args.shm
        log.info(
            "%s: model %s (%s, %s input), %d instance(s); %d decode thread(s), "
            "%d window(s) per request, %d in flight, %s",
            ", ".join(pool.endpoints),
            contract.model_id,
            contract.precision,
            contract.input_dtype,
            served.total_instances,
            sizing.decode_workers,
            sizing.batch_size,
            sizing.in_flight,
            "shared memory" if use_shm else "gRPC payloads",
        )
        identity = contract.identity() | {"hop_samples": hop}
        summary = RunSummary()
        with IndexStore.open(args.index, identity, create=True) as store:
            if args.calibrate_with is not None:
                wanted = None if args.calibrate_with == NO_REFERENCE else args.calibrate_with
                if store.set_calibration_reference(wanted):
                    log.info("no-match calibration against: %s", wanted or "the catalogue alone")
            plan = _plan(store, [c.path for c in files], summary, args.input)
            store.apply(plan)
            summary.unchanged = len(plan.unchanged)
            summary.renamed = len(plan.renamed)
            summary.duplicates = len(plan.duplicates)
            # Not readable this time (stat or read failed, not a regular file): transient. The
            # store keeps what it indexed for the file; the run names it and exits 1; the next
            # run tries again. Only --prune removes tracks, and only of files that are gone.
            for path, reason in plan.unreadable:
                reason = _unreadable_reason(path, reason)
                if store.status(path) is not None:
                    reason += " (its indexed entry is kept; retried next run)"
                summary.failed.append((path, reason))
                store.record_failure(path, reason, transient=True)
            log.info(
                "%d file(s): %d to index, %d unchanged, %d renamed, %d duplicate(s)",
                len(files),
                len(plan.todo),
                len(plan.unchanged),
                len(plan.renamed),
                len(plan.duplicates),
            )
            if args.prune and plan.gone:
                summary.pruned = store.prune(plan.gone)
            if plan.todo:
                sender = _sender(
                    pool,
                    sizing.in_flight,
                    sizing.batch_size,
                    use_shm,
                    explicit=args.shm is not None,
                )
                try:
                    options = PipelineOptions(
                        hop_samples=hop,
                        decode_workers=sizing.decode_workers,
                        pyav_processes=sizing.pyav_processes,
                        commit_every_seconds=args.commit_seconds,
                        progress=not args.no_progress,
                        max_track_seconds=args.max_track_hours * 3600,
                    )
                    Pipeline(contract, sender, store, options).run(plan.todo, summary)
                finally:
                    sender.close()
            store.commit()  # the unreadable files' failures, also when nothing was to do
            if not args.no_build:
                info = store.build_index(progress=not args.no_progress, rebuild=args.rebuild)
                log.info(
                    "index: %s, %d vectors of %d tracks, %.0f bytes/vector",
                    info.get("kind"),
                    info.get("n_vectors", 0),
                    info.get("n_tracks", 0),
                    info.get("bytes_per_vector", 0.0),
                )
        # The whole run, hashing and index build included: what tracks/hour means to a user.
        summary.wall_seconds = time.monotonic() - started
        return summary
    finally:
        pool.close()


def _plan(store: Any, paths: list[str], summary: RunSummary, roots: list[Path]) -> Any:
    """The store's plan; names it cannot record (not UTF-8) are reported, not fatal.

    ``roots`` (the run's inputs) bound what ``--prune`` may remove.
    """
    try:
        return store.plan(paths, roots)
    except UnicodeEncodeError:
        pass
    storable = [p for p in paths if _utf8(p)]
    summary.failed += [
        (p, "file name is not valid UTF-8 and this index store cannot record it (rename the file)")
        for p in paths
        if not _utf8(p)
    ]
    return store.plan(storable, roots)


def _unreadable_reason(path: str, fallback: str) -> str:
    """Why the store could not read ``path``, in the decoder's words when it knows better."""
    try:
        check_readable(path)
    except DecodeError as exc:
        return exc.reason
    return fallback


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sender(
    pool: TritonPool, slots: int, batch_size: int, shm: bool, *, explicit: bool
) -> BatchSender:
    """The transport; automatic shared memory falls back to gRPC if the server cannot map it."""
    if not shm:
        return make_sender(pool, slots=slots, batch_size=batch_size, shm=False)
    try:
        return make_sender(pool, slots=slots, batch_size=batch_size, shm=True)
    except (ServerUnavailableError, ConfigError) as exc:
        if explicit:
            raise
        log.warning("shared memory unavailable (%s); sending batches over gRPC", exc)
        return make_sender(pool, slots=slots, batch_size=batch_size, shm=False)


if __name__ == "__main__":
    sys.exit(main())
