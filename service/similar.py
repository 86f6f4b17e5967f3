"""The track-similarity routes: "more like this" for a catalogue track or an uploaded clip.

Rankings, not identification: every answer lists the nearest tracks, best
first, without a threshold. Each query runs on the live generation's own
:class:`~mert_indexer.indexer.similarity.TrackFinder` (made when the generation
was loaded, released with it: :mod:`.generations`), held for the query with
``generations.use()`` as every /v1 route does.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from mert_indexer.errors import QueryError
from mert_indexer.service.errors import ApiError
from mert_indexer.service.models import ErrorAnswer, SimilarToClip, SimilarToTrack
from mert_indexer.service.runtime import no_track_index
from mert_indexer.service.v1 import (
    ERRORS,
    UPLOAD_BODY,
    Filename,
    check_top,
    known_track,
    no_index,
    service_of,
    upload_of,
)

Top = Annotated[int | None, Query(ge=1, description="tracks wanted (default 10)")]

router = APIRouter(
    prefix="/v1",
    tags=["similarity"],
    responses={
        **ERRORS,
        409: {
            "model": ErrorAnswer,
            "description": "the live index generation has no track index: rebuild the index",
        },
    },
)


@router.get(
    "/tracks/{track_id}/similar",
    response_model=SimilarToTrack,
    summary="The catalogue tracks most like this one (itself and its exact copies left out)",
)
def similar(
    request: Request, track_id: Annotated[int, Path(ge=0)], top: Top = None
) -> dict[str, Any]:
    service = service_of(request)
    check_top(service, top)
    with service.generations.use() as live:
        if live is None:
            raise no_index(service)
        found = known_track(live, track_id)
        if live.finder is None:
            raise no_track_index(live)
        try:
            ranked = (
                live.finder.similar(track_id)
                if top is None
                else live.finder.similar(track_id, top=top)
            )
        except QueryError as exc:  # the finder and the track table are one generation's
            raise ApiError(404, "unknown_track", str(exc)) from None
        return {
            "generation": live.name,
            "track_id": found.track_id,
            "track": found.track,
            "similar": [vars(t) for t in ranked],
        }


@router.post(
    "/similar",
    response_model=SimilarToClip,
    summary="The catalogue tracks most like this clip: a ranking, not identification",
    openapi_extra=UPLOAD_BODY,
)
async def similar_to(
    request: Request, top: Top = None, filename: Filename = None
) -> dict[str, Any]:
    service = service_of(request)
    check_top(service, top)
    not_ready = service.not_ready()  # before reading an upload it could not answer
    if not_ready is not None:
        raise not_ready
    live = service.generations.live
    if live is not None and live.finder is None:
        raise no_track_index(live)
    upload = await upload_of(request, service, filename)
    return await service.similar_to(upload, top=top)
