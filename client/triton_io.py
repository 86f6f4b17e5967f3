"""Talk to one or more Triton servers over gRPC: readiness, the model contract, inference.

Before anything is sent, the model's config is read from the server and
checked (``ModelContract``); every endpoint must serve the same model. Each
request goes to the endpoint with the fewest requests in flight; transient
failures (server unavailable, restarting, deadline) are retried with
exponential backoff, on any endpoint, until the run's deadline; a request the
server refuses as invalid fails at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.contract import ModelContract, config_from_json
from indexer.errors import InferenceError, ModelContractError, ServerUnavailableError

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({
    "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED", "StatusCode.CANCELLED", "StatusCode.UNKNOWN",
})
# Triton answers a request for a model that is (re)loading with this.
TRANSIENT_MESSAGES = ("is not ready", "not found", "Socket closed", "failed to connect")


@dataclass(frozen=True)
class ConnectOptions:
    servers: tuple[str, ...] = ("localhost:8001",)
    model_name: str = "mert"
    deadline_seconds: float = 300.0  # how long to keep retrying an unavailable server
    request_timeout: float = 120.0
    ssl: bool = False
    ssl_ca: Path | None = None


class _Endpoint:
    def __init__(self, url: str, options: ConnectOptions) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        use_ssl = options.ssl or options.ssl_ca is not None
        self.client = grpcclient.InferenceServerClient(
            url, ssl=use_ssl,
            root_certificates=str(options.ssl_ca) if options.ssl_ca else None)
        self.in_flight = 0
        self.failures = 0


def _is_transient(exc: Exception) -> bool:
    status = getattr(exc, "status", lambda: None)()
    if status in TRANSIENT_STATUSES:
        return True
    text = str(exc)
    return any(m in text for m in TRANSIENT_MESSAGES)


class TritonPool:
    """A set of Triton endpoints serving the same model."""

    def __init__(self, options: ConnectOptions) -> None:
        if not options.servers:
            raise ServerUnavailableError("no --server given")
        self.options = options
        self._endpoints = [_Endpoint(url, options) for url in options.servers]
        self._lock = threading.Lock()
        self.contract: ModelContract | None = None

    @property
    def endpoints(self) -> list[str]:
        return [e.url for e in self._endpoints]

    def connect(self) -> ModelContract:
        """Wait (up to the deadline) until every endpoint serves the model; read its contract."""
        deadline = time.monotonic() + self.options.deadline_seconds
        contracts: dict[str, ModelContract] = {}
        for ep in self._endpoints:
            contracts[ep.url] = self._contract_of(ep, deadline)
        first = next(iter(contracts.values()))
        for url, c in contracts.items():
            if c.fingerprint() != first.fingerprint() or c.input_dtype != first.input_dtype:
                raise ModelContractError(
                    f"{url} serves a different model ({c.model_id}, {c.fingerprint()}) "
                    f"than {self._endpoints[0].url} ({first.model_id}, {first.fingerprint()})")
        self.contract = first
        return first

    def _contract_of(self, ep: _Endpoint, deadline: float) -> ModelContract:
        name = self.options.model_name
        delay = 0.2
        last_error = ""
        while True:
            try:
                if ep.client.is_model_ready(name):
                    cfg = ep.client.get_model_config(name, as_json=True)["config"]
                    return ModelContract.from_config(config_from_json(cfg))
                last_error = f"model {name!r} is not ready"
            except ModelContractError:
                raise
            except Exception as exc:  # grpc raises several kinds for a closed port
                last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if time.monotonic() + delay > deadline:
                raise ServerUnavailableError(
                    f"{ep.url}: no ready model {name!r} within "
                    f"{self.options.deadline_seconds:.0f} s ({last_error})")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _pick(self, exclude: _Endpoint | None) -> _Endpoint:
        with self._lock:
            candidates = [e for e in self._endpoints if e is not exclude] or self._endpoints
            ep = min(candidates, key=lambda e: (e.in_flight, e.failures))
            ep.in_flight += 1
            return ep

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Embed ``batch`` ([n, window] in the served dtype); retries transient failures."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        contract = self.contract
        assert contract is not None, "connect() first"
        deadline = time.monotonic() + self.options.deadline_seconds
        delay = 0.2
        previous: _Endpoint | None = None
        while True:
            ep = self._pick(previous)
            try:
                inp = grpcclient.InferInput(contract.input_name, list(batch.shape),
                                            contract.wire_dtype)
                inp.set_data_from_numpy(batch)
                out = grpcclient.InferRequestedOutput(contract.output_name)
                result = ep.client.infer(contract.model_name, [inp], outputs=[out],
                                         client_timeout=self.options.request_timeout)
                emb = result.as_numpy(contract.output_name)
                with self._lock:
                    ep.failures = 0
                return emb
            except InferenceServerException as exc:
                if not _is_transient(exc):
                    raise InferenceError(f"{ep.url} refused the request: {exc}") from None
                with self._lock:
                    ep.failures += 1
                previous = ep
                if time.monotonic() + delay > deadline:
                    raise ServerUnavailableError(
                        f"no server answered within {self.options.deadline_seconds:.0f} s "
                        f"(last: {ep.url}: {str(exc).splitlines()[0]})") from None
                log.warning("%s: %s; retrying in %.1f s", ep.url,
                            str(exc).splitlines()[0], delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                with self._lock:
                    ep.in_flight -= 1

    def close(self) -> None:
        for ep in self._endpoints:
            ep.client.close()
