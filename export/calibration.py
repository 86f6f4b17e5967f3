"""Calibration windows for static INT8: from a folder of audio, or a documented synthetic default.

Files are decoded by the client's decoder (:mod:`mert_indexer.client.decode`:
libsndfile with a PyAV fallback, channels averaged, soxr resampling), so
calibration hears what indexing will, and cut into full windows spread over
the files. A file that cannot be decoded is skipped and named in the log; a
folder that yields no window is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from export import synth
from mert_indexer.client.decode import AUDIO_SUFFIXES, decode
from mert_indexer.errors import ConfigError, DecodeError

log = logging.getLogger(__name__)

# The synthetic calibration set uses its own seed so that it never equals the
# validation set (which would flatter the INT8 gate).
CALIBRATION_SEED_OFFSET = 7919


def calibration_windows(
    folder: Path | None, count: int, window_samples: int, sample_rate: int, seed: int
) -> np.ndarray:
    """``[n <= count, window_samples]`` float32 in [-1, 1]."""
    if folder is None:
        log.info(
            "calibrating INT8 on %d synthetic music-like windows (no --calibration given)", count
        )
        return synth.windows(count, window_samples, sample_rate, seed + CALIBRATION_SEED_OFFSET)
    return folder_windows(folder, count, window_samples, sample_rate)


def folder_windows(folder: Path, count: int, window_samples: int, sample_rate: int) -> np.ndarray:
    """Up to ``count`` windows, taken evenly from every decodable file under ``folder``."""
    if not folder.is_dir():
        raise ConfigError(f"--calibration {folder}: not a folder")
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
    )
    if not files:
        raise ConfigError(
            f"--calibration {folder}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})"
        )
    per_file = max(1, -(-count // len(files)))
    picked: list[np.ndarray] = []
    skipped = 0
    for path in files:
        try:
            audio = decode(path, sample_rate)
        except DecodeError as exc:
            skipped += 1
            log.warning("calibration: skipping %s: %s", path, exc.reason)
            continue
        available = len(audio) // window_samples
        if available == 0:
            continue
        starts = np.linspace(0, len(audio) - window_samples, num=min(per_file, available)).astype(
            int
        )
        picked.extend(audio[s : s + window_samples] for s in starts)
        if len(picked) >= count:
            break
    if skipped:
        log.warning("calibration: %d of %d files could not be decoded", skipped, len(files))
    if not picked:
        raise ConfigError(
            f"--calibration {folder}: no file gave a full {window_samples / sample_rate:g} s window"
        )
    return np.stack(picked[:count]).astype(np.float32)
