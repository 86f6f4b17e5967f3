"""The live index generation, swapped for a newer one without a restart.

``indexer-client`` and ``indexer-merge`` write a new generation beside the
live one and then replace ``index/CURRENT`` atomically
(:mod:`mert_indexer.indexer.generation`). A watcher thread reads ``CURRENT``
every ``watch_seconds``; when it names another generation, the watcher loads
it -- on its own thread, never on a request's -- and swaps it in under a lock,
in one assignment. A query holds a reference to the generation it started on
(:meth:`Generations.use`) and finishes on it; the swap drops only the
service's own reference, and the generation is closed when its last query
releases it. The build deletes the old generation's files right after the
switch; a loaded generation does not need them (its FAISS index is in memory,
its segment files are open), so queries on it go on undisturbed.

Each generation carries its track-similarity finder
(:class:`~mert_indexer.indexer.similarity.TrackFinder`), made when it is loaded
over the generation's own loaded index (no second copy) with the content hashes
the catalog holds then; it lives and is released with its generation. A
generation built before track similarity has no finder and says why
(:attr:`LiveIndex.finder_problem`).

A generation that fails to load (unreadable, or vanished under a second
build) leaves the live one serving; it is retried after
``reload_failed_seconds`` or as soon as ``CURRENT`` moves on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mert_indexer.errors import IndexerError
from mert_indexer.indexer.catalog import Catalog
from mert_indexer.indexer.generation import INDEX_DIR, read_current
from mert_indexer.indexer.search import Searcher
from mert_indexer.indexer.similarity import TrackFinder
from mert_indexer.indexer.store import CATALOG_FILE
from mert_indexer.service.metrics import Metrics
from mert_indexer.service.periodic import keep_checking

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackInfo:
    track_id: int
    track: str  # the path as indexed
    windows: int
    duration_seconds: float


class LiveIndex:
    """One loaded generation: its searcher, its tracks by id, its track finder, who uses it.

    Raises :class:`StoreError` when the catalog's content hashes cannot be read.
    """

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self.info: dict[str, Any] = searcher.info
        self.name = str(self.info.get("generation", ""))
        # The loaded generation (`Searcher.index`): its tables, and the track finder over it.
        self._loaded = searcher.index
        runs = self._loaded.runs
        self._order = np.argsort(runs[:, 4], kind="stable")  # runs by track id
        self._run_of = {int(tid): int(run) for run, tid in enumerate(runs[:, 4])}
        identity = searcher.identity
        self.window_seconds = int(identity["window_samples"]) / int(identity["sample_rate"])
        self.finder: TrackFinder | None = None
        self.finder_problem: str | None = None
        if self._loaded.tracks is None:
            self.finder_problem = (
                f"index generation {self.name} has no track index (built before track "
                "similarity): rebuild the index"
            )
        else:
            self.finder = TrackFinder(self._loaded, _content_hashes(searcher.index_dir))
        self._refs = 1  # the service's own, dropped when a newer generation replaces it

    @property
    def n_tracks(self) -> int:
        return len(self._run_of)

    def track(self, track_id: int) -> TrackInfo | None:
        run = self._run_of.get(track_id)
        return None if run is None else self._info(run)

    def tracks(self, offset: int, limit: int) -> list[TrackInfo]:
        """Tracks ordered by id, ``limit`` of them from position ``offset``."""
        return [self._info(int(run)) for run in self._order[offset : offset + limit]]

    def duration(self, track_id: int) -> float | None:
        run = self._run_of.get(track_id)
        return None if run is None else self._duration(run)

    def _info(self, run: int) -> TrackInfo:
        row = self._loaded.runs[run]
        return TrackInfo(
            track_id=int(row[4]),
            track=self._loaded.paths[run],
            windows=int(row[3]),
            duration_seconds=round(self._duration(run), 3),
        )

    def _duration(self, run: int) -> float:
        # The last window of a track is aligned to its end (or the track is one window).
        _, starts = self._loaded.track_windows(run)
        return float(starts[-1]) + self.window_seconds if len(starts) else 0.0

    def close(self) -> None:
        # The finder shares the searcher's loaded index: closing the searcher closes both.
        self.searcher.close()


def _content_hashes(index_dir: Path) -> dict[int, str]:
    """Catalog track id -> content hash: tracks sharing one are left out of each other's lists."""
    catalog = Catalog(index_dir / CATALOG_FILE, read_only=True)
    try:
        return {t.id: t.content_hash for t in catalog.tracks()}
    finally:
        catalog.close()


