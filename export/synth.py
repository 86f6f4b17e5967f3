"""Deterministic, music-like synthetic audio windows for validation and default calibration.

Validation needs a few hundred windows that are genuinely different from each
other (otherwise "same nearest neighbour" is a coin toss) and that exercise
what real music does to the model: pitched tones with harmonics, chords,
melodies, drums, filtered noise bursts, and mixtures of these, at varied
loudness. No files, no downloads: a seed fully determines the set.
"""

from __future__ import annotations

import functools

import numpy as np

KINDS = ("tone", "chord", "melody", "drums", "noise", "mix")


def windows(count: int, window_samples: int, sample_rate: int, seed: int) -> np.ndarray:
    """See :func:`_windows`; a fresh (writable) copy of a small cache.

    Cached because every export draws the same set.
    """
    return _windows(count, window_samples, sample_rate, seed).copy()


@functools.lru_cache(maxsize=2)
def _windows(count: int, window_samples: int, sample_rate: int, seed: int) -> np.ndarray:
    """``[count, window_samples]`` float32 in [-1, 1].

    ``count // 2`` pieces, each cut at two offsets.

    Every piece is its own draw (kind, pitch, tempo, timbre, level), so pieces
    are genuinely different. Each is heard twice, the second window starting
    0.25-1.25 s later: the pair is what the index does with a query, an
    excerpt at another alignment than the indexed window. Whether a window's
    nearest neighbour is its sibling is then a decision that matters, rather
    than a near-tie between two unrelated windows. An odd ``count`` ends with
    one unpaired window.
    """
    rng = np.random.default_rng(seed)
    max_shift = int(1.25 * sample_rate)
    out = np.empty((count, window_samples), dtype=np.float32)
    for piece in range((count + 1) // 2):
        kind = KINDS[piece % len(KINDS)]
        signal = _KIND_FUNCS[kind](rng, window_samples + max_shift, sample_rate)
        peak = float(np.max(np.abs(signal))) or 1.0
        # Mostly normal levels, some very quiet pieces (int16 resolution, epsilon).
        level_db = rng.uniform(-45, -25) if rng.random() < 0.15 else rng.uniform(-18, -1)
        signal = signal / peak * 10 ** (level_db / 20)
        shift = int(rng.integers(int(0.25 * sample_rate), max_shift + 1))
        out[2 * piece] = signal[:window_samples]
        if 2 * piece + 1 < count:
            out[2 * piece + 1] = signal[shift : shift + window_samples]
    return out


def to_int16(audio: np.ndarray, seed: int = 0) -> np.ndarray:
    """float PCM in [-1, 1] to int16 with TPDF dither, as 16-bit masters are made.

    Without dither, decaying notes end in long runs of exact digital silence,
    where MERT's LayerNorms work on near-constant frames and float32 rounding
    differences between implementations grow ~1000x (measured: ONNX Runtime vs
    PyTorch 5e-3 relative, PyTorch fp32 vs fp64 1e-5). Dither keeps the
    validation audio like real recordings.
    """
    rng = np.random.default_rng(seed)
    noise = rng.random(audio.shape, dtype=np.float32) - rng.random(audio.shape, dtype=np.float32)
    return np.clip(np.round(audio * 32767.0 + noise), -32768, 32767).astype(np.int16)


def _midi_hz(note: float) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def _harmonic(rng: np.random.Generator, f0: float, t: np.ndarray) -> np.ndarray:
    """A pitched note with a random spectral envelope and a little vibrato."""
    count = int(rng.integers(1, 12))
    tilt = rng.uniform(0.3, 1.5)
    depth, rate = rng.uniform(0, 0.006), 2 * np.pi * rng.uniform(3, 7)
    # Phase of f0 * (1 + depth * sin(rate * t)), integrated in closed form.
    phase = (2 * np.pi * f0 * (t + depth * (1 - np.cos(rate * t)) / rate)).astype(np.float32)
    base = np.exp(1j * phase)
    partial = base.copy()
    out = np.zeros(len(t), dtype=np.float32)
    for k in range(1, count + 1):
        if f0 * k > 11_000:
            break
        weight = np.complex64(np.exp(1j * rng.uniform(0, 2 * np.pi)) / k**tilt)
        out += (partial * weight).imag  # sin(k * phase + random offset), without a sin per partial
        partial *= base
    return out


def _envelope(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    attack = max(1, int(rng.uniform(0.002, 0.2) * sample_rate))
    decay = rng.uniform(0.3, 6.0)
    env = np.exp(-np.arange(n, dtype=np.float32) / np.float32(decay * sample_rate))
    env[:attack] *= np.linspace(0, 1, attack)
    return env


def _tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float32) / np.float32(sr)
    return _harmonic(rng, _midi_hz(rng.uniform(33, 93)), t) * _envelope(rng, n, sr)


def _chord(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float32) / np.float32(sr)
    root = rng.uniform(40, 76)
    shape = [(0, 4, 7), (0, 3, 7), (0, 4, 7, 10), (0, 3, 7, 10), (0, 5, 7), (0, 4, 7, 11)][
        int(rng.integers(6))
    ]
    out = sum(_harmonic(rng, _midi_hz(root + step), t) for step in shape)
    return out * _envelope(rng, n, sr)


def _melody(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    note_len = int(sr * 60 / rng.uniform(70, 180) / rng.choice([1, 2, 4]))
    scale = np.array([0, 2, 4, 5, 7, 9, 11, 12])
    base = rng.uniform(55, 79)
    for start in range(0, n, note_len):
        stop = min(n, start + note_len)
        t = np.arange(stop - start, dtype=np.float32) / np.float32(sr)
        note = base + scale[int(rng.integers(len(scale)))]
        out[start:stop] = _harmonic(rng, _midi_hz(note), t) * np.exp(-t / rng.uniform(0.05, 0.5))
    return out


def _drums(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    step = int(sr * 60 / rng.uniform(70, 170) / 4)  # sixteenth notes
    pattern = rng.random((3, 16)) < np.array([[0.3], [0.2], [0.6]])
    for i, start in enumerate(range(0, n, step)):
        for voice in range(3):
            if not pattern[voice, i % 16]:
                continue
            length = min(n - start, int(sr * (0.25, 0.15, 0.05)[voice]))
            t = np.arange(length) / sr
            if voice == 0:  # kick: falling sine
                hit = np.sin(2 * np.pi * (50 + 120 * np.exp(-t * 30)) * t) * np.exp(-t * 12)
            elif voice == 1:  # snare: noise plus tone
                hit = (rng.standard_normal(length) + np.sin(2 * np.pi * 190 * t)) * np.exp(-t * 25)
            else:  # hi-hat: differentiated noise
                hit = np.diff(rng.standard_normal(length + 1)) * np.exp(-t * 80)
            out[start : start + length] += hit * rng.uniform(0.5, 1.0)
    return out


def _noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    centre, width = rng.uniform(100, 8000), rng.uniform(50, 3000)
    spectrum *= np.exp(-0.5 * ((freqs - centre) / width) ** 2)
    noise = np.fft.irfft(spectrum, n)
    gate = np.repeat(rng.random(n // int(sr * 0.1) + 1) < rng.uniform(0.3, 0.9), int(sr * 0.1))[:n]
    return noise * gate


def _mix(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    parts = [_drums(rng, n, sr), _chord(rng, n, sr), _melody(rng, n, sr)]
    mixed = np.zeros(n, np.float64)
    for p in parts:
        mixed += p / (np.max(np.abs(p)) or 1.0) * rng.uniform(0.2, 1.0)
    return mixed


_KIND_FUNCS = {
    "tone": _tone,
    "chord": _chord,
    "melody": _melody,
    "drums": _drums,
    "noise": _noise,
    "mix": _mix,
}
