"""Deterministic music-like audio for demos, tests and benchmarks.

Each track is a seeded sequence of notes (harmonic tones with envelopes),
chords, a drum pattern and a little noise, so that every few seconds differ
from the next and tracks differ from each other, as real music does. Files
are written with soundfile (wav, flac, ogg, mp3) or PyAV (m4a/AAC).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUFFIX_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


def music(seconds: float, seed: int, sample_rate: int = 44_100, channels: int = 2) -> np.ndarray:
    """``[n, channels]`` float32 in [-1, 1]: a seeded, non-stationary piece.

    The piece is a chain of sections (3-8 s) that each change key, timbre,
    tempo and drum pattern, as real songs move between parts: windows a few
    seconds apart then differ, which a retrieval test needs to tell offsets apart.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    out = np.zeros(n, dtype=np.float64)
    scale = np.array([0, 2, 3, 5, 7, 8, 10, 12, 14, 15])
    section_start = 0.0
    while section_start < seconds:
        section_end = min(seconds, section_start + rng.uniform(3, 8))
        beat = 60.0 / rng.uniform(80, 160)
        root = rng.uniform(80, 400)
        timbre = rng.uniform(0.05, 1.0, size=6) / np.arange(1, 7) ** rng.uniform(0.3, 1.5)
        decay = rng.uniform(1.0, 8.0)
        pos = section_start
        while pos < section_end:
            dur = beat * rng.choice([0.5, 1, 1, 2])
            i0, i1 = int(pos * sample_rate), min(n, int(min(pos + dur, section_end) * sample_rate))
            if i1 <= i0:
                break
            tt = t[i0:i1] - pos
            env = np.exp(-tt * decay) * np.minimum(1, tt * 200)
            for step in rng.choice(scale, size=rng.integers(1, 4), replace=False):
                f = root * 2 ** (step / 12)
                for h, amp in enumerate(timbre, start=1):
                    if f * h < sample_rate / 2:
                        out[i0:i1] += (
                            0.2 * amp * env * np.sin(2 * np.pi * f * h * tt + rng.uniform(0, 6))
                        )
            pos += dur
        # Drums: kicks and noise hats in this section's own pattern.
        pattern = rng.random(8) < rng.uniform(0.2, 0.8)
        kick = rng.uniform(40, 80)
        for k, b in enumerate(np.arange(section_start, section_end, beat / 2)):
            i0 = int(b * sample_rate)
            m = min(n - i0, int(0.15 * sample_rate))
            if m <= 0:
                break
            tt = np.arange(m) / sample_rate
            if k % 2 == 0:
                out[i0 : i0 + m] += (
                    0.5
                    * np.sin(2 * np.pi * kick * tt * (1 + 2 * np.exp(-tt * 30)))
                    * np.exp(-tt * 18)
                )
            if pattern[k % 8]:
                out[i0 : i0 + m] += 0.15 * rng.standard_normal(m) * np.exp(-tt * 60)
        section_start = section_end
    out += 0.003 * rng.standard_normal(n)
    out /= max(1e-9, np.abs(out).max()) / 0.8
    if channels == 1:
        return out.astype(np.float32)[:, None]
    pan = rng.uniform(0.6, 1.0, size=channels)
    return (out[:, None] * pan[None, :]).astype(np.float32)


def write(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write ``audio`` ([n] or [n, ch] float32) in the format named by the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in SUFFIX_FORMATS:
        import soundfile as sf

        fmt, subtype = SUFFIX_FORMATS[suffix]
        channels = audio.shape[1] if audio.ndim == 2 else 1
        # In blocks: one long write of Ogg/Vorbis crashes libsndfile 1.2.2.
        with sf.SoundFile(str(path), "w", sample_rate, channels, format=fmt, subtype=subtype) as fh:
            for i in range(0, len(audio), sample_rate):
                fh.write(audio[i : i + sample_rate])
        return path
    if suffix in (".m4a", ".aac", ".mp4"):
        _write_pyav(path, audio, sample_rate, "aac")
        return path
    raise ValueError(f"cannot write {suffix} files")


def _write_pyav(path: Path, audio: np.ndarray, sample_rate: int, codec: str) -> None:
    import av

    data = audio if audio.ndim == 2 else audio[:, None]
    layout = "mono" if data.shape[1] == 1 else "stereo"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=sample_rate, layout=layout)
        assert isinstance(stream, av.AudioStream)
        frame_size = 1024
        planar = np.ascontiguousarray(data[:, :2].T.astype(np.float32))
        for i in range(0, planar.shape[1], frame_size):
            frame = av.AudioFrame.from_ndarray(
                planar[:, i : i + frame_size], format="fltp", layout=layout
            )
            frame.sample_rate = sample_rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def write_catalogue(
    folder: str | Path,
    count: int,
    *,
    seconds: tuple[float, float] = (20, 40),
    suffixes: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3"),
    seed: int = 0,
    sample_rate: int = 44_100,
) -> list[Path]:
    """``count`` seeded tracks of varied length, cycling through ``suffixes``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        length = float(rng.uniform(*seconds))
        suffix = suffixes[i % len(suffixes)]
        audio = music(length, seed=seed * 1000 + i, sample_rate=sample_rate)
        paths.append(write(Path(folder) / f"track_{i:03d}{suffix}", audio, sample_rate))
    return paths
