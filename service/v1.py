"""The version 1 API: identify a clip, list the tracks, describe the index.

Track similarity (``GET /v1/tracks/{id}/similar``, ``POST /v1/similar``) is a
router of its own beside this one (:mod:`.similar`), included by
:func:`.app.create_app` under the same prefix and token; it reaches the live
generation the same way (``service_of(request).generations.use()``) and shares
this module's error table, upload body and checks.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from mert_indexer.client.identify import INDEX_THRESHOLD, MinScore
from mert_indexer.service.errors import ApiError
from mert_indexer.service.models import ErrorAnswer, Identified, IndexOut, TrackOut, TrackPage
from mert_indexer.service.runtime import SearchService
from mert_indexer.service.upload import FIELD, Upload, read_upload

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorAnswer, "description": text}
    for code, text in {
        400: "empty body, or a multipart form without its file field",
        401: "a token is required and was not given (or is wrong)",
        404: "no such track",
        413: "the upload is over the size cap",
        422: "not audio, truncated, too short or too long a clip, or a malformed parameter",
        502: "Triton refused the request",
        503: "Triton or the index is unavailable; see Retry-After",
    }.items()
}
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the clip, in any format the decoder reads (wav, flac, ogg, mp3, "
        "m4a, ...): as the multipart form field `file`, or as the raw body",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {FIELD: {"type": "string", "format": "binary"}},
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "audio/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

# A raw body's file name (query parameter ``filename``), for the upload routes.
Filename = Annotated[
    str | None,
    Query(
        max_length=255,
        description="a raw body's file name: its suffix picks the decoder "
        "(else the Content-Type does)",
    ),
]

router = APIRouter(prefix="/v1", tags=["v1"], responses=ERRORS)


def service_of(request: Request) -> SearchService:
    service: SearchService = request.app.state.service
    return service


def parse_min_score(text: str | None) -> MinScore:
    """``None`` (absent): the index's threshold; ``off``: no threshold; else a number in [0, 1]."""
    if text is None:
        return INDEX_THRESHOLD
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ApiError(
            422, "invalid_parameter", f"min_score: expected a number or 'off', got {text!r}"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise ApiError(422, "invalid_parameter", f"min_score: between 0 and 1, got {text!r}")
    return value


@router.post(
    "/identify",
    response_model=Identified,
    summary="Which indexed track, and where in it, does this clip come from?",
    openapi_extra=UPLOAD_BODY,
)
async def identify(
    request: Request,
    top: Annotated[int | None, Query(ge=1, description="matches wanted (default 5)")] = None,
    min_score: Annotated[
        str | None,
        Query(
            description="answer no match below this score (0..1; default: the index's "
            "threshold); 'off' ranks best guesses without a threshold"
        ),
    ] = None,
    filename: Filename = None,
) -> dict[str, Any]:
    service = service_of(request)
    threshold = parse_min_score(min_score)
    check_top(service, top)
    not_ready = service.not_ready()  # before reading an upload it could not answer
    if not_ready is not None:
        raise not_ready
    upload = await upload_of(request, service, filename)
    return await service.identify(upload, top=top, min_score=threshold)


def check_top(service: SearchService, top: int | None) -> None:
    """422 for a ``top`` over the service's cap (``ge=1`` is the route's own check)."""
    if top is not None and top > service.options.max_top:
        raise ApiError(
            422, "invalid_parameter", f"top: at most {service.options.max_top}, got {top}"
        )


async def upload_of(request: Request, service: SearchService, filename: str | None) -> Upload:
    """The request's clip, raw or multipart, under the service's size cap."""
    return await read_upload(
        request.stream(),
        {k.lower(): v for k, v in request.headers.items()},
        service.options.max_upload_bytes,
        filename,
    )


@router.get("/tracks", response_model=TrackPage, summary="The indexed tracks, by id, a page")
def tracks(
    request: Request,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    with service_of(request).generations.use() as live:
        if live is None:
            raise no_index(service_of(request))
        return {
            "generation": live.name,
            "total": live.n_tracks,
            "offset": offset,
            "limit": limit,
            "tracks": [vars(t) for t in live.tracks(offset, limit)],
        }


@router.get("/tracks/{track_id}", response_model=TrackOut, summary="One indexed track")
def track(request: Request, track_id: Annotated[int, Path(ge=0)]) -> dict[str, Any]:
    with service_of(request).generations.use() as live:
        if live is None:
            raise no_index(service_of(request))
        return vars(known_track(live, track_id))


@router.get("/index", response_model=IndexOut, summary="The live index: model, kind, counts")
def index(request: Request) -> dict[str, Any]:
    service = service_of(request)
    live = service.generations.live
    if live is None:
        raise no_index(service)
    info = live.info
    query = service.options.query
    return {
        "generation": live.name,
        "kind": info["kind"],
        "tracks": live.n_tracks,
        "windows": int(info["n_vectors"]),
        "dim": int(info["dim"]),
        "bytes": int(info.get("bytes", 0)),
        "built_at": float(info.get("built_at", 0.0)),
        "model": live.searcher.identity,
        "threshold": live.searcher.threshold,
        "thresholds_by_pairs": live.searcher.thresholds,
        "calibrated_against": info.get("params", {}).get("calibrated_against"),
        "limits": {
            "max_upload_bytes": service.options.max_upload_bytes,
            "max_clip_seconds": query.max_clip_seconds,
            "min_clip_seconds": live.window_seconds,
            "max_top": service.options.max_top,
        },
    }


def known_track(live: Any, track_id: int) -> Any:
    """The track ``track_id`` of generation ``live``, or a 404 naming it."""
    found = live.track(track_id)
    if found is None:
        raise ApiError(
            404, "unknown_track", f"no track with id {track_id} in index generation {live.name}"
        )
    return found


def no_index(service: SearchService) -> ApiError:
    """503: no generation is loaded (yet)."""
    return ApiError(
        503,
        "index_unavailable",
        f"no index loaded: {service.generations.problem}",
        {"Retry-After": str(service.options.retry_after_seconds)},
    )
