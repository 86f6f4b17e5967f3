"""Cut audio into fixed, full-length windows.

Windows are always full length: MERT's first conv layer normalises over the
whole window, so zero padding changes the embedding (a 3 s clip padded to 5 s
gave cosine 0.82 against itself). Windows start every ``hop`` samples; when
the last of those does not reach the end of the track, one more window is
aligned to the track's end. A track shorter than one window has no windows:
the pipeline reports it as too short rather than pad it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def window_starts(n_samples: int, window: int, hop: int) -> np.ndarray:
    """Start sample of every window of a track of ``n_samples`` samples."""
    if window <= 0 or hop <= 0:
        raise ValueError("window and hop must be positive")
    if n_samples < window:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, n_samples - window + 1, hop, dtype=np.int64)
    if starts[-1] != n_samples - window:
        starts = np.append(starts, n_samples - window)
    return starts


def cut(audio: np.ndarray, window: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """All windows of an in-memory signal: (starts, windows [n, window])."""
    starts = window_starts(len(audio), window, hop)
    if len(starts) == 0:
        return starts, np.zeros((0, window), dtype=audio.dtype)
    frames = np.lib.stride_tricks.sliding_window_view(audio, window)[starts]
    return starts, np.ascontiguousarray(frames)


class StreamWindower:
    """Windows of a stream of blocks, as ``(start, window)``, in bounded memory.

    :meth:`run` yields exactly the windows :func:`window_starts` describes
    for the stream's total length, holding at most about ``window + hop``
    samples plus one block; :attr:`n_samples` is the length seen so far.
    """

    def __init__(self, window: int, hop: int) -> None:
        if window <= 0 or hop <= 0:
            raise ValueError("window and hop must be positive")
        self.window = window
        self.hop = hop
        self.n_samples = 0

    def run(self, blocks: Iterable[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        window, hop = self.window, self.hop
        parts: list[np.ndarray] = []  # held samples, joined only when a window is complete
        held = 0
        buf_start = 0  # absolute index of the first held sample
        next_start = 0  # next regular window start
        last_emitted = -1
        for block in blocks:
            if not len(block):
                continue
            parts.append(block)
            held += len(block)
            self.n_samples += len(block)
            if next_start + window > buf_start + held:
                continue
            buf = np.concatenate(parts) if len(parts) > 1 else parts[0]
            while next_start + window <= buf_start + held:
                off = next_start - buf_start
                yield next_start, buf[off : off + window].copy()
                last_emitted = next_start
                next_start += hop
            # Keep only what a later window (or the end-aligned one) can still need:
            # at most the last ``window`` samples.
            keep_from = min(next_start, max(0, self.n_samples - window))
            if keep_from > buf_start:
                buf = buf[keep_from - buf_start :]
                held -= keep_from - buf_start
                buf_start = keep_from
            parts = [buf] if held else []
        end_start = self.n_samples - window
        if end_start >= 0 and end_start != last_emitted:
            buf = np.concatenate(parts) if len(parts) > 1 else parts[0]
            off = end_start - buf_start
            yield end_start, buf[off : off + window].copy()


def to_wire(samples: np.ndarray, dtype: str) -> np.ndarray:
    """Float samples in [-1, 1] to the served input dtype (int16 halves the bytes).

    Works on any shape: the pipeline converts whole decoded blocks, once per
    sample, before windowing (with overlapping hops a window-wise conversion
    would convert samples twice).
    """
    if dtype == "int16":
        scaled = np.multiply(samples, np.float32(32767.0), dtype=np.float32)
        np.rint(scaled, out=scaled)
        np.clip(scaled, -32768, 32767, out=scaled)
        return scaled.astype(np.int16)
    return samples.astype(dtype, copy=False)
