"""``SearchService``: the live index, the Triton link and a thread pool, joined to answer queries.

An identification (and a clip's similarity ranking,
:meth:`SearchService.similar_to`) runs on one of ``workers`` threads: decoding
(soundfile and soxr release the GIL), Triton requests (gRPC waits release it)
and the search of many clips overlap; the event loop only moves bytes. Each
call holds the generation it started on until it returns
(:meth:`Generations.use`), and makes its own :class:`Identifier` (a ranking
checks the identity itself) -- a few dictionary comparisons -- so that the
index and the served model are checked against each other on every query,
also after either of them changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mert_indexer.client.identify import (
    INDEX_THRESHOLD,
    Identifier,
    MinScore,
    check_identity,
    embed_source,
)
from mert_indexer.client.triton_io import ConnectOptions
from mert_indexer.errors import IndexerError, ModelMismatchError, ServerUnavailableError
from mert_indexer.service.errors import ApiError, from_indexer_error, unavailable
from mert_indexer.service.generations import Generations, LiveIndex
from mert_indexer.service.metrics import Metrics
from mert_indexer.service.options import ServiceOptions
from mert_indexer.service.triton import TritonLink
from mert_indexer.service.upload import Upload

log = logging.getLogger(__name__)


class SearchService:
    """Everything the routes need; :meth:`start` before serving, :meth:`stop` after."""

    def __init__(self, options: ServiceOptions, *, generations: Generations | None = None) -> None:
        self.options = options
        self.metrics = Metrics()
        self.generations = generations or Generations(
            options.index,
            self.metrics,
            watch_seconds=options.watch_seconds,
            reload_failed_seconds=options.reload_failed_seconds,
        )
        connect = dataclasses.replace(
            options.connect,
            deadline_seconds=options.triton_retry_seconds,
            request_timeout=options.triton_request_timeout,
        )
        self.triton = TritonLink(
            connect, health_seconds=options.health_seconds, priority=options.query_priority
        )
        self._executor = ThreadPoolExecutor(options.workers, thread_name_prefix="identify")

    @property
    def connect_options(self) -> ConnectOptions:
        return self.triton.options

    def start(self) -> None:
        self.generations.start()
        self.triton.start()

    def stop(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.triton.stop()
        self.generations.stop()

    # -- readiness ---------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): an index is loaded and Triton serves the model that built it."""
        live = self.generations.live
        contract = self.triton.contract
        reason: str | None = None
        if live is None:
            reason = f"no index loaded: {self.generations.problem}"
        elif contract is None:
            reason = f"Triton is not serving: {self.triton.problem}"
        else:
            try:
                check_identity(live.searcher.identity, contract, index=self.options.index)
            except ModelMismatchError as exc:
                reason = f"model mismatch: {exc}"
        details: dict[str, Any] = {"ready": reason is None}
        if reason is not None:
            details["reason"] = reason
        if live is not None:
            details["generation"] = live.name
        if contract is not None:
            details["served_model"] = contract.model_id
        self.metrics.ready.set(1 if reason is None else 0)
        return reason is None, details

    def not_ready(self) -> ApiError | None:
        """The 503 a query would get now (checked before its upload is read), or ``None``."""
        retry = self.options.retry_after_seconds
        if self.generations.live is None:
            return unavailable(
                "index_unavailable", f"no index loaded: {self.generations.problem}", retry
            )
        if self.triton.contract is None:
            return unavailable(
                "triton_unavailable", f"Triton is not serving: {self.triton.problem}", retry
            )
        return None

    # -- identify ----------------------------------------------------------------------

    async def identify(
        self, upload: Upload, *, top: int | None, min_score: MinScore = INDEX_THRESHOLD
    ) -> dict[str, Any]:
        """The answer to one clip, computed on the thread pool."""
        loop = asyncio.get_running_loop()
        self.metrics.in_flight.inc()
        try:
            return await loop.run_in_executor(
                self._executor, self._identify, upload, top, min_score
            )
        finally:
            self.metrics.in_flight.dec()

    def _identify(self, upload: Upload, top: int | None, min_score: MinScore) -> dict[str, Any]:
        retry = self.options.retry_after_seconds
        with self.generations.use() as live:
            contract = self.triton.contract
            if live is None or contract is None:
                raise self.not_ready() or unavailable("not_ready", "not ready", retry)
            try:
                identifier = Identifier(
                    live.searcher, contract, self.triton.infer, self.options.query
                )
                found = identifier.identify(
                    upload.data, name=upload.name, top=top, min_score=min_score
                )
            except ServerUnavailableError as exc:
                self.triton.mark_down(str(exc))
                raise from_indexer_error(exc, retry) from None
            except IndexerError as exc:
                raise from_indexer_error(exc, retry) from None
            t = found.timings
            self.metrics.observe_stages(t.decode, t.embed, t.search)
            self.metrics.clip_seconds.inc(found.duration_seconds)
            return _answer(found, live, t.as_dict())

    # -- similar to a clip -------------------------------------------------------------

    async def similar_to(self, upload: Upload, *, top: int | None) -> dict[str, Any]:
        """The catalogue tracks most like one clip (a ranking), computed on the thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._similar_to, upload, top)

    def _similar_to(self, upload: Upload, top: int | None) -> dict[str, Any]:
        retry = self.options.retry_after_seconds
        with self.generations.use() as live:
            contract = self.triton.contract
            if live is None or contract is None:
                raise self.not_ready() or unavailable("not_ready", "not ready", retry)
            finder = live.finder
            if finder is None:
                raise no_track_index(live)
            try:
                check_identity(live.searcher.identity, contract, index=self.options.index)
                t0 = time.perf_counter()
                name, emb, starts = embed_source(
                    upload.data, contract, self.triton.infer, self.options.query, name=upload.name
                )
                t1 = time.perf_counter()
                # top None: the finder's own default.
                ranked = finder.similar_to(emb) if top is None else finder.similar_to(emb, top=top)
                t2 = time.perf_counter()
            except ServerUnavailableError as exc:
                self.triton.mark_down(str(exc))
                raise from_indexer_error(exc, retry) from None
            except IndexerError as exc:
                raise from_indexer_error(exc, retry) from None
            # The last window is aligned to the clip's end.
            duration = float(starts[-1]) + contract.window_seconds
            return {
                "clip": name,
                "duration_seconds": round(duration, 3),
                "generation": live.name,
                "similar": [vars(t) for t in ranked],
                "timings_ms": {
                    "embed": round((t1 - t0) * 1000, 2),
                    "search": round((t2 - t1) * 1000, 2),
                },
            }


def no_track_index(live: LiveIndex) -> ApiError:
    """409: the live generation was built before track similarity; only a rebuild helps."""
    return ApiError(409, "no_track_index", live.finder_problem or "no track index: rebuild")


def _answer(found: Any, live: LiveIndex, timings: dict[str, float]) -> dict[str, Any]:
    """The JSON of an identification (see :class:`mert_indexer.service.models.Identified`)."""
    duration = float(found.duration_seconds)
    matches = []
    for m in found.matches:
        track_seconds = live.duration(m.track_id)
        # The part of the clip the match places inside the track: clip seconds
        # [clip_start, clip_end) are track seconds [offset + clip_start, offset + clip_end).
        end = duration if track_seconds is None else min(duration, track_seconds - m.offset_seconds)
        matches.append(
            {
                "track": m.track,
                "track_id": m.track_id,
                "offset_seconds": round(m.offset_seconds, 3),
                "score": round(m.score, 4),
                "clip_start_seconds": 0.0,
                "clip_end_seconds": round(max(0.0, end), 3),
            }
        )
    return {
        "clip": found.clip,
        "duration_seconds": round(duration, 3),
        "generation": live.name,
        "matches": matches,
        "timings_ms": {k: round(v * 1000, 2) for k, v in timings.items()},
    }
