"""``indexer-serve``: serve the model repository with the Triton binary bundled in nvidia-pytriton.

Prints one ``ready: ...`` line on stdout once every model is loaded and
warm, then serves until SIGTERM or Ctrl-C, which stop the server and its
stubs in order and exit 0. Any failure is one ``indexer-serve: error:``
line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from mert_indexer.defaults import add_defaulted, default_of
from mert_indexer.errors import IndexerError
from mert_indexer.server.launcher import LocalTriton, ServeOptions, describe_exit

log = logging.getLogger("indexer-serve")


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM, SIGINT or SIGHUP; a BaseException, so no
    ``except Exception`` on the way swallows it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexer-serve",
        description="Serve model_repository/ with the bundled Triton server (Python backend + "
        "ONNX Runtime), with the same batcher and instance settings as the GPU config.",
    )
    add_defaulted(
        p, "--model-repository", ServeOptions, "model_repository", "model repository root"
    )
    p.add_argument(
        "--host",
        default=default_of(ServeOptions, "host"),
        help="address to bind (default: loopback only; 0.0.0.0 to expose)",
    )
    for name in ("grpc_port", "http_port", "metrics_port"):
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=_port, default=default_of(ServeOptions, name))
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=default_of(ServeOptions, "device"),
        help="ONNX Runtime device (default: cuda when available)",
    )
    add_defaulted(
        p, "--ready-timeout", ServeOptions, "ready_timeout",
        "seconds to wait for the models to load and warm up",
    )  # fmt: skip
    p.add_argument(
        "--log-file",
        type=Path,
        help="write the server log here (default: a temp file, "
        "kept and named when the server fails)",
    )
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    p.add_argument(
        "--backend-directory",
        type=Path,
        help="a prepared Triton backend directory (python/ with libtriton_python.so "
        "and the stub) instead of the bundled one",
    )
    p.add_argument("--ssl-cert", type=Path, help="PEM server certificate: serve gRPC over TLS")
    p.add_argument("--ssl-key", type=Path, help="PEM private key for --ssl-cert")
    p.add_argument("-q", "--quiet", action="store_true", help="only the ready line and errors")
    return p


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.ssl_cert) != bool(args.ssl_key):
        parser.error("--ssl-cert and --ssl-key go together")
    if args.ready_timeout <= 0:
        parser.error("--ready-timeout must be positive")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
    )
    options = ServeOptions(
        model_repository=args.model_repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        device=args.device,
        ready_timeout=args.ready_timeout,
        log_file=args.log_file,
        log_verbose=args.log_verbose,
        ssl_cert=args.ssl_cert,
        ssl_key=args.ssl_key,
        backend_directory=args.backend_directory,
    )
    server = LocalTriton(options)

    def on_signal(signum: int, _frame: object) -> None:
        # One stop at a time: later signals wait for the orderly stop (SIGKILL after 20 s).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        server.start()
        for m in server.models:
            c = m.contract
            log.info(
                "serving %s: %s, %d-dim, %.1f s windows at %d Hz, %s, %d instance(s)",
                m.name,
                c.model_id,
                c.embedding_dim,
                c.window_seconds,
                c.sample_rate,
                c.precision,
                m.instances,
            )
        print(
            f"ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}",
            flush=True,
        )
        code = server.wait()
        # The server stopped without being asked to.
        print(
            f"indexer-serve: error: tritonserver {describe_exit(code)}: "
            f"{server.log_excerpt()} (full log: {server.log_path})",
            file=sys.stderr,
        )
        server.stop(keep_log=True)
        return 1
    except _Stop as stop:
        log.info("%s: stopping the server", stop)
        server.stop()
        return 0
    except IndexerError as exc:
        print(f"indexer-serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
