"""API errors: one JSON shape, ``{"error": {"code": ..., "message": ...}}``, and an HTTP status.

The project's typed errors map to statuses in one place (:func:`from_indexer_error`):
what the client sent is a 4xx naming the problem; Triton or the index being
unavailable is a 503 with ``Retry-After``; anything else is the service's fault.
"""

from __future__ import annotations

from mert_indexer.errors import (
    ClipTooLongError,
    ClipTooShortError,
    DecodeError,
    IndexerError,
    InferenceError,
    ModelMismatchError,
    QueryError,
    ServerError,
    StoreError,
)


class ApiError(Exception):
    """An answer other than success: status, a stable code, a message naming the problem."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


def unavailable(code: str, message: str, retry_after: int) -> ApiError:
    return ApiError(503, code, message, {"Retry-After": str(retry_after)})


def from_indexer_error(exc: IndexerError, retry_after: int) -> ApiError:
    """The HTTP answer for one of the project's errors raised while answering a query."""
    if isinstance(exc, DecodeError):
        return ApiError(422, "not_decodable", f"not readable audio: {exc}")
    if isinstance(exc, ClipTooShortError):
        return ApiError(422, "clip_too_short", str(exc))
    if isinstance(exc, ClipTooLongError):
        return ApiError(422, "clip_too_long", str(exc))
    if isinstance(exc, QueryError):
        return ApiError(422, "clip_rejected", str(exc))
    if isinstance(exc, ModelMismatchError):
        return unavailable("model_mismatch", str(exc), retry_after)
    if isinstance(exc, ServerError):
        return unavailable("triton_unavailable", str(exc), retry_after)
    if isinstance(exc, InferenceError):
        return ApiError(502, "inference_refused", str(exc))
    if isinstance(exc, StoreError):
        return unavailable("index_unavailable", str(exc), retry_after)
    return ApiError(500, "internal", str(exc))
