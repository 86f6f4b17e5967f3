"""Talk to one or more Triton servers over gRPC: readiness, the model contract, inference.

Over the ~400-line norm: endpoint selection, retries and the model-identity
checks interlock (a retried failure re-reads the identity), so they stay together.

Before anything is sent, the model's config is read from the server and
checked (``ModelContract``); every endpoint must serve the same model. Each
request goes to the endpoint with the fewest requests in flight per model
instance; an endpoint that fails is rested for a growing while. Transient
failures (server unavailable, restarting, deadline) are retried with
exponential backoff, on any endpoint, until the run's deadline, then fail
with :class:`ServerUnavailableError`; a request the server refuses as invalid
fails at once with :class:`InferenceError`. Batches travel inside the gRPC
message or, for a server on this host, in registered system shared memory.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from mert_indexer.contract import MODEL_NAME, ModelContract, config_from_json
from mert_indexer.defaults import DEFAULT_SERVER  # re-exported: the CLIs read it here
from mert_indexer.errors import (
    InferenceError,
    ModelChangedError,
    ModelContractError,
    ServerUnavailableError,
)

if TYPE_CHECKING:
    from mert_indexer.client.shm import ShmRegion

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset(
    {
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.ABORTED",
        "StatusCode.CANCELLED",
        "StatusCode.UNKNOWN",
    }
)
# Triton answers a request for a model that is (re)loading with these.
# "no available versions": the model is being unloaded (server shutting down or reloading).
TRANSIENT_MESSAGES = (
    "is not ready",
    "not found",
    "Socket closed",
    "failed to connect",
    "has no available versions",
)
# A restarted server has forgotten our shared-memory registrations.
SHM_FORGOTTEN = "Unable to find shared memory region"
MAX_BACKOFF = 10.0


@dataclass(frozen=True)
class ConnectOptions:
    servers: tuple[str, ...] = (DEFAULT_SERVER,)
    model_name: str = MODEL_NAME
    deadline_seconds: float = 300.0  # how long to keep retrying an unavailable server
    request_timeout: float = 300.0  # one request, queueing on the server included
    ssl: bool = False
    ssl_ca: Path | None = None


@dataclass(frozen=True)
class ServedModel:
    """How the model is served, as far as sizing the client is concerned."""

    instances: tuple[int, ...]  # execution instances per endpoint
    max_batch_size: int
    dynamic_batching: bool

    @property
    def total_instances(self) -> int:
        return sum(self.instances)


class _Endpoint:
    def __init__(self, url: str, options: ConnectOptions) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        use_ssl = options.ssl or options.ssl_ca is not None
        self.client = grpcclient.InferenceServerClient(
            url, ssl=use_ssl, root_certificates=str(options.ssl_ca) if options.ssl_ca else None
        )
        self.instances = 1
        self.in_flight = 0
        self.failures = 0
        self.rest_until = 0.0
        self.last_pick = 0
        self.requests = 0
        # The identity checks: False after a failure (read the config before the next
        # request); answers since the last check; the model version answers carry.
        self.verified = True
        self.answered = 0
        self.version = ""


def _is_transient(exc: Exception) -> bool:
    status = getattr(exc, "status", lambda: None)()
    if status in TRANSIENT_STATUSES:
        return True
    text = str(exc)
    return any(m in text for m in TRANSIENT_MESSAGES)


def is_local(url: str) -> bool:
    """True when ``host:port`` names this machine (loopback or one of its own names)."""
    host = url.rsplit(":", 1)[0].strip("[]") if ":" in url else url
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    own = set()
    try:
        own = {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    for info in infos:
        addr = info[4][0]
        try:
            if ipaddress.ip_address(str(addr).split("%")[0]).is_loopback or addr in own:
                return True
        except ValueError:
            continue
    return False


def count_instances(config_json: dict[str, Any]) -> int:
    """Execution instances of a model from its config (GPU groups count once per GPU)."""
    groups = config_json.get("instance_group") or [{}]
    total = 0
    for g in groups:
        count = int(g.get("count", 1) or 1)
        gpus = g.get("gpus") or []
        total += count * (len(gpus) if g.get("kind") == "KIND_GPU" and gpus else 1)
    return max(1, total)


class TritonPool:
    """A set of Triton endpoints serving the same model."""

    def __init__(self, options: ConnectOptions) -> None:
        if not options.servers:
            raise ServerUnavailableError("no --server given")
        self.options = options
        self._endpoints = [_Endpoint(url, options) for url in options.servers]
        self._lock = threading.Lock()
        self._picks = itertools.count(1)
        self._shm: list[ShmRegion] = []
        self._cancelled = threading.Event()
        self._changed: str | None = None  # why the run must stop: the served model changed
        self.contract: ModelContract | None = None
        self.served: ServedModel | None = None

    @property
    def endpoints(self) -> list[str]:
        return [e.url for e in self._endpoints]

    @property
    def all_local(self) -> bool:
        return all(is_local(e.url) for e in self._endpoints)

    def requests_per_endpoint(self) -> dict[str, int]:
        """Requests each endpoint answered in this run (load-spreading evidence)."""
        return {e.url: e.requests for e in self._endpoints}

    def connect(self) -> ModelContract:
        """Wait (up to the deadline) until every endpoint serves the model; read its contract."""
        deadline = time.monotonic() + self.options.deadline_seconds
        contracts: dict[str, ModelContract] = {}
        configs: dict[str, dict[str, Any]] = {}
        for ep in self._endpoints:
            configs[ep.url] = self._config_of(ep, deadline)
            contracts[ep.url] = ModelContract.from_config(config_from_json(configs[ep.url]))
            ep.instances = count_instances(configs[ep.url])
        first_url = self._endpoints[0].url
        first = contracts[first_url]
        for url, c in contracts.items():
            if c.fingerprint() != first.fingerprint() or c.input_dtype != first.input_dtype:
                raise ModelContractError(
                    f"{url} serves a different model ({c.model_id}, {c.fingerprint()}) "
                    f"than {first_url} ({first.model_id}, {first.fingerprint()})"
                )
        cfg = configs[first_url]
        dyn = cfg.get("dynamic_batching")
        self.served = ServedModel(
            instances=tuple(e.instances for e in self._endpoints),
            max_batch_size=min(c.max_batch_size for c in contracts.values()),
            dynamic_batching=dyn is not None,
        )
        self.contract = first
        for ep in self._endpoints:
            ep.verified, ep.answered = True, 0
        return first

    # -- identity during the run ---------------------------------------------------

    def _check_identity(self, ep: _Endpoint) -> None:
        """Read ``ep``'s config once; raise :class:`ModelChangedError` if it serves another model.

        A server that is not ready raises tritonclient's exception, which the
        request loop treats as a transient failure.
        """
        from tritonclient.utils import InferenceServerException

        contract = self.contract
        assert contract is not None
        name = self.options.model_name
        if not ep.client.is_model_ready(name):
            raise InferenceServerException(f"model {name!r} is not ready")
        config = ep.client.get_model_config(name, as_json=True)["config"]
        try:
            served = ModelContract.from_config(config_from_json(config))
        except ModelContractError as exc:
            self._model_changed(ep, f"no longer serves a model with the contract ({exc})")
        if served.fingerprint() != contract.fingerprint() or served.input_dtype != (
            contract.input_dtype
        ):
            self._model_changed(
                ep,
                f"now serves {served.model_id} (weights {served.weights_sha256[:12]}, "
                f"fingerprint {served.fingerprint()})",
            )
        with self._lock:
            ep.instances = count_instances(config)
            ep.verified = True

    def _model_changed(self, ep: _Endpoint, what: str) -> NoReturn:
        contract = self.contract
        assert contract is not None
        message = (
            f"{ep.url} {what}, not {contract.model_id} (weights "
            f"{contract.weights_sha256[:12]}, fingerprint {contract.fingerprint()}) that this "
            "run started with: the model changed during the run; stopped, the tracks "
            "committed before the change are kept"
        )
        with self._lock:
            self._changed = self._changed or message
        raise ModelChangedError(self._changed)

    def confirm_model(self) -> None:
        """Check every endpoint that answered since its last check still serves the model.

        Raises :class:`ModelChangedError` if one serves another (the caller must
        not commit what it answered); an unreachable one is left for its next
        request to re-read. Called before each commit.
        """
        if self._changed:
            raise ModelChangedError(self._changed)
        for ep in self._endpoints:
            with self._lock:
                seen = ep.answered
            if not seen:
                continue
            try:
                self._check_identity(ep)
            except ModelChangedError:
                raise
            except Exception as exc:  # unreachable now: re-read before its next request
                log.debug("%s: identity check deferred: %s", ep.url, exc)
                with self._lock:
                    ep.verified = False
                continue
            with self._lock:
                ep.answered -= seen

    def _config_of(self, ep: _Endpoint, deadline: float) -> dict[str, Any]:
        name = self.options.model_name
        delay = 0.2
        last_error = ""
        while True:
            try:
                if ep.client.is_model_ready(name):
                    return ep.client.get_model_config(name, as_json=True)["config"]
                last_error = f"model {name!r} is not ready"
            except Exception as exc:  # grpc raises several kinds for a closed port
                last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"{ep.url}: no ready model {name!r} within "
                    f"{self.options.deadline_seconds:.0f} s ({last_error})"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)

    # -- shared memory ---------------------------------------------------------------

    def register_shm(self, regions: Sequence[ShmRegion]) -> None:
        """Register ``regions`` with every endpoint (once; re-done if a server restarts)."""
        self._shm = list(regions)
        for ep in self._endpoints:
            self._register_on(ep)

    def _register_on(self, ep: _Endpoint) -> None:
        from tritonclient.utils import InferenceServerException

        for r in self._shm:
            try:
                ep.client.register_system_shared_memory(r.name, r.key, r.byte_size)
            except InferenceServerException as exc:
                if "already" in str(exc):  # still registered from before a hiccup
                    continue
                raise ServerUnavailableError(
                    f"{ep.url}: cannot register shared memory {r.key} "
                    f"({str(exc).splitlines()[0]}); is the server on this host, and in a "
                    f"container started with --ipc=host? Use --no-shm otherwise"
                ) from None

    def unregister_shm(self, timeout: float = 5.0) -> None:
        """Unregister our regions everywhere; errors are logged (the server may be gone).

        Triton refuses to unregister a region a just-answered request has not
        released yet ("currently in use", seen in 4 of 30 tries right after an
        answer): that is retried briefly, or the server would keep the mapping.
        """
        regions, self._shm = self._shm, []
        for ep in self._endpoints:
            for r in regions:
                deadline = time.monotonic() + timeout
                delay = 0.01
                while True:
                    try:
                        ep.client.unregister_system_shared_memory(r.name)
                        break
                    except Exception as exc:  # best effort at shutdown
                        if "in use" in str(exc) and time.monotonic() + delay < deadline:
                            time.sleep(delay)
                            delay = min(delay * 2, 0.5)
                            continue
                        log.debug("%s: unregister %s: %s", ep.url, r.name, exc)
                        break

    # -- inference -------------------------------------------------------------------

    def infer(self, batch: np.ndarray, *, priority: int = 0) -> np.ndarray:
        """Embed ``batch`` ([n, window] in the served dtype), sent inside the gRPC message.

        ``priority``: the request's Triton priority level (1 is the highest; 0,
        the default, takes the model's ``default_priority_level``). Interactive
        queries send 1 so that they are batched before bulk indexing; a model
        without ``priority_levels`` ignores it.
        """
        return self._request(
            tuple(batch.shape), lambda inp: inp.set_data_from_numpy(batch), priority=priority
        )

    def infer_shm(self, region: ShmRegion, n: int) -> np.ndarray:
        """Embed the first ``n`` windows of ``region`` (registered by :meth:`register_shm`)."""
        nbytes = n * region.byte_size // region.shape[0]
        shape = (n, *region.shape[1:])
        return self._request(shape, lambda inp: inp.set_shared_memory(region.name, nbytes))

    def _request(
        self, shape: tuple[int, ...], attach: Callable[[Any], None], *, priority: int = 0
    ) -> np.ndarray:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        contract = self.contract
        if contract is None:
            raise RuntimeError("TritonPool.connect() first")
        deadline = time.monotonic() + self.options.deadline_seconds
        delay = 0.2
        previous: _Endpoint | None = None
        renewed = False
        while True:
            if self._changed:
                raise ModelChangedError(self._changed)
            ep = self._pick(previous)
            try:
                if not ep.verified:  # it failed since its last check: (re)connected to what?
                    self._check_identity(ep)
                inp = grpcclient.InferInput(contract.input_name, list(shape), contract.wire_dtype)
                attach(inp)
                out = grpcclient.InferRequestedOutput(contract.output_name)
                result = ep.client.infer(
                    contract.model_name,
                    [inp],
                    outputs=[out],
                    client_timeout=self.options.request_timeout,
                    priority=priority,
                )
                emb = result.as_numpy(contract.output_name)
                version = result.get_response().model_version
                if version != ep.version:  # another version answered: is it another model?
                    if ep.version:
                        self._check_identity(ep)
                    ep.version = version
                with self._lock:
                    ep.failures = 0
                    ep.requests += 1
                    ep.answered += 1
                return emb
            except InferenceServerException as exc:
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                forgot_shm = bool(self._shm) and SHM_FORGOTTEN in str(exc)
                if forgot_shm and not renewed:  # restarted server: register again, no wait
                    renewed = True
                    ep.verified = False  # and read what it serves now
                    try:
                        self._register_on(ep)
                        log.warning(
                            "%s had forgotten our shared memory (restarted?); registered it again",
                            ep.url,
                        )
                        continue
                    except ServerUnavailableError as reg_exc:
                        log.warning("%s", reg_exc)
                if not forgot_shm and not _is_transient(exc):
                    raise InferenceError(f"{ep.url} refused the request: {first_line}") from None
                with self._lock:
                    ep.failures += 1
                    ep.rest_until = time.monotonic() + min(0.2 * 2**ep.failures, MAX_BACKOFF)
                    ep.verified = False
                previous = ep
                if self._cancelled.is_set():
                    raise ServerUnavailableError(
                        f"{ep.url}: {first_line} (not retried: the run is stopping)"
                    ) from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerUnavailableError(
                        f"no server answered within {self.options.deadline_seconds:.0f} s "
                        f"(last: {ep.url}: {first_line})"
                    ) from None
                log.warning("%s: %s; retrying in %.1f s", ep.url, first_line, min(delay, remaining))
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, MAX_BACKOFF)
                renewed = False
            finally:
                with self._lock:
                    ep.in_flight -= 1

    def _pick(self, exclude: _Endpoint | None) -> _Endpoint:
        """The endpoint with the fewest requests in flight per instance, resting failed ones."""
        with self._lock:
            now = time.monotonic()
            candidates = [e for e in self._endpoints if e is not exclude and e.rest_until <= now]
            if not candidates:
                candidates = [e for e in self._endpoints if e is not exclude] or self._endpoints
            ep = min(
                candidates, key=lambda e: (e.in_flight / e.instances, e.rest_until, e.last_pick)
            )
            ep.in_flight += 1
            ep.last_pick = next(self._picks)
            return ep

    def cancel(self) -> None:
        """Make failing requests give up at once instead of retrying (the run is ending)."""
        self._cancelled.set()

    def close(self) -> None:
        self.unregister_shm()
        for ep in self._endpoints:
            ep.client.close()
