"""``indexer-search-serve``: the search API and web page over an index, next to Triton."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mert_indexer.client.cli import (
    DEFAULT_INDEX,
    add_clip_args,
    add_connection_args,
    connect_options,
    setup_logging,
)
from mert_indexer.client.identify import QueryOptions
from mert_indexer.defaults import add_defaulted, default_of
from mert_indexer.errors import IndexerError
from mert_indexer.service.options import ServiceOptions

log = logging.getLogger("indexer-search-serve")

TOKEN_ENV = "MERT_SEARCH_TOKEN"
MB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexer-search-serve",
        description="Serve an HTTP API (/v1, OpenAPI at /openapi.json) and a web page (/) "
        "that identify clips against an index, embedding them with the model Triton "
        "serves. New index generations are picked up without a restart.",
    )
    add_connection_args(p)
    # A query retries an unavailable Triton briefly, then answers 503 (indexing waits minutes).
    p.set_defaults(deadline=default_of(ServiceOptions, "triton_retry_seconds"))
    p.add_argument(
        "--index", type=Path, default=DEFAULT_INDEX, help="index folder (default: ./%(default)s)"
    )
    p.add_argument(
        "--listen",
        type=_host_port,
        default=(default_of(ServiceOptions, "host"), default_of(ServiceOptions, "port")),
        metavar="HOST:PORT",
        help="address to serve on (default: 127.0.0.1:8080, this machine only; "
        "0.0.0.0:8080 for every interface)",
    )
    add_defaulted(
        p, "--workers", ServiceOptions, "workers", "clips identified at once", type=_positive_int
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=default_of(ServiceOptions, "max_upload_bytes") / MB,
        help="largest request body, in MiB; larger ones get 413 as soon as they pass it "
        "(default: %(default)g)",
    )
    add_clip_args(p)
    add_defaulted(
        p, "--watch-seconds", ServiceOptions, "watch_seconds",
        "how often to look for a new index generation",
    )  # fmt: skip
    add_defaulted(
        p, "--query-priority", ServiceOptions, "query_priority",
        "Triton priority level of query requests (1: highest)", type=_positive_int,
    )  # fmt: skip
    https = p.add_argument_group("HTTPS and access")
    https.add_argument("--ssl-cert", type=Path, help="serve HTTPS with this PEM certificate")
    https.add_argument("--ssl-key", type=Path, help="... and this PEM private key")
    https.add_argument(
        "--token-file",
        type=Path,
        help=f"require 'Authorization: Bearer <token>' on /v1 with the token in this file "
        f"(or in ${TOKEN_ENV})",
    )
    return p


def options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServiceOptions:
    if (args.ssl_cert is None) != (args.ssl_key is None):
        parser.error("--ssl-cert and --ssl-key go together")
    if args.max_upload_mb <= 0 or args.max_clip_seconds <= 0 or args.hop_seconds <= 0:
        parser.error("--max-upload-mb, --max-clip-seconds and --hop-seconds must be positive")
    if args.watch_seconds <= 0:
        parser.error("--watch-seconds must be positive")
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            parser.error(f"--token-file: {exc.strerror}: {args.token_file}")
        if not token:
            parser.error(f"--token-file: {args.token_file} is empty")
    host, port = args.listen
    return ServiceOptions(
        index=args.index,
        host=host,
        port=port,
        workers=args.workers,
        max_upload_bytes=max(1, round(args.max_upload_mb * MB)),
        watch_seconds=args.watch_seconds,
        query_priority=args.query_priority,
        ssl_cert=args.ssl_cert,
        ssl_key=args.ssl_key,
        token=token,
        query=QueryOptions(hop_seconds=args.hop_seconds, max_clip_seconds=args.max_clip_seconds),
        connect=connect_options(args),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = options_from(args, parser)
    setup_logging(args.verbose)

    try:
        if not _is_loopback(options.host) and options.token is None:
            log.warning(
                "listening on %s without a token: anyone who reaches it can query the "
                "index (--token-file, or a reverse proxy that authenticates)",
                options.host,
            )
        from mert_indexer.service.server import serve

        scheme = "https" if options.ssl_cert else "http"
        log.info("serving %s on %s://%s:%d", options.index, scheme, options.host, options.port)
        serve(options)
    except IndexerError as exc:
        print(f"indexer-search-serve: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
