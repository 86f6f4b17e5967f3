"""INT8 calibration windows from a folder: the client's decoder, windows spread over the files.

No model and no torch: :func:`export.calibration.folder_windows` on audio
files the tests write (an .m4a through PyAV, a .flac through libsndfile).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from export.calibration import folder_windows  # noqa: E402
from mert_indexer.client import synth  # noqa: E402
from mert_indexer.client.decode import decode  # noqa: E402
from mert_indexer.errors import ConfigError  # noqa: E402

SR = 24_000
WINDOW = SR  # 1 s windows keep the files short


def test_m4a_calibration_file_is_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An .m4a (AAC, PyAV-only) gives windows, cut evenly from the client's decoding of it."""
    path = synth.write(tmp_path / "a.m4a", synth.music(4.0, seed=1), 44_100)
    with caplog.at_level(logging.WARNING, logger="export.calibration"):
        windows = folder_windows(tmp_path, 3, WINDOW, SR)
    assert "skipping" not in caplog.text
    audio = decode(path, SR)
    starts = np.linspace(0, len(audio) - WINDOW, num=3).astype(int)
    assert windows.dtype == np.float32 and windows.shape == (3, WINDOW)
    np.testing.assert_array_equal(windows, np.stack([audio[s : s + WINDOW] for s in starts]))
    assert np.abs(windows).max() > 0.01  # music, not silence


def test_windows_are_spread_over_files_and_bad_files_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    synth.write(tmp_path / "a.m4a", synth.music(3.0, seed=2), 44_100)
    synth.write(tmp_path / "b.flac", synth.music(3.0, seed=3), 48_000)
    # Sorted first, so it is tried before the other two have filled the count.
    (tmp_path / "0_broken.wav").write_bytes(np.random.default_rng(0).bytes(1000))
    with caplog.at_level(logging.WARNING, logger="export.calibration"):
        windows = folder_windows(tmp_path, 4, WINDOW, SR)
    assert windows.shape == (4, WINDOW)
    by_file = [decode(tmp_path / name, SR) for name in ("a.m4a", "b.flac")]
    for i, audio in enumerate(by_file):  # two windows from each file, in file order
        for j, s in enumerate(np.linspace(0, len(audio) - WINDOW, num=2).astype(int)):
            np.testing.assert_array_equal(windows[2 * i + j], audio[s : s + WINDOW])
    assert f"skipping {tmp_path / '0_broken.wav'}" in caplog.text
    assert "1 of 3 files could not be decoded" in caplog.text


def test_folder_without_a_full_window_is_an_error(tmp_path: Path) -> None:
    synth.write(tmp_path / "short.m4a", synth.music(0.5, seed=4), 44_100)
    with pytest.raises(ConfigError, match="no file gave a full 1 s window"):
        folder_windows(tmp_path, 4, WINDOW, SR)


def test_folder_without_audio_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(ConfigError, match="no audio files"):
        folder_windows(tmp_path, 4, WINDOW, SR)