class Generations:
    """The live generation of an index folder, watched, swapped, reference-counted.

    Thread-safe. ``load`` makes a :class:`Searcher` of the folder (the default;
    a test may slow it down to widen the swap's window).
    """

    def __init__(
        self,
        index_dir: Path,
        metrics: Metrics,
        *,
        watch_seconds: float = 1.0,
        reload_failed_seconds: float = 30.0,
        load: Callable[[Path], Searcher] = Searcher,
    ) -> None:
        self.index_dir = index_dir
        self._metrics = metrics
        self._watch_seconds = watch_seconds
        self._reload_failed_seconds = reload_failed_seconds
        self._load = load
        self._lock = threading.Lock()
        self._live: LiveIndex | None = None
        self._held = 0
        self._failed: tuple[str, float] | None = None  # (generation, when)
        self.problem: str | None = "the index has not been loaded yet"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Load the live generation (on the watcher thread) and keep watching ``CURRENT``."""
        self._thread = threading.Thread(target=self._watch, name="index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            live, self._live = self._live, None
        if live is not None:
            self._release(live)

    @property
    def live(self) -> LiveIndex | None:
        """The live generation, for a look (counts, identity); :meth:`use` to search it."""
        return self._live

    @property
    def held(self) -> int:
        """Generations loaded: the live one and old ones still in use."""
        return self._held

    @contextlib.contextmanager
    def use(self) -> Iterator[LiveIndex | None]:
        """The live generation, kept loaded until the block ends (``None``: none loaded)."""
        with self._lock:
            live = self._live
            if live is not None:
                live._refs += 1
        try:
            yield live
        finally:
            if live is not None:
                self._release(live)

    def check(self) -> None:
        """Look at ``CURRENT`` once and load a new generation if it names one."""
        try:
            name = read_current(self.index_dir / INDEX_DIR)
        except IndexerError as exc:
            self.problem = str(exc)
            return
        if name is None:
            if self._live is None:
                self.problem = f"{self.index_dir}: no index has been built (run the indexer first)"
            return
        if self._live is not None and name == self._live.name:
            return
        failed = self._failed
        if (
            failed is not None
            and failed[0] == name
            and time.monotonic() - failed[1] < self._reload_failed_seconds
        ):
            return
        self._swap_in(name)

    def _watch(self) -> None:
        keep_checking(
            self.check, self._stop, lambda: self._stop.wait(self._watch_seconds), "index watcher"
        )

    def _swap_in(self, name: str) -> None:
        t0 = time.perf_counter()
        try:
            live = self._load_live(self.index_dir)
        except IndexerError as exc:
            self._failed = (name, time.monotonic())
            if self._live is None:
                self.problem = str(exc)
            log.error("generation %s not loaded (%s); still serving %s", name, exc, self._gen())
            return
        if live.finder_problem is not None:
            log.warning("%s; track similarity is unavailable", live.finder_problem)
        with self._lock:
            self._held += 1
            if self._live is not None and live.name == self._live.name:
                old: LiveIndex | None = live  # CURRENT moved back: keep what is live
            else:
                old, self._live = self._live, live
            self._failed = None
            self.problem = None
        self._metrics.generations_held.set(self._held)
        if old is not live:
            self._publish(live)
            self._metrics.swaps.inc()
            log.info(
                "serving index generation %s (%d tracks, %d windows), loaded in %.2f s",
                live.name,
                live.n_tracks,
                int(live.info["n_vectors"]),
                time.perf_counter() - t0,
            )
        if old is not None:
            self._release(old)

    def _load_live(self, index_dir: Path) -> LiveIndex:
        searcher = self._load(index_dir)
        try:
            return LiveIndex(searcher)
        except BaseException:
            searcher.close()
            raise

    def _gen(self) -> str:
        return self._live.name if self._live is not None else "nothing"

    def _publish(self, live: LiveIndex) -> None:
        m = self._metrics
        if live.name.isdigit():
            m.generation.set(int(live.name))
        m.windows.set(int(live.info.get("n_vectors", 0)))
        m.tracks.set(live.n_tracks)
        m.index_bytes.set(int(live.info.get("bytes", 0)))

    def _release(self, live: LiveIndex) -> None:
        with self._lock:
            live._refs -= 1
            last = live._refs == 0
            if last:
                self._held -= 1
        if last:
            live.close()
            self._metrics.generations_held.set(self._held)
            log.info("released index generation %s", live.name)
