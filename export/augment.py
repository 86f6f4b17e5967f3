"""Degradations that turn an indexed excerpt into what a query clip sounds like.

As in neural audio fingerprinting (Chang et al. 2021): the positive of a clean
window is the same audio after lossy re-encoding (MP3 or AAC through PyAV, in
memory), EQ and low-pass, mild reverb, additive noise at 0-20 dB SNR and a
gain change. The time shift is not here: it is a choice of where to cut
(``standin_data.py``). Every draw comes from the caller's generator, so a seed
fixes the result. numpy FFTs only (no scipy in the project).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

CODECS = (("mp3", "libmp3lame"), ("adts", "aac"))
_MAX_CODEC_LAG = 4096  # samples: encoder delay + priming, well above what LAME or AAC add


@dataclass(frozen=True)
class Degradations:
    """How likely and how strong each degradation is."""

    codec_p: float = 0.5
    bitrates_kbps: tuple[int, ...] = (48, 64, 64, 96)
    eq_p: float = 0.7
    eq_db: float = 9.0
    lowpass_p: float = 0.4
    lowpass_hz: tuple[float, float] = (3000.0, 9000.0)
    reverb_p: float = 0.3
    reverb_rt60_s: tuple[float, float] = (0.1, 0.6)
    reverb_wet: tuple[float, float] = (0.1, 0.4)
    noise_p: float = 0.8
    snr_db: tuple[float, float] = (0.0, 20.0)
    gain_db: tuple[float, float] = (-20.0, 6.0)


def degrade(
    audio: np.ndarray, sample_rate: int, rng: np.random.Generator, spec: Degradations
) -> np.ndarray:
    """``audio`` (mono float32) after a random chain of degradations; same length."""
    out = audio.astype(np.float32, copy=True)
    if rng.random() < spec.codec_p:
        out = reencode(out, sample_rate, rng, spec)
    if rng.random() < spec.eq_p:
        out = random_eq(out, sample_rate, rng, spec.eq_db)
    if rng.random() < spec.lowpass_p:
        out = lowpass(out, sample_rate, float(rng.uniform(*spec.lowpass_hz)))
    if rng.random() < spec.reverb_p:
        out = reverb(out, sample_rate, rng, spec)
    if rng.random() < spec.noise_p:
        out = add_noise(out, rng, float(rng.uniform(*spec.snr_db)))
    out = out * np.float32(10 ** (rng.uniform(*spec.gain_db) / 20))
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def reencode(
    audio: np.ndarray, sample_rate: int, rng: np.random.Generator, spec: Degradations
) -> np.ndarray:
    """Through a lossy codec and back, realigned to the input (codecs add delay)."""
    container, codec = CODECS[int(rng.integers(len(CODECS)))]
    bitrate = int(spec.bitrates_kbps[int(rng.integers(len(spec.bitrates_kbps)))]) * 1000
    decoded = codec_roundtrip(audio, sample_rate, container, codec, bitrate)
    return align(decoded, audio)


def codec_roundtrip(
    audio: np.ndarray, sample_rate: int, container: str, codec: str, bitrate: int
) -> np.ndarray:
    """Encode mono float PCM with PyAV into memory, decode it again."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=sample_rate, layout="mono")
        assert isinstance(stream, av.AudioStream)  # an audio codec gives an audio stream
        stream.bit_rate = bitrate
        frame_size = stream.codec_context.frame_size or 1152
        pcm = np.clip(audio, -1.0, 1.0).astype(np.float32)
        for start in range(0, len(pcm), frame_size):
            chunk = pcm[start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    buffer.seek(0)
    blocks = []
    # An encoder's tags need not be UTF-8; they are never read here.
    with av.open(buffer, "r", format=container, metadata_errors="ignore") as source:
        for frame in source.decode(audio=0):
            blocks.append(frame.to_ndarray().astype(np.float32).reshape(-1))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def align(decoded: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``decoded`` shifted by the lag that best matches ``reference``, cut/padded to its length."""
    n = len(reference)
    size = 1 << int(np.ceil(np.log2(n + len(decoded) + 1)))
    corr = np.fft.irfft(np.fft.rfft(decoded, size) * np.conj(np.fft.rfft(reference, size)), size)
    lags = np.concatenate([np.arange(0, _MAX_CODEC_LAG + 1), np.arange(-_MAX_CODEC_LAG, 0)])
    lag = int(lags[np.argmax(corr[lags])])
    out = np.zeros(n, np.float32)
    src = decoded[max(lag, 0) :]
    dst_start = max(-lag, 0)
    count = min(len(src), n - dst_start)
    out[dst_start : dst_start + count] = src[:count]
    return out


def random_eq(
    audio: np.ndarray, sample_rate: int, rng: np.random.Generator, max_db: float
) -> np.ndarray:
    """A smooth random gain curve over log frequency (a few bands, up to ``max_db``)."""
    spectrum = np.fft.rfft(audio)
    freqs = np.fft.rfftfreq(len(audio), 1.0 / sample_rate)
    knots = np.linspace(np.log2(40.0), np.log2(sample_rate / 2), int(rng.integers(3, 7)))
    gains_db = rng.uniform(-max_db, max_db, size=len(knots))
    curve = np.interp(np.log2(np.maximum(freqs, 40.0)), knots, gains_db)
    return np.fft.irfft(spectrum * 10 ** (curve / 20), len(audio)).astype(np.float32)


def lowpass(audio: np.ndarray, sample_rate: int, cutoff_hz: float) -> np.ndarray:
    """A gentle low-pass (raised-cosine roll-off over one octave above ``cutoff_hz``)."""
    spectrum = np.fft.rfft(audio)
    freqs = np.fft.rfftfreq(len(audio), 1.0 / sample_rate)
    octave = np.clip(np.log2(np.maximum(freqs, 1.0) / cutoff_hz), 0.0, 1.0)
    return np.fft.irfft(spectrum * 0.5 * (1 + np.cos(np.pi * octave)), len(audio)).astype(
        np.float32
    )


def reverb(
    audio: np.ndarray, sample_rate: int, rng: np.random.Generator, spec: Degradations
) -> np.ndarray:
    """Mild room: convolution with exponentially decaying noise, mixed with the dry signal."""
    rt60 = float(rng.uniform(*spec.reverb_rt60_s))
    length = int(rt60 * sample_rate)
    t = np.arange(length) / sample_rate
    impulse = rng.standard_normal(length) * np.exp(-6.9 * t / rt60)
    impulse /= np.sqrt(np.sum(impulse**2)) + 1e-12
    size = 1 << int(np.ceil(np.log2(len(audio) + length)))
    wet = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(impulse, size), size)[: len(audio)]
    mix = float(rng.uniform(*spec.reverb_wet))
    return ((1 - mix) * audio + mix * wet).astype(np.float32)


def add_noise(audio: np.ndarray, rng: np.random.Generator, snr_db: float) -> np.ndarray:
    """White, pink or brown noise at ``snr_db`` relative to the signal's power."""
    n = len(audio)
    exponent = float(rng.choice([0.0, 1.0, 2.0]))  # 1/f**exponent power spectrum
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    noise = np.fft.irfft(spectrum / freqs ** (exponent / 2), n)
    power = float(np.mean(audio.astype(np.float64) ** 2)) or 1e-10
    noise *= np.sqrt(power / (np.mean(noise**2) + 1e-20) / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)
