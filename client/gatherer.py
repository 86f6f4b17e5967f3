"""The write stage: answered windows back into tracks, complete tracks into the store.

Answers come back in any order and interleave tracks; a track is complete
once decoding has counted its windows and every one is answered. Runs in the
calling thread, the only one that touches the store.

A server answer that a store must not hold -- NaN, infinity, or a value
beyond float16's range (the store keeps float16) -- fails that track at its
first such window: it is named and counted, recorded as a failure (retried
next run, where it fails the same way), its decoding is stopped, and the run
goes on. Before each commit, ``confirm`` checks that the servers still serve
the model the run started with (it raises to stop the run when not), so no
commit holds vectors that came after a change of model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mert_indexer.client.batcher import Row
from mert_indexer.client.decoders import SkipTrack, TrackDecoded, TrackFailed, WindowReady
from mert_indexer.client.report import Progress, RunSummary
from mert_indexer.errors import StoreError

log = logging.getLogger(__name__)

# The store keeps float16: a value beyond this would be stored as infinity.
FLOAT16_MAX = float(np.finfo(np.float16).max)


def _nothing(*_: object) -> None:
    return None


@dataclass
class _Track:
    path: str
    pending: Any  # the store's PendingFile
    nbytes: int
    starts: list[int] = field(default_factory=list)
    embeddings: dict[int, np.ndarray] = field(default_factory=dict)
    n_windows: int | None = None  # known once decoding ended
    n_samples: int = 0


class Gatherer:
    """Per-track bookkeeping: answered windows back into tracks, complete tracks into the store.

    Tracks are created at their first message and dropped when finished or
    failed, so a million-file run holds state for the files in flight only.
    Commits follow the policy of ``commit_every_tracks`` / ``commit_every_seconds``.
    """

    def __init__(
        self,
        pending: list[Any],
        store: Any,
        summary: RunSummary,
        progress: Progress,
        sample_rate: int,
        commit_every_tracks: int,
        commit_every_seconds: float,
        *,
        confirm: Callable[[], None] = _nothing,
        abandon: Callable[[int], None] = _nothing,
    ) -> None:
        """``confirm`` runs before each commit (raises if the served model changed);
        ``abandon(track)`` is told of a track that failed while it was still decoding."""
        self.pending = pending
        self.store = store
        self.summary = summary
        self.progress = progress
        self.sample_rate = sample_rate
        self.commit_every_tracks = commit_every_tracks
        self.commit_every_seconds = commit_every_seconds
        self.confirm = confirm
        self.abandon = abandon
        self._tracks: dict[int, _Track] = {}
        self._dead: set[int] = set()  # failed before decoding ended: ignore what still comes
        self._uncommitted = 0
        self._last_commit = time.monotonic()

    def window(self, msg: WindowReady) -> None:
        if msg.track not in self._dead:
            self._track(msg.track).starts.append(msg.start)

    def decoded(self, msg: TrackDecoded) -> None:
        if msg.track in self._dead:
            self._dead.discard(msg.track)
            return
        tr = self._track(msg.track)
        tr.n_windows, tr.n_samples = msg.n_windows, msg.n_samples
        if len(tr.embeddings) == msg.n_windows:
            self._finish(msg.track)

    def failed(self, msg: TrackFailed) -> None:
        """Name the file in the summary (and the store, to retry it): the run goes on."""
        if msg.track in self._dead:  # already failed on an answer; decoding then failed too
            self._dead.discard(msg.track)
            return
        tr = self._track(msg.track)
        del self._tracks[msg.track]
        exc = msg.error
        if isinstance(exc, SkipTrack):
            self.summary.skipped.append((tr.path, str(exc)))
        else:
            self._record_failure(tr.path, exc.reason)
        # Its windows already batched come back and are dropped.
        self.progress.track_done(0.0, tr.nbytes)

    def answered(self, rows: list[Row], emb: np.ndarray) -> None:
        bad = ~np.isfinite(emb).all(axis=1) | (np.abs(emb) > FLOAT16_MAX).any(axis=1)
        for (t, k), e, poisoned in zip(rows, emb, bad, strict=True):
            tr = self._tracks.get(t)
            if tr is None:  # the track failed after this batch left
                continue
            if poisoned:
                self._poisoned(t, k, e)
            else:
                tr.embeddings[k] = e
        self.progress.windows(len(rows))
        for t in {t for t, _ in rows}:
            tr = self._tracks.get(t)
            if tr is not None and tr.n_windows is not None and len(tr.embeddings) == tr.n_windows:
                self._finish(t)

    def maybe_commit(self, force: bool = False) -> None:
        due = (
            self._uncommitted >= self.commit_every_tracks
            or time.monotonic() - self._last_commit > self.commit_every_seconds
        )
        if self._uncommitted and (force or due):
            self.confirm()  # raises, and nothing is committed, if the served model changed
            self.store.commit()
            self._uncommitted = 0
            self._last_commit = time.monotonic()

    def _track(self, i: int) -> _Track:
        tr = self._tracks.get(i)
        if tr is None:
            p = self.pending[i]
            tr = self._tracks[i] = _Track(str(p.path), p, file_size(p))
        return tr

    def _poisoned(self, i: int, k: int, e: np.ndarray) -> None:
        """Fail track ``i``: the server answered window ``k`` with ``e``, unstorable."""
        tr = self._tracks.pop(i)
        what = "NaN or infinity" if not np.isfinite(e).all() else "values beyond float16 range"
        start = tr.starts[k] / self.sample_rate if k < len(tr.starts) else None
        where = f"window {k}" + (f" (at {start:.1f} s)" if start is not None else "")
        self._record_failure(tr.path, f"the server answered {what} for {where}")
        if tr.n_windows is None:  # still decoding: stop it, and ignore what it still posts
            self._dead.add(i)
            self.abandon(i)
        self.progress.track_done(0.0, tr.nbytes)

    def _record_failure(self, path: str, reason: str) -> None:
        self.summary.failed.append((path, reason))
        self.store.record_failure(path, reason)

    def _finish(self, i: int) -> None:
        tr = self._tracks.pop(i)
        emb = np.stack([tr.embeddings[k] for k in range(tr.n_windows or 0)])
        seconds = tr.n_samples / self.sample_rate
        try:
            self.store.add_track(
                tr.pending,
                n_samples=tr.n_samples,
                sample_rate=self.sample_rate,
                starts=np.asarray(tr.starts, dtype=np.int64),
                embeddings=emb.astype(np.float32, copy=False),
            )
        except StoreError as exc:  # this track is unstorable (the store names the file)
            reason = str(exc).removeprefix(f"{tr.path}: ")
            log.warning("%s", exc)
            self._record_failure(tr.path, reason)
            self.progress.track_done(0.0, tr.nbytes)
            return
        self.summary.indexed += 1
        self.summary.windows += len(emb)
        self.summary.audio_seconds += seconds
        self._uncommitted += 1
        self.progress.track_done(seconds, tr.nbytes)


def file_size(pending: Any) -> int:
    """Bytes of a pending file, for the ETA: the store's plan knows them, else stat."""
    size = getattr(pending, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.stat(pending.path).st_size
    except OSError:
        return 0
