"""Decode audio files to mono float32 at the model's sample rate, in bounded blocks.

At the ~400-line norm: the caps on hostile input sit next to each decoder path.

libsndfile (through soundfile) and soxr release the GIL, so decoding scales
across threads; PyAV holds it and gets *slower* in a thread pool (measured:
two threads 0.6x of one). So soundfile + soxr is the primary path, and PyAV
is the fallback for what libsndfile cannot open (m4a/AAC, Ogg files it
rejects, ...); :mod:`mert_indexer.client.pyav_pool` runs that fallback in processes so it
does not stall the other threads. Channels are averaged (FFmpeg's default
downmix is 3 dB louder; one rule everywhere avoids surprises); resampling is
soxr's HQ (never miniaudio's, which aliases). Memory is bounded by the block
size whatever the file's length.

Hostile or broken headers are refused before they cost memory or time, each
with a message naming the file (caps below, documented in the README):

- ``MIN_SOURCE_RATE`` (8 kHz): the lowest sample rate read. Below it there is
  no music left for MERT (trained on 24 kHz music; 8 kHz is already the
  telephone band), and such rates are what broken or hostile headers claim:
  a 131 kB WAV "at 1 Hz" would resample into tens of hours of audio.
- ``MAX_BLOCK_OUTPUT`` (2^18 samples, 1 MiB of float32): about the most one
  block yields after resampling (soxr releases output in bursts at extreme
  ratios: up to 1.5x, measured); reads shrink so that a block never upsamples
  past it, and so that a header claiming a thousand channels cannot make one read
  hold more than ``MAX_READ_SAMPLES`` samples either.
- ``max_seconds`` (default ``DEFAULT_MAX_TRACK_SECONDS``, 6 h; the indexer's
  ``--max-track-hours``): the longest track decoded. Long-form works and DJ
  mixes run a few hours; what is longer is a broken length or a concatenation,
  and a track is embedded as a whole (6 h is 4,320 windows, 13 MB of vectors
  held until the track completes).
- Samples that are NaN or infinite (float WAV/AIFF can hold them) make the
  file fail: they would reach the model as garbage or NaN.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mert_indexer.errors import DecodeError

log = logging.getLogger(__name__)

BLOCK_FRAMES = 1 << 16  # source frames per read: ~1.4 s at 48 kHz
# PyAV hands out ~1024-sample frames; they are gathered into blocks of this
# many source frames, so per-block costs (numpy, soxr, IPC) stay negligible.
PYAV_GATHER_FRAMES = 1 << 16
# What this module reads, by file name: the one list (discovery and the
# export's calibration import it). Containers libsndfile never reads go
# straight to PyAV; the rest try libsndfile first.
PYAV_ONLY_SUFFIXES = frozenset({".m4a", ".mp4", ".aac", ".wma", ".webm", ".mka", ".opus", ".ac3"})
SOUNDFILE_SUFFIXES = frozenset(
    {".wav", ".wave", ".w64", ".rf64", ".aif", ".aiff", ".aifc", ".caf"}  # PCM containers
    | {".flac", ".ogg", ".oga", ".mp3"}  # compressed
)
AUDIO_SUFFIXES = SOUNDFILE_SUFFIXES | PYAV_ONLY_SUFFIXES
OGG_SUFFIXES = frozenset({".ogg", ".oga", ".opus"})
_OGG_MAX_PAGE = 27 + 255 + 255 * 255
# A stream that ends this much before its header's length was cut short
# (decoders disagree by up to ~0.4 s on a whole file).
TRUNCATION_SECONDS = 1.0
TRUNCATION_FRACTION = 0.02
# The caps on hostile input (see the module docstring).
MIN_SOURCE_RATE = 8_000
MAX_BLOCK_OUTPUT = 1 << 18  # samples one block may yield after resampling
MAX_READ_SAMPLES = 1 << 20  # frames x channels one read may hold (4 MiB of float32)
DEFAULT_MAX_TRACK_SECONDS = 6 * 3600.0

Fallback = Callable[[Path, int], Iterator[np.ndarray]]


class NotForThisDecoder(Exception):
    """This decoder cannot open the file (before any audio came out); another may."""


def decode_blocks(
    path: str | Path,
    sample_rate: int,
    *,
    fallback: Fallback | None = None,
    max_seconds: float | None = DEFAULT_MAX_TRACK_SECONDS,
) -> Iterator[np.ndarray]:
    """Yield consecutive mono float32 blocks of ``path`` resampled to ``sample_rate``.

    ``fallback`` decodes what libsndfile cannot (default: PyAV in this
    thread); it raises :class:`NotForThisDecoder` when it cannot open the
    file either. Raises :class:`DecodeError` (naming the file) when no
    decoder can read it, also when the failure comes mid-stream, when the
    file breaks a cap (rate, ``max_seconds``: ``None`` for none, non-finite
    samples) or changes under the reader (removed, cut, unmounted).
    """
    path = Path(path)
    check_readable(path)
    limit = None if max_seconds is None else round(max_seconds * sample_rate)
    produced = 0
    try:
        for block in _any_blocks(path, sample_rate, fallback, max_seconds):
            produced += len(block)
            if limit is not None and produced > limit:
                raise DecodeError(
                    path, f"longer than {_hours(max_seconds)}, the longest track read"
                )
            if not np.isfinite(block).all():
                at = (produced - len(block)) / sample_rate
                raise DecodeError(path, f"samples that are NaN or infinite (near {at:.1f} s)")
            yield block
        if path.suffix.lower() in OGG_SUFFIXES:
            _check_ogg_end(path)
    except OSError as exc:  # the file changed while it was read
        raise DecodeError(path, f"read failed: {exc.strerror or exc}") from None


def _hours(seconds: float | None) -> str:
    seconds = seconds or 0.0
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


def _check_rate(path: Path, rate: int) -> None:
    if rate < MIN_SOURCE_RATE:
        raise DecodeError(
            path,
            f"sample rate {rate} Hz is below {MIN_SOURCE_RATE} Hz, the lowest read "
            "(no music is left there; the header is broken or hostile)",
        )


def _frames_per_read(rate: int, channels: int, out_rate: int) -> int:
    """Source frames per read: ``BLOCK_FRAMES``, fewer where a block would blow up.

    Bounded so the resampled block stays within ``MAX_BLOCK_OUTPUT`` samples and
    one read within ``MAX_READ_SAMPLES`` samples over all channels.
    """
    by_output = MAX_BLOCK_OUTPUT * rate // max(1, out_rate)
    by_channels = MAX_READ_SAMPLES // max(1, channels)
    return max(1, min(BLOCK_FRAMES, by_output, by_channels))


def check_readable(path: str | Path) -> None:
    """Raise :class:`DecodeError` saying why ``path`` is not a readable file, if it is not."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DecodeError(path, "broken symbolic link (its target does not exist)") from None
        raise DecodeError(path, "file not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DecodeError(path, "symbolic link loop") from None
        raise DecodeError(path, exc.strerror or str(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise DecodeError(path, "is a directory, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError(path, "not a regular file (a device, pipe or socket)")
    if not os.access(path, os.R_OK):
        raise DecodeError(path, "permission denied")
    if st.st_size == 0:
        raise DecodeError(path, "empty file (0 bytes)")


def _any_blocks(
    path: Path, sample_rate: int, fallback: Fallback | None, max_seconds: float | None
) -> Iterator[np.ndarray]:
    if path.suffix.lower() not in PYAV_ONLY_SUFFIXES:
        try:
            yield from soundfile_blocks(path, sample_rate, max_seconds=max_seconds)
            return
        except NotForThisDecoder as exc:
            first_reason = str(exc)
    else:
        first_reason = "container not supported by libsndfile"
    try:
        yield from (fallback or pyav_blocks)(path, sample_rate)
    except NotForThisDecoder as exc:
        raise DecodeError(path, f"not a readable audio file ({first_reason}; {exc})") from None


def decode(
    path: str | Path, sample_rate: int, *, max_seconds: float | None = DEFAULT_MAX_TRACK_SECONDS
) -> np.ndarray:
    """The whole file as one mono float32 array (for short clips)."""
    blocks = list(decode_blocks(path, sample_rate, max_seconds=max_seconds))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def needs_fallback(path: str | Path) -> bool:
    """True for containers libsndfile never opens (decided by name, no I/O)."""
    return Path(path).suffix.lower() in PYAV_ONLY_SUFFIXES


def _mono(frames: np.ndarray) -> np.ndarray:
    """Average ``[n, channels]`` to ``[n]``.

    A column-wise sum: ``mean(axis=1)`` over a short strided axis cost 5x
    more than the decode itself (measured: 149 ms vs 30 ms for 3 minutes).
    """
    if frames.ndim == 1:
        return np.ascontiguousarray(frames, dtype=np.float32)
    channels = frames.shape[1]
    acc = np.array(frames[:, 0], dtype=np.float32)
    for ch in range(1, channels):
        acc += frames[:, ch]
    if channels > 1:
        acc *= np.float32(1.0 / channels)
    return acc


def soundfile_blocks(
    path: Path, sample_rate: int, *, max_seconds: float | None = None
) -> Iterator[np.ndarray]:
    """libsndfile decoding (soundfile) resampled with soxr, in blocks of ``BLOCK_FRAMES``.

    Raises :class:`NotForThisDecoder` when libsndfile cannot open the file,
    :class:`DecodeError` when its header breaks a cap (rate; a declared length
    beyond ``max_seconds`` fails before anything is decoded).
    """
    import soundfile as sf
    import soxr

    try:
        fh = sf.SoundFile(_native_name(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise NotForThisDecoder(f"libsndfile: {exc}") from None
    except OSError as exc:
        raise DecodeError(path, exc.strerror or str(exc)) from None
    with fh:
        if fh.samplerate <= 0 or fh.channels <= 0:
            raise NotForThisDecoder("libsndfile: no audio stream")
        _check_rate(path, fh.samplerate)
        declared = fh.frames if 0 < fh.frames < 2**62 else 0  # unknown lengths read as huge
        if max_seconds is not None and declared > max_seconds * fh.samplerate:
            raise DecodeError(
                path,
                f"{declared / fh.samplerate / 3600:.1f} h long by its header; longer than "
                f"{_hours(max_seconds)}, the longest track read",
            )
        per_read = _frames_per_read(fh.samplerate, fh.channels, sample_rate)
        resampler = None
        if fh.samplerate != sample_rate:
            resampler = soxr.ResampleStream(fh.samplerate, sample_rate, 1, dtype="float32")
        produced = False
        read = 0
        while True:
            try:
                frames = fh.read(per_read, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                if not produced:
                    raise NotForThisDecoder(f"libsndfile: {exc}") from None
                raise DecodeError(path, f"decoding failed mid-stream: {exc}") from None
            read += len(frames)
            last = len(frames) < per_read
            mono = _mono(frames)
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=last)
            if len(mono):
                produced = True
                yield mono
            if last:
                break
        if declared and declared - read > max(
            fh.samplerate * TRUNCATION_SECONDS, declared * TRUNCATION_FRACTION
        ):
            raise DecodeError(
                path,
                f"truncated: the header promises "
                f"{declared / fh.samplerate:.1f} s, the stream ends at "
                f"{read / fh.samplerate:.1f} s",
            )


def _native_name(path: Path) -> str | bytes:
    """The name libsndfile can open: bytes when it is not valid UTF-8 (soundfile
    encodes ``str`` names strictly and would raise on surrogate escapes)."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return name


def _check_ogg_end(path: Path) -> None:
    """Raise :class:`DecodeError` if the Ogg stream stops before its last page.

    A cut Ogg file decodes cleanly up to the cut (libsndfile even reports the
    shorter length), so the cut is found where it shows: the last page must
    be complete, end the file, and carry the end-of-stream flag.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != b"OggS":  # named .ogg, holding something else
            return
        fh.seek(max(0, size - _OGG_MAX_PAGE))
        tail = fh.read()
    start = tail.rfind(b"OggS")
    ok = False
    if start >= 0 and len(tail) - start >= 27 and tail[start + 4] == 0:
        n_segments = tail[start + 26]
        lacing = tail[start + 27 : start + 27 + n_segments]
        end = start + 27 + n_segments + sum(lacing)
        ok = len(lacing) == n_segments and end == len(tail) and bool(tail[start + 5] & 0x04)
    if not ok:
        raise DecodeError(
            path, "truncated: the Ogg stream has no end-of-stream page (the file was cut short)"
        )


def pyav_blocks(path: Path, sample_rate: int) -> Iterator[np.ndarray]:
    """PyAV decoding, in blocks of about ``PYAV_GATHER_FRAMES`` source frames.

    Frames (~1024 samples each) are gathered before they are downmixed and
    resampled: per-frame numpy and soxr calls cost twice the decoding itself
    (measured on AAC: 0.36 s per 3 minutes per frame, 0.1 s decoding alone).
    """
    import av
    import soxr

    try:
        # Latin-1 tags make av.open raise unless metadata errors are ignored.
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise NotForThisDecoder(f"FFmpeg: {exc}") from None
    except OSError as exc:
        raise DecodeError(path, exc.strerror or str(exc)) from None
    with container:
        if not container.streams.audio:
            raise NotForThisDecoder("FFmpeg: no audio stream")
        stream = container.streams.audio[0]
        resampler: soxr.ResampleStream | None = None
        in_rate = 0
        fmt = ""
        pending: list[np.ndarray] = []  # [channels, n] per frame, same format
        held = 0
        gather = PYAV_GATHER_FRAMES
        produced = False

        def flush(last: bool = False) -> np.ndarray:
            nonlocal pending, held
            planar = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
            pending, held = [], 0
            mono = _to_float(_mono(planar.T), fmt)
            return resampler.resample_chunk(mono, last=last) if resampler is not None else mono

        try:
            for frame in container.decode(stream):
                if not pending:
                    if resampler is None and not in_rate:
                        in_rate = frame.sample_rate
                        _check_rate(path, in_rate)
                        channels = len(frame.layout.channels)
                        gather = min(
                            PYAV_GATHER_FRAMES, _frames_per_read(in_rate, channels, sample_rate)
                        )
                        if in_rate != sample_rate:
                            resampler = soxr.ResampleStream(
                                in_rate, sample_rate, 1, dtype="float32"
                            )
                    fmt = frame.format.name
                if frame.sample_rate != in_rate:
                    raise DecodeError(path, "sample rate changes mid-stream")
                if frame.format.name != fmt:  # rare: keep one format per block
                    block = flush()
                    fmt = frame.format.name
                    if len(block):
                        produced = True
                        yield block
                samples = frame.to_ndarray()
                if not frame.format.is_planar:
                    samples = samples.reshape(-1, len(frame.layout.channels)).T
                pending.append(samples)
                held += samples.shape[1]
                if held >= gather:
                    block = flush()
                    if len(block):
                        produced = True
                        yield block
        except av.FFmpegError as exc:
            if not produced and not pending:
                raise NotForThisDecoder(f"FFmpeg: {exc}") from None
            raise DecodeError(path, f"decoding failed mid-stream: {exc}") from None
        if pending or resampler is not None:
            if not pending:
                pending.append(np.zeros((1, 0), np.float32))
            block = flush(last=True)
            if len(block):
                produced = True
                yield block
        if not produced:
            raise NotForThisDecoder("FFmpeg: no audio decoded")


def _to_float(samples: np.ndarray, fmt: str) -> np.ndarray:
    """PyAV integer sample formats to float32 in [-1, 1]."""
    if fmt.startswith("s16"):
        return (samples / np.float32(32768.0)).astype(np.float32, copy=False)
    if fmt.startswith("s32"):
        return (samples / 2147483648.0).astype(np.float32)
    if fmt.startswith("u8"):
        return ((samples - 128.0) / 128.0).astype(np.float32)
    return samples.astype(np.float32, copy=False)
