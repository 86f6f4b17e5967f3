"""The indexing pipeline: decode -> window -> batch -> infer -> gather -> store.

Stages are joined by bounded queues so memory stays flat whatever the
catalogue: decoders block when the window queue is full, and the batcher
blocks when every request slot is in flight, so a slow server slows the
decoders instead of filling memory. Decoding runs in threads (soundfile and
soxr release the GIL); files only PyAV reads go to a pool of decoder
processes (PyAV holds the GIL). The store is touched from the calling thread
only. The stages are :mod:`.decoders` (threads: decode, window, wire dtype),
:mod:`.batcher` (slots, requests, answers) and :mod:`.gatherer` (windows back
into tracks, tracks into the store); this module wires them and runs the loop.

A bad file is recorded and skipped; the run goes on: one that cannot be
decoded (whatever the decoder raised), breaks a cap of :mod:`.decode`, or
that the server answers with NaN, infinity or values beyond float16. An error
that stops the run (no server within the deadline, a worker crash, Ctrl-C)
first commits every track already complete, so a rerun only does the rest,
and is then raised in the calling thread. The one exception is a change of
the served model (:class:`~mert_indexer.errors.ModelChangedError`):
tracks completed since the last commit may hold the new model's vectors, so
they are dropped, and what was committed before (the old model's) stays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mert_indexer.client.batcher import Batcher
from mert_indexer.client.decode import DEFAULT_MAX_TRACK_SECONDS, decode_blocks
from mert_indexer.client.decoders import (
    Decoder,
    DecoderCrashed,
    DecoderExited,
    Decoders,
    HeldWindows,
    Message,
    SkipTrack,
    TrackDecoded,
    TrackFailed,
    WindowReady,
)
from mert_indexer.client.gatherer import Gatherer, file_size
from mert_indexer.client.report import Progress, RunSummary
from mert_indexer.client.transport import BatchSender
from mert_indexer.contract import ModelContract
from mert_indexer.errors import IndexerError, ModelChangedError

__all__ = ["Pipeline", "PipelineOptions", "RunSummary", "SkipTrack"]

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05  # how long the loop waits for a message before sending a partial batch


@dataclass(frozen=True)
class PipelineOptions:
    """How one run is sized and how often it commits; the CLI reads its defaults from here."""

    hop_samples: int
    decode_workers: int = 2
    # Processes for files only PyAV reads; 0 decodes them in the decode threads.
    pyav_processes: int = 2
    commit_every_tracks: int = 64
    # What a crash can cost; 0 commits after every track. The CLI's --commit-seconds default.
    commit_every_seconds: float = 10.0
    # Windows queued between decoders and batcher; default two batches.
    queue_windows: int | None = None
    progress: bool = True
    # The longest track decoded (a cap on hostile input, see client/decode.py); None: no cap.
    max_track_seconds: float | None = DEFAULT_MAX_TRACK_SECONDS

    def __post_init__(self) -> None:
        if self.hop_samples < 1 or self.decode_workers < 1 or self.pyav_processes < 0:
            raise ValueError("hop_samples and decode_workers must be >= 1, pyav_processes >= 0")
        if self.max_track_seconds is not None and not self.max_track_seconds > 0:
            raise ValueError("max_track_seconds must be positive (or None)")


class Pipeline:
    """Runs one indexing pass of ``pending`` files into ``store`` through ``sender``.

    ``decoder`` (a path to float32 blocks at the model's rate) replaces the
    default soundfile/PyAV decoding; tests use it to inject failures.
    """

    def __init__(
        self,
        contract: ModelContract,
        sender: BatchSender,
        store: Any,
        options: PipelineOptions,
        decoder: Decoder | None = None,
    ) -> None:
        self.contract = contract
        self.sender = sender
        self.store = store
        self.options = options
        self._decoder = decoder

    def run(self, pending: Sequence[Any], summary: RunSummary) -> RunSummary:
        """Index ``pending`` (the store's plan), counting into ``summary``; raises what stops it."""
        opts, sender = self.options, self.sender
        start_time = time.monotonic()
        pending = list(pending)
        decoder, pyav = self._decoder_and_pool()
        held = HeldWindows()
        decoders = Decoders(
            self.contract,
            opts.hop_samples,
            decoder,
            [str(p.path) for p in pending],
            workers=max(1, min(opts.decode_workers, len(pending))),
            queue_windows=opts.queue_windows or 2 * sender.batch_size,
            held=held,
        )
        progress = Progress(len(pending), sum(file_size(p) for p in pending), opts.progress)
        gatherer = Gatherer(
            pending,
            self.store,
            summary,
            progress,
            self.contract.sample_rate,
            opts.commit_every_tracks,
            opts.commit_every_seconds,
            confirm=sender.confirm_model,
            abandon=decoders.abandon,
        )
        batcher = Batcher(sender, held, gatherer.answered)
        failed_run = False
        decoders.start()
        try:
            while decoders.live or batcher.outstanding or batcher.filling:
                msg = decoders.get(timeout=POLL_SECONDS)
                if msg is None:
                    batcher.flush()  # nothing new is coming soon: send what we have
                else:
                    _dispatch(msg, decoders, batcher, gatherer)
                batcher.gather(block=False)
                gatherer.maybe_commit()
                summary.peak_windows_held = max(summary.peak_windows_held, held.count)
                if not decoders.live and not batcher.filling and batcher.outstanding:
                    batcher.gather(block=True)
            gatherer.maybe_commit(force=True)
        except BaseException as exc:
            failed_run = True
            decoders.stop.set()
            sender.cancel()
            if isinstance(exc, ModelChangedError):
                log.warning(
                    "the served model changed: tracks done since the last commit are dropped"
                )
                raise
            # Keep what is complete: a rerun does only the rest.
            try:
                gatherer.maybe_commit(force=True)
            except IndexerError as exc:  # the original error matters more
                log.warning("could not commit the completed tracks either: %s", exc)
            except Exception:
                log.exception("could not commit the completed tracks")
            raise
        finally:
            summary.peak_in_flight = max(summary.peak_in_flight, batcher.peak_in_flight)
            # After a failure, requests still in flight are abandoned (closing the
            # connection cancels them); on success there are none left.
            batcher.close(wait=not failed_run)
            decoders.close()
            if pyav is not None:
                pyav.close()
                summary.decoder_process_cpu_seconds += pyav.cpu_seconds
            progress.close()
            summary.wall_seconds += time.monotonic() - start_time
        return summary

    def _decoder_and_pool(self) -> tuple[Decoder, Any]:
        """The given decoder, or soundfile + soxr with PyAV processes for what only PyAV reads."""
        if self._decoder is not None:
            return self._decoder, None
        pyav = None
        if self.options.pyav_processes:  # its processes start only if a file needs PyAV
            from mert_indexer.client.pyav_pool import PyAVPool

            pyav = PyAVPool(self.options.pyav_processes)
        fallback = pyav.blocks if pyav is not None else None
        rate = self.contract.sample_rate
        max_seconds = self.options.max_track_seconds

        def decoder(path: str) -> Iterator[np.ndarray]:
            return decode_blocks(path, rate, fallback=fallback, max_seconds=max_seconds)

        return decoder, pyav


def _dispatch(msg: Message, decoders: Decoders, batcher: Batcher, gatherer: Gatherer) -> None:
    """Route one decoder message to the stage that handles it."""
    if isinstance(msg, WindowReady):
        gatherer.window(msg)
        batcher.add((msg.track, msg.index), msg.samples)
    elif isinstance(msg, TrackDecoded):
        gatherer.decoded(msg)
    elif isinstance(msg, TrackFailed):
        gatherer.failed(msg)
    elif isinstance(msg, DecoderExited):
        decoders.live -= 1
    elif isinstance(msg, DecoderCrashed):
        log.error("decoder thread %s crashed; stopping the run", msg.name)
        raise msg.error
