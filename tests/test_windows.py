"""Windowing: full-length windows only, the last aligned to the end, streamed == in-memory."""

from __future__ import annotations

import numpy as np
import pytest

from mert_indexer.client.windows import StreamWindower, cut, to_wire, window_starts


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, []),
        (4, []),
        (5, [0]),
        (10, [0, 5]),
        (12, [0, 5, 7]),
        (15, [0, 5, 10]),
        (17, [0, 5, 10, 12]),
    ],
)
def test_starts_full_length_last_aligned_to_end(n, expected):
    assert window_starts(n, 5, 5).tolist() == expected


def test_overlapping_hop():
    assert window_starts(12, 4, 2).tolist() == [0, 2, 4, 6, 8]
    assert window_starts(13, 4, 2).tolist() == [0, 2, 4, 6, 8, 9]


@pytest.mark.parametrize("n", [0, 3, 5, 9, 10, 11, 23, 100, 101])
@pytest.mark.parametrize("block", [1, 3, 7, 50])
@pytest.mark.parametrize("hop", [2, 5])
def test_stream_equals_in_memory(n, block, hop):
    audio = np.arange(n, dtype=np.float32)
    w = StreamWindower(5, hop)
    got = list(w.run(audio[i : i + block] for i in range(0, n, block)))
    starts, frames = cut(audio, 5, hop)
    assert [s for s, _ in got] == starts.tolist()
    assert w.n_samples == n
    for (s, win), ref in zip(got, frames, strict=True):
        assert len(win) == 5 and np.array_equal(win, ref) and win[0] == s


def test_stream_memory_is_bounded():
    """The windower never holds much more than a window plus a block."""
    import mert_indexer.client.windows as mod

    held = []
    real = np.concatenate

    def spy(arrays, *a, **k):
        out = real(arrays, *a, **k)
        held.append(len(out))
        return out

    mod.np.concatenate = spy
    try:
        w = StreamWindower(100, 100)
        n = sum(1 for _ in w.run(np.ones(37, dtype=np.float32) for _ in range(1000)))
    finally:
        mod.np.concatenate = real
    assert w.n_samples == 37_000 and n == 370
    assert max(held) <= 100 + 100 + 37


def test_to_wire_int16_clips_and_rounds():
    x = np.array([0.0, 0.5, -1.0, 1.0, 2.0, -2.0], dtype=np.float32)
    assert to_wire(x, "int16").tolist() == [0, 16384, -32767, 32767, 32767, -32768]
    assert to_wire(x, "float32").dtype == np.float32
