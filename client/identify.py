"""Identify clips: which indexed track, and where in it -- one call for a CLI or a service.

:class:`Identifier` joins the three stages of a query -- decode
(:func:`~mert_indexer.client.query.decode_clip`), embed with a dense hop
(:func:`~mert_indexer.client.query.embed_audio`, through the served model) and
search (:class:`~mert_indexer.indexer.search.Searcher`) -- and times each, so
a service can export them as metrics. It checks once, when made, that the
index was built by the model the server serves.

A clip is a path, or the bytes of an upload (``bytes``-like or a binary file
object). Uploads are written to a temporary file named with the upload's
suffix and decoded from there: the decoder is path-based on purpose -- it
routes by suffix (m4a straight to FFmpeg), checks a WAV/FLAC against its
header's length and an Ogg stream for its end page by re-reading the file --
and a temporary file keeps every upload on that one, tested path. The cost,
one write of a clip of at most a few MB into the page cache, is small next to
its inference.

Thread safety: one :class:`Identifier` may serve many threads at once. Each
call makes its own decoder, temporary file, arrays and timings. What the
calls share is read-only or guards itself:

- the :class:`Searcher`: after loading it only reads -- frozen options, the
  FAISS index (CPU indexes allow concurrent searches: FAISS wiki, "Threads and
  asynchronous calls"), numpy arrays, and read-only memory maps of the
  segments, each made once under the segment reader's lock. A per-call
  ``min_score`` travels as that call's ``SearchOptions``, never by changing
  the shared searcher's. A FAISS *GPU* index is not safe even for concurrent
  searches (same page): the index kinds serialise their searches there
  (:mod:`mert_indexer.indexer.kinds`);
- the :class:`ModelContract` and :class:`QueryOptions`: frozen dataclasses;
- ``infer`` (:meth:`TritonPool.infer`): its endpoint bookkeeping is under its
  lock, and tritonclient's gRPC ``infer`` is thread-safe (its client's
  docstring: all methods but the streaming ones); the indexing pipeline
  calls it from many threads too.

Closing the :class:`Searcher` while calls are in flight is the caller's
business (a service swapping index generations drains the old one first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import numpy as np

from mert_indexer.client.query import (
    DEFAULT_MAX_CLIP_SECONDS,
    DEFAULT_QUERY_HOP_SECONDS,
    decode_clip,
    embed_audio,
)
from mert_indexer.client.tuning import DEFAULT_REQUEST_WINDOWS
from mert_indexer.contract import ModelContract
from mert_indexer.errors import ConfigError, ModelMismatchError, QueryError

if TYPE_CHECKING:
    from mert_indexer.indexer.search import Match, Searcher, SearchOptions

ClipSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]
# An upload's suffix picks its decoder; anything else in its name stays out of the path.
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")


@dataclass(frozen=True)
class QueryOptions:
    """How clips are windowed, batched, capped and answered.

    ``max_clip_seconds`` caps what one clip may decode to (``None``: no cap);
    a longer clip is refused with :class:`ClipTooLongError` once the cap is passed,
    without decoding the rest. ``top`` is the default number of matches.
    """

    hop_seconds: float = DEFAULT_QUERY_HOP_SECONDS
    top: int = 5
    batch_size: int = DEFAULT_REQUEST_WINDOWS
    max_clip_seconds: float | None = DEFAULT_MAX_CLIP_SECONDS

    def __post_init__(self) -> None:
        if not self.hop_seconds > 0:
            raise ConfigError(f"hop_seconds must be positive, got {self.hop_seconds}")
        if self.top < 1 or self.batch_size < 1:
            raise ConfigError(
                f"top and batch_size must be at least 1 ({self.top}, {self.batch_size})"
            )
        if self.max_clip_seconds is not None and not self.max_clip_seconds > 0:
            raise ConfigError(f"max_clip_seconds must be positive, got {self.max_clip_seconds}")


@dataclass(frozen=True)
class StageTimings:
    """Wall seconds of each stage of one identification."""

    decode: float  # an upload's temporary file included
    embed: float  # wire conversion and every inference request
    search: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Identification:
    """The answer for one clip: its matches, best first (empty: no match)."""

    clip: str
    duration_seconds: float
    matches: tuple[Match, ...]
    timings: StageTimings


class _IndexThreshold(enum.Enum):
    TOKEN = "the searcher's own threshold"


INDEX_THRESHOLD: Final = _IndexThreshold.TOKEN
"""``min_score`` default: the searcher's own threshold (the index's documented one)."""
MinScore = float | None | _IndexThreshold


def check_identity(
    searcher_identity: Mapping[str, Any], contract: ModelContract, *, index: str | Path = "index"
) -> None:
    """Raise :class:`ModelMismatchError` if the index at ``index`` was built by another model.

    Only what makes embeddings comparable (:meth:`ModelContract.identity`) is
    compared; an index without an identity (empty) is accepted.
    """
    if not searcher_identity:
        return
    expected = {k: searcher_identity.get(k) for k in contract.identity()}
    if expected != contract.identity():
        raise ModelMismatchError(
            f"{index} was built with {expected.get('model_id')} "
            f"(weights {str(expected.get('weights_sha256'))[:12]}); the server "
            f"serves {contract.model_id} (weights {contract.weights_sha256[:12]})"
        )


class Identifier:
    """Answers "which track, and where in it" for clips; safe to share between threads.

    ``infer`` embeds a batch of wire-dtype windows (:meth:`TritonPool.infer`).
    Raises :class:`ModelMismatchError` when the index was built by another model.
    """

    def __init__(
        self,
        searcher: Searcher,
        contract: ModelContract,
        infer: Callable[[np.ndarray], np.ndarray],
        options: QueryOptions = QueryOptions(),
    ) -> None:
        check_identity(searcher.identity, contract, index=searcher.index_dir)
        self.searcher = searcher
        self.contract = contract
        self.infer = infer
        self.options = options

    def identify(
        self,
        source: ClipSource,
        *,
        name: str | None = None,
        top: int | None = None,
        min_score: MinScore = INDEX_THRESHOLD,
    ) -> Identification:
        """Identify one clip: a path, or an upload's bytes (``bytes``-like or file object).

        ``name`` names the clip in the answer and in errors; for an upload its
        suffix picks the decoder (default: a file object's ``name``, else
        ``"upload"``, which any decoder may try). ``top``: matches wanted
        (default: the options'). ``min_score``: answer no match below it;
        ``None`` ranks best guesses without a threshold; default: the
        searcher's own. Raises :class:`ClipTooLongError`,
        :class:`ClipTooShortError` (shorter than a window) or
        :class:`DecodeError`, each naming the clip; :class:`QueryError` for a
        bad ``top``/``min_score``; :class:`ServerError`/:class:`InferenceError`
        from ``infer``.
        """
        top = self.options.top if top is None else top
        if top < 1:
            raise QueryError(f"top must be at least 1, got {top}")
        search_options = self._search_options(min_score)
        sr = self.contract.sample_rate
        t0 = time.perf_counter()
        with _as_path(source, name) as (path, label):
            audio = decode_clip(path, sr, max_seconds=self.options.max_clip_seconds, name=label)
        t1 = time.perf_counter()
        emb, starts = embed_audio(
            audio,
            self.contract,
            self.infer,
            hop_seconds=self.options.hop_seconds,
            batch_size=self.options.batch_size,
            name=label,
        )
        t2 = time.perf_counter()
        matches = self.searcher.search(emb, starts, top=top, options=search_options)
        t3 = time.perf_counter()
        return Identification(
            clip=label,
            duration_seconds=len(audio) / sr,
            matches=tuple(matches),
            timings=StageTimings(decode=t1 - t0, embed=t2 - t1, search=t3 - t2),
        )

    def _search_options(self, min_score: MinScore) -> SearchOptions | None:
        """This call's search options: ``None`` (the searcher's own) unless ``min_score`` is set."""
        if isinstance(min_score, _IndexThreshold):
            return None
        if min_score is not None and not 0.0 <= min_score <= 1.0:
            raise QueryError(f"min_score is between 0 and 1, got {min_score}")
        # A threshold given for this call holds whatever the clip's aligned pairs.
        return dataclasses.replace(self.searcher.options, min_score=min_score, pair_thresholds=None)


@contextlib.contextmanager
def _as_path(source: ClipSource, name: str | None) -> Iterator[tuple[Path, str]]:
    """(a path the decoder can read, the clip's name); an upload lives in a temporary file."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        yield path, str(path) if name is None else name
        return
    if name is None:
        name = getattr(source, "name", None)
        name = name if isinstance(name, str) else "upload"
    suffix = Path(name).suffix
    if not _SAFE_SUFFIX.fullmatch(suffix):
        suffix = ""
    fd, tmp = tempfile.mkstemp(prefix="mert-query-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(source, (bytes, bytearray, memoryview)):
                fh.write(source)
            else:
                shutil.copyfileobj(source, fh)
        yield Path(tmp), name
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# -- track similarity (indexer-query --similar-to; the service's POST /v1/similar) --


def embed_source(
    source: ClipSource,
    contract: ModelContract,
    infer: Callable[[np.ndarray], np.ndarray],
    options: QueryOptions = QueryOptions(),
    *,
    name: str | None = None,
) -> tuple[str, np.ndarray, np.ndarray]:
    """(the clip's name, window embeddings [m, D], starts in seconds) of a path or an upload.

    The decode and embed stages of :meth:`Identifier.identify`, for callers that
    rank rather than identify (:meth:`mert_indexer.indexer.similarity.TrackFinder.similar_to`).
    """
    with _as_path(source, name) as (path, label):
        audio = decode_clip(
            path, contract.sample_rate, max_seconds=options.max_clip_seconds, name=label
        )
    emb, starts = embed_audio(
        audio,
        contract,
        infer,
        hop_seconds=options.hop_seconds,
        batch_size=options.batch_size,
        name=label,
    )
    return label, emb, starts
