"""Embed a query clip: the same windows as indexing, with a dense hop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mert_indexer.client.decode import decode
from mert_indexer.client.windows import cut, to_wire
from mert_indexer.contract import ModelContract
from mert_indexer.errors import QueryError

DEFAULT_QUERY_HOP_SECONDS = 0.5


def embed_clip(
    path: str | Path,
    contract: ModelContract,
    infer: Callable[[np.ndarray], np.ndarray],
    *,
    hop_seconds: float = DEFAULT_QUERY_HOP_SECONDS,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (embeddings [m, D], window starts in seconds within the clip).

    A clip shorter than one window cannot be matched: MERT's embedding of a
    padded window differs from the unpadded one, so it is refused.
    """
    audio = decode(path, contract.sample_rate)
    if len(audio) < contract.window_samples:
        raise QueryError(
            f"{path}: clip is {len(audio) / contract.sample_rate:.2f} s; queries need at "
            f"least one full window ({contract.window_seconds:.2f} s)"
        )
    hop = max(1, round(hop_seconds * contract.sample_rate))
    starts, windows = cut(audio, contract.window_samples, hop)
    wire = to_wire(windows, contract.input_dtype)
    bs = max(1, min(batch_size, contract.max_batch_size or batch_size))
    parts = [infer(wire[i : i + bs]) for i in range(0, len(wire), bs)]
    return np.concatenate(parts).astype(np.float32), starts / contract.sample_rate
