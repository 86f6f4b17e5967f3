"""The JSON shapes of the API: what the OpenAPI description shows and the routes return."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(description="stable, machine-readable: e.g. upload_too_large")
    message: str = Field(description="what is wrong, for a person")


class ErrorAnswer(BaseModel):
    error: ErrorBody


class MatchOut(BaseModel):
    track: str = Field(description="the track's path as indexed")
    track_id: int = Field(description="the catalog's id of the track (GET /v1/tracks/{id})")
    offset_seconds: float = Field(description="where in the track the clip starts")
    score: float = Field(description="0..1; below the index's threshold a match is not reported")
    clip_start_seconds: float = Field(
        description="start of the part of the clip the match places inside the track"
    )
    clip_end_seconds: float = Field(
        description="its end: clip seconds [start, end) are track seconds "
        "[offset + start, offset + end)"
    )


class Identified(BaseModel):
    clip: str = Field(description="the upload's file name")
    duration_seconds: float
    generation: str = Field(description="the index generation that answered")
    matches: list[MatchOut] = Field(description="best first; empty: no match")
    timings_ms: dict[str, float] = Field(description="decode, embed (Triton), search")


class TrackOut(BaseModel):
    track_id: int
    track: str = Field(description="the path as indexed")
    windows: int = Field(description="indexed windows")
    duration_seconds: float


class TrackPage(BaseModel):
    generation: str
    total: int = Field(description="tracks in the index")
    offset: int
    limit: int
    tracks: list[TrackOut] = Field(description="ordered by track_id")


class Limits(BaseModel):
    max_upload_bytes: int
    max_clip_seconds: float | None
    min_clip_seconds: float = Field(description="one window: shorter clips are refused")
    max_top: int


class CalibrationReference(BaseModel):
    index: str = Field(description="its folder")
    tracks: int
    windows: int


class IndexOut(BaseModel):
    generation: str
    kind: str = Field(description="exact or ivfpq")
    tracks: int
    windows: int
    dim: int
    bytes: int
    built_at: float = Field(description="seconds since the epoch")
    model: dict[str, Any] = Field(description="the identity of the model that built the index")
    threshold: float = Field(
        description="identify's default min_score: the index's own, calibrated when it was built"
    )
    thresholds_by_pairs: list[float] | None = Field(
        description="the index's own thresholds for a clip placed by 1, 2, ... aligned window "
        "pairs (the last for more), calibrated on catalogues of hundreds of tracks; null: "
        "threshold whatever the pairs"
    )
    calibrated_against: CalibrationReference | None = Field(
        description="the index of other music the thresholds were also calibrated against "
        "(indexer-client --calibrate-with); null: the catalogue's own windows alone"
    )
    limits: Limits


class SimilarOut(BaseModel):
    track: str = Field(description="the track's path as indexed")
    track_id: int = Field(description="the catalog's id of the track (GET /v1/tracks/{id})")
    score: float = Field(
        description="cosine of the pooled track vectors around the mean track, -1..1; "
        "a ranking: no threshold"
    )


class SimilarToTrack(BaseModel):
    generation: str = Field(description="the index generation that answered")
    track_id: int = Field(description="the query track")
    track: str = Field(description="the query track's path as indexed")
    similar: list[SimilarOut] = Field(
        description="best first; the track itself and tracks with its content hash left out"
    )


class SimilarToClip(BaseModel):
    clip: str = Field(description="the upload's file name")
    duration_seconds: float
    generation: str = Field(description="the index generation that answered")
    similar: list[SimilarOut] = Field(description="best first: a ranking, not identification")
    timings_ms: dict[str, float] = Field(description="embed (decode and Triton), search")
