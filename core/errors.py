"""The project's exception hierarchy.

Every error a user can cause or meet derives from :class:`IndexerError`; the
command-line programs turn one into a single line on stderr and a non-zero
exit code.

    IndexerError
     ├── ConfigError            bad options, bad or missing configuration files
     ├── ModelContractError     the served model does not carry the contract
     │    └── ModelChangedError         a server now serves another model than the run began with
     ├── ModelMismatchError     an index built by another model
     ├── ExportError            exporting the model failed
     │    ├── WeightsUnavailableError   weights cannot be fetched or read
     │    └── ValidationError           an exported model failed a gate
     ├── ServerError            the inference server
     │    ├── ServerStartError          the local server did not come up
     │    └── ServerUnavailableError    no server answered within the deadline
     ├── InferenceError         a request was refused by the server
     ├── DecodeError            an audio file cannot be decoded (names the file)
     ├── StoreError             the index store cannot be read or written
     └── QueryError             a query cannot be answered
          ├── ClipTooShortError         a clip shorter than one window (it cannot be matched)
          └── ClipTooLongError          a clip longer than the cap (decoding stopped there)
"""

from __future__ import annotations

from pathlib import Path


class IndexerError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(IndexerError):
    """Bad options or configuration."""


class ModelContractError(IndexerError):
    """The served model's configuration lacks or breaks the contract."""


class ModelChangedError(ModelContractError):
    """A server now serves another model than the one the run started with."""


class ModelMismatchError(IndexerError):
    """Embeddings from one model offered to an index built by another."""


class ExportError(IndexerError):
    """Exporting the model failed."""


class WeightsUnavailableError(ExportError):
    """The requested weights cannot be fetched or read."""


class ValidationError(ExportError):
    """An exported model failed one of the validation gates."""


class ServerError(IndexerError):
    """The inference server failed."""


class ServerStartError(ServerError):
    """The local Triton server did not become ready."""


class ServerUnavailableError(ServerError):
    """No server answered within the deadline."""


class InferenceError(IndexerError):
    """The server refused a request."""


class DecodeError(IndexerError):
    """An audio file cannot be decoded."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class StoreError(IndexerError):
    """The index store cannot be read or written."""


class QueryError(IndexerError):
    """A query cannot be answered."""


class ClipTooShortError(QueryError):
    """A query clip is shorter than one window: a padded window would not match."""


class ClipTooLongError(QueryError):
    """A query clip decodes to more than the most a query may be."""
