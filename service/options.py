"""The search service's options: one frozen dataclass, whose defaults the CLI reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mert_indexer.client.identify import QueryOptions
from mert_indexer.client.triton_io import ConnectOptions
from mert_indexer.errors import ConfigError

DEFAULT_PORT = 8080
# A request body: a 3-minute 44.1 kHz stereo WAV is 32 MB, 10 minutes of 320 kbit/s
# MP3 (the clip cap, DEFAULT_MAX_CLIP_SECONDS) 24 MB.
DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
QUERY_PRIORITY = 1  # Triton's highest level; indexing keeps the model's default (lower)


@dataclass(frozen=True)
class ServiceOptions:
    """How the service listens, what it accepts, and how it watches the index and Triton.

    ``workers``: clips identified at once (decode and Triton requests overlap
    across them; more wait in line). ``triton_retry_seconds`` replaces the
    indexing client's long retry deadline: a query retries an unavailable
    Triton this long, then answers 503. ``token``: when set, every /v1
    request needs ``Authorization: Bearer <token>``.
    """

    index: Path = Path("index")
    host: str = "127.0.0.1"  # loopback: exposing the service is an explicit choice
    port: int = DEFAULT_PORT
    workers: int = 8
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_top: int = 100
    watch_seconds: float = 1.0  # how often index/CURRENT is read
    health_seconds: float = 2.0  # how often Triton is checked
    reload_failed_seconds: float = 30.0  # how soon a generation that failed to load is retried
    retry_after_seconds: int = 5  # the Retry-After of a 503
    triton_retry_seconds: float = 3.0
    triton_request_timeout: float = 30.0
    query_priority: int = QUERY_PRIORITY
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    token: str | None = field(default=None, repr=False)
    query: QueryOptions = field(default_factory=QueryOptions)
    connect: ConnectOptions = field(default_factory=ConnectOptions)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.max_upload_bytes < 1:
            raise ConfigError(f"max_upload_bytes must be positive, got {self.max_upload_bytes}")
        if self.max_top < 1:
            raise ConfigError(f"max_top must be at least 1, got {self.max_top}")
        for name in ("watch_seconds", "health_seconds", "triton_retry_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if (self.ssl_cert is None) != (self.ssl_key is None):
            raise ConfigError("TLS needs both a certificate and its key")
        if self.token is not None and not self.token.strip():
            raise ConfigError("the bearer token is empty")
