"""Size the client from the machine and the served model: decode threads, request size, in flight.

The rules, and the measurements behind them (docs/client.md):

- decode threads = the cores this process may use: decoding is nearly all
  of the client's CPU time, and soundfile + soxr scale across threads;
- PyAV processes = the same number, started only if a file needs one;
- windows per request = 16, never above ``max_batch_size`` (1 without
  batching): over gRPC, 16 cost the client the least CPU per window (64 cost
  2.7x more: big messages); the server's dynamic batcher merges concurrent
  requests into its own batches anyway, so the request need not be the
  server's batch. ``preferred_batch_size`` is not used: Triton fills it in
  with ``max_batch_size`` when a config leaves it out;
- requests in flight = per endpoint, enough to keep two full server batches
  queued per model instance (one executing, one waiting), at least two per
  instance; capped so the slot buffers stay under 512 MiB.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from mert_indexer.client.triton_io import ServedModel

DEFAULT_REQUEST_WINDOWS = 16
MAX_SLOT_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class Sizing:
    decode_workers: int
    pyav_processes: int
    batch_size: int
    in_flight: int


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 2


def choose(
    served: ServedModel,
    window_bytes: int,
    *,
    cores: int | None = None,
    workers: int | None = None,
    pyav_processes: int | None = None,
    batch_size: int | None = None,
    in_flight: int | None = None,
) -> Sizing:
    """The automatic sizing, with any explicit choice taking precedence."""
    cores = cores or usable_cores()
    decode_workers = workers or cores
    max_batch = served.max_batch_size
    if batch_size is None:
        batch_size = min(DEFAULT_REQUEST_WINDOWS, max_batch) if max_batch > 0 else 1
    if in_flight is None:
        server_batch = max(max_batch, 1)
        per_instance = max(2, math.ceil(2 * server_batch / batch_size))
        in_flight = sum(per_instance * n for n in served.instances)
        in_flight = max(1, min(in_flight, MAX_SLOT_BYTES // max(1, batch_size * window_bytes)))
    return Sizing(
        decode_workers=decode_workers,
        pyav_processes=decode_workers if pyav_processes is None else pyav_processes,
        batch_size=batch_size,
        in_flight=in_flight,
    )
