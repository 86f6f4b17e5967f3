"""Decode audio files to mono float32 at the model's sample rate, in bounded blocks.

libsndfile (through soundfile) and soxr release the GIL, so decoding scales
across threads; PyAV holds it and gets *slower* in a thread pool (measured:
two threads 0.5-0.8x of one). So soundfile + soxr is the primary path, and
PyAV is the fallback for what libsndfile cannot open (m4a/AAC, Ogg files it
rejects, ...). Channels are averaged (FFmpeg's default downmix is 3 dB louder;
one rule everywhere avoids surprises); resampling is soxr's HQ (never
miniaudio's, which aliases). Memory is bounded by the block size whatever the
file's length.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from indexer.errors import DecodeError

log = logging.getLogger(__name__)

BLOCK_FRAMES = 1 << 16  # source frames per read: ~1.4 s at 48 kHz
# Containers libsndfile never reads: go straight to PyAV.
PYAV_ONLY_SUFFIXES = frozenset({".m4a", ".mp4", ".aac", ".wma", ".webm", ".mka", ".opus", ".ac3"})


def decode_blocks(path: str | Path, sample_rate: int) -> Iterator[np.ndarray]:
    """Yield consecutive mono float32 blocks of ``path`` resampled to ``sample_rate``.

    Raises :class:`DecodeError` (naming the file) when neither decoder can
    read it, also when the failure comes mid-stream.
    """
    path = Path(path)
    if not path.exists():
        raise DecodeError(path, "file not found (or a broken symbolic link)")
    if path.is_dir():
        raise DecodeError(path, "is a directory, not an audio file")
    if path.suffix.lower() not in PYAV_ONLY_SUFFIXES:
        try:
            yield from _soundfile_blocks(path, sample_rate)
            return
        except _NotForSoundfile as exc:
            first_reason = str(exc)
    else:
        first_reason = "container not supported by libsndfile"
    try:
        yield from _pyav_blocks(path, sample_rate)
    except _NotForPyAV as exc:
        raise DecodeError(path, f"not a readable audio file ({first_reason}; {exc})") from None


def decode(path: str | Path, sample_rate: int) -> np.ndarray:
    """The whole file as one mono float32 array (for short clips)."""
    blocks = list(decode_blocks(path, sample_rate))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


class _NotForSoundfile(Exception):
    """libsndfile cannot open this file; another decoder may."""


class _NotForPyAV(Exception):
    """FFmpeg cannot open this file either."""


def _mono(block: np.ndarray) -> np.ndarray:
    if block.ndim == 2:
        block = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
    return np.ascontiguousarray(block, dtype=np.float32)


def _soundfile_blocks(path: Path, sample_rate: int) -> Iterator[np.ndarray]:
    import soundfile as sf
    import soxr

    try:
        fh = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise _NotForSoundfile(f"libsndfile: {exc}") from None
    except OSError as exc:
        raise DecodeError(path, exc.strerror or str(exc)) from None
    with fh:
        if fh.samplerate <= 0 or fh.channels <= 0:
            raise _NotForSoundfile("libsndfile: no audio stream")
        resampler = None
        if fh.samplerate != sample_rate:
            resampler = soxr.ResampleStream(fh.samplerate, sample_rate, 1, dtype="float32")
        produced = False
        while True:
            try:
                block = fh.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                if not produced:
                    raise _NotForSoundfile(f"libsndfile: {exc}") from None
                raise DecodeError(path, f"decoding failed mid-stream: {exc}") from None
            last = len(block) < BLOCK_FRAMES
            mono = _mono(block)
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=last)
            if len(mono):
                produced = True
                yield mono
            if last:
                return


def _pyav_blocks(path: Path, sample_rate: int) -> Iterator[np.ndarray]:
    import av
    import soxr

    try:
        # Latin-1 tags make av.open raise unless metadata errors are ignored.
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise _NotForPyAV(f"FFmpeg: {exc}") from None
    except OSError as exc:
        raise DecodeError(path, exc.strerror or str(exc)) from None
    with container:
        if not container.streams.audio:
            raise _NotForPyAV("FFmpeg: no audio stream")
        stream = container.streams.audio[0]
        resampler: soxr.ResampleStream | None = None
        in_rate = 0
        produced = False
        try:
            for frame in container.decode(stream):
                samples = frame.to_ndarray()
                if frame.format.is_planar:
                    samples = samples.mean(axis=0, dtype=np.float32)  # [channels, n]
                else:
                    samples = samples.reshape(-1, len(frame.layout.channels)).mean(
                        axis=1, dtype=np.float32)
                samples = _to_float(samples, frame.format.name)
                if resampler is None:
                    in_rate = frame.sample_rate
                    if in_rate != sample_rate:
                        resampler = soxr.ResampleStream(in_rate, sample_rate, 1, dtype="float32")
                elif frame.sample_rate != in_rate:
                    raise DecodeError(path, "sample rate changes mid-stream")
                if resampler is not None:
                    samples = resampler.resample_chunk(samples)
                if len(samples):
                    produced = True
                    yield samples
        except av.FFmpegError as exc:
            if not produced:
                raise _NotForPyAV(f"FFmpeg: {exc}") from None
            raise DecodeError(path, f"decoding failed mid-stream: {exc}") from None
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                yield tail
        if not produced:
            raise _NotForPyAV("FFmpeg: no audio decoded")


def _to_float(samples: np.ndarray, fmt: str) -> np.ndarray:
    """PyAV integer sample formats to float32 in [-1, 1]."""
    if fmt.startswith("s16"):
        return (samples / 32768.0).astype(np.float32)
    if fmt.startswith("s32"):
        return (samples / 2147483648.0).astype(np.float32)
    if fmt.startswith("u8"):
        return ((samples - 128.0) / 128.0).astype(np.float32)
    return samples.astype(np.float32, copy=False)
