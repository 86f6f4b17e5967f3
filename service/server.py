"""Serve the app with uvicorn: in the foreground (the CLI) or on a thread (tests, benchmarks)."""

from __future__ import annotations

import threading
import time

from mert_indexer.errors import ConfigError
from mert_indexer.service.options import ServiceOptions
from mert_indexer.service.runtime import SearchService


def _uvicorn_config(service: SearchService, *, port: int | None = None) -> object:
    try:
        import uvicorn
    except ImportError as exc:  # the [service] extra
        raise ConfigError(
            f"the search service needs its extra: pip install 'mert-indexer[service]' ({exc})"
        ) from exc
    from mert_indexer.service.app import create_app

    o: ServiceOptions = service.options
    return uvicorn.Config(
        create_app(service),
        host=o.host,
        port=o.port if port is None else port,
        ssl_certfile=str(o.ssl_cert) if o.ssl_cert else None,
        ssl_keyfile=str(o.ssl_key) if o.ssl_key else None,
        log_config=None,  # the CLI configures logging; a library never does
        access_log=False,
        timeout_graceful_shutdown=30,
    )


def serve(options: ServiceOptions) -> None:
    """Serve until interrupted (SIGINT/SIGTERM: in-flight requests finish first)."""
    import uvicorn

    config = _uvicorn_config(SearchService(options))
    assert isinstance(config, uvicorn.Config)
    uvicorn.Server(config).run()


class ServiceThread:
    """The service on a background thread of this process, as a context manager.

    ``url`` is its base URL once started (port 0 in the options picks a free one).
    """

    def __init__(self, options: ServiceOptions, service: SearchService | None = None) -> None:
        import uvicorn

        self.service = service or SearchService(options)
        config = _uvicorn_config(self.service)
        assert isinstance(config, uvicorn.Config)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)
        scheme = "https" if options.ssl_cert else "http"
        self._scheme = scheme
        self.url = ""

    def start(self, timeout: float = 60.0) -> ServiceThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the search service did not start")
            time.sleep(0.02)
        (sock,) = self._server.servers[0].sockets
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        self.url = f"{self._scheme}://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)

    def __enter__(self) -> ServiceThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
