"""Decode and embed a query clip: the same windows as indexing, with a dense hop.

A query clip is decoded whole (its windows overlap densely, so they are cut
from one array), but never more of it than ``max_seconds``: the decoder is
streamed and stopped as soon as a clip passes the cap, so an hour-long upload
costs the cap's worth of memory, not the hour's. The windows are then sent a
batch at a time, converted to the wire dtype once per sample; only one batch
of windows exists at a time (a 600 s clip at 0.5 s hop is 1,190 windows,
0.6 GB as float32 if cut all at once).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import cast

import numpy as np

from mert_indexer.client.decode import decode_blocks
from mert_indexer.client.tuning import DEFAULT_REQUEST_WINDOWS
from mert_indexer.client.windows import to_wire, window_starts
from mert_indexer.contract import ModelContract
from mert_indexer.errors import ClipTooLongError, ClipTooShortError, DecodeError

DEFAULT_QUERY_HOP_SECONDS = 0.5
# Ten minutes: longer than any excerpt worth identifying, and at 24 kHz float32
# 58 MB of decoded audio -- what one request may make a service hold.
DEFAULT_MAX_CLIP_SECONDS = 600.0

Infer = Callable[[np.ndarray], np.ndarray]


def decode_clip(
    path: str | Path,
    sample_rate: int,
    *,
    max_seconds: float | None = None,
    name: str | None = None,
) -> np.ndarray:
    """The clip at ``path`` as mono float32 at ``sample_rate``.

    Raises :class:`ClipTooLongError` as soon as the decoded audio passes
    ``max_seconds`` (``None``: no cap), :class:`DecodeError` when it cannot be
    decoded. Both name the clip ``name`` (default: ``path``), so a temporary
    file holding an upload is reported under the upload's name.
    """
    label = str(path) if name is None else name
    limit = None if max_seconds is None else round(max_seconds * sample_rate)
    blocks: list[np.ndarray] = []
    held = 0
    # A generator: closing it closes the file.
    stream = cast(Generator[np.ndarray, None, None], decode_blocks(path, sample_rate))
    try:
        for block in stream:
            held += len(block)
            if limit is not None and held > limit:
                raise ClipTooLongError(
                    f"{label}: clip is longer than {max_seconds:g} s, the most a query may "
                    "be (decoding stopped there); send the part to identify"
                )
            blocks.append(block)
    except DecodeError as exc:
        if name is None:
            raise
        raise DecodeError(name, exc.reason) from None
    finally:
        stream.close()  # now, also when the cap stopped the decode
    if not blocks:
        return np.zeros(0, np.float32)
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def embed_audio(
    audio: np.ndarray,
    contract: ModelContract,
    infer: Infer,
    *,
    hop_seconds: float = DEFAULT_QUERY_HOP_SECONDS,
    batch_size: int = DEFAULT_REQUEST_WINDOWS,
    name: str = "clip",
) -> tuple[np.ndarray, np.ndarray]:
    """Return (embeddings [m, D], window starts in seconds) of decoded ``audio``.

    A clip shorter than one window cannot be matched: MERT's embedding of a
    padded window differs from the unpadded one, so it is refused
    (:class:`ClipTooShortError` naming ``name``).
    """
    window = contract.window_samples
    if len(audio) < window:
        raise ClipTooShortError(
            f"{name}: clip is {len(audio) / contract.sample_rate:.2f} s; queries need at "
            f"least one full window ({contract.window_seconds:.2f} s)"
        )
    hop = max(1, round(hop_seconds * contract.sample_rate))
    starts = window_starts(len(audio), window, hop)
    # Elementwise, so converting the clip once equals converting each window.
    frames = np.lib.stride_tricks.sliding_window_view(to_wire(audio, contract.input_dtype), window)
    bs = max(1, min(batch_size, contract.max_batch_size or batch_size))
    parts = [
        infer(np.ascontiguousarray(frames[starts[i : i + bs]])) for i in range(0, len(starts), bs)
    ]
    return np.concatenate(parts).astype(np.float32), starts / contract.sample_rate


def embed_clip(
    path: str | Path,
    contract: ModelContract,
    infer: Infer,
    *,
    hop_seconds: float = DEFAULT_QUERY_HOP_SECONDS,
    batch_size: int = DEFAULT_REQUEST_WINDOWS,
    max_clip_seconds: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (embeddings [m, D], window starts in seconds within the clip) of a file.

    :func:`decode_clip` then :func:`embed_audio`; uncapped unless
    ``max_clip_seconds`` is given.
    """
    audio = decode_clip(path, contract.sample_rate, max_seconds=max_clip_seconds)
    return embed_audio(
        audio, contract, infer, hop_seconds=hop_seconds, batch_size=batch_size, name=str(path)
    )
