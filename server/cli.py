"""``indexer-serve``: serve the model repository with the Triton binary bundled in nvidia-pytriton."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from indexer.errors import IndexerError
from server.launcher import LocalTriton, ServeOptions

log = logging.getLogger("indexer-serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexer-serve",
        description="Serve model_repository/ with the bundled Triton server (Python backend + "
                    "ONNX Runtime), with the same batcher and instance settings as the GPU config.",
    )
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                   help="model repository root (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: loopback only; 0.0.0.0 to expose)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime device (default: cuda when available)")
    p.add_argument("--ready-timeout", type=float, default=180.0,
                   help="seconds to wait for the model to load (default: %(default)s)")
    p.add_argument("--log-file", type=Path, help="write the server log here")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--ssl-cert", type=Path, help="PEM server certificate: serve gRPC over TLS")
    p.add_argument("--ssl-key", type=Path, help="PEM private key for --ssl-cert")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.ssl_cert) != bool(args.ssl_key):
        parser.error("--ssl-cert and --ssl-key go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    options = ServeOptions(
        model_repository=args.model_repository, host=args.host, grpc_port=args.grpc_port,
        http_port=args.http_port, metrics_port=args.metrics_port, device=args.device,
        ready_timeout=args.ready_timeout, log_file=args.log_file, log_verbose=args.log_verbose,
        ssl_cert=args.ssl_cert, ssl_key=args.ssl_key,
    )
    server = LocalTriton(options)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        for m in server.models:
            c = m.contract
            log.info("serving %s: %s, %d-dim, %.1f s windows at %d Hz, %s, %d instance(s)",
                     m.name, c.model_id, c.embedding_dim, c.window_seconds, c.sample_rate,
                     c.precision, m.instances)
        print(f"ready: gRPC {server.grpc_url}  HTTP {server.http_url}  "
              f"metrics {server.metrics_url}", flush=True)
        code = server.wait()
        if code != 0:
            print(f"indexer-serve: error: tritonserver exited with code {code}", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        log.info("stopping")
        server.stop()
        return 0
    except IndexerError as exc:
        print(f"indexer-serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
