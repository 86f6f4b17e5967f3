"""Decoding: every format the tests can write, both decoders, channels and rates."""

from __future__ import annotations

import numpy as np
import pytest

from mert_indexer.client import decode as dec
from mert_indexer.client.synth import music, write
from mert_indexer.errors import DecodeError

SR = 24_000


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope="module")
def reference():
    return music(6.0, seed=3, sample_rate=44_100)


@pytest.mark.parametrize(
    "suffix, tol",
    [(".wav", 0.9999), (".flac", 0.9999), (".ogg", 0.97), (".mp3", 0.97), (".m4a", 0.97)],
)
def test_formats_decode_to_24k_mono(tmp_path, reference, suffix, tol):
    path = write(tmp_path / f"x{suffix}", reference, 44_100)
    audio = dec.decode(path, SR)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / SR - 6.0) < 0.1  # encoders pad a little
    truth = dec.decode(write(tmp_path / "ref.wav", reference, 44_100), SR)
    # Lossy codecs may shift by their priming delay: compare at the best lag.
    best = max(_corr(audio[lag:], truth) for lag in range(0, 3000, 1))
    assert best >= tol


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
def test_soundfile_and_pyav_agree(tmp_path, reference, suffix):
    path = write(tmp_path / f"x{suffix}", reference, 44_100)
    a = np.concatenate(list(dec.soundfile_blocks(path, SR)))
    b = np.concatenate(list(dec.pyav_blocks(path, SR)))
    assert abs(len(a) - len(b)) <= 0.5 * SR  # decoders disagree on length by up to ~0.4 s
    best = max(_corr(a[lag:], b) for lag in range(0, 2000, 1))
    best = max(best, max(_corr(b[lag:], a) for lag in range(0, 2000, 1)))
    assert best > 0.99


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_channels_are_averaged(tmp_path, channels):
    mono = music(3.0, seed=1, sample_rate=SR, channels=1)[:, 0]
    gains = np.linspace(0.2, 1.0, channels, dtype=np.float32)
    multi = mono[:, None] * gains[None, :]
    audio = dec.decode(write(tmp_path / "m.wav", multi, SR), SR)
    np.testing.assert_allclose(audio, mono * gains.mean(), atol=2e-4)


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 96_000])
def test_rates_resampled(tmp_path, rate):
    t = np.arange(int(2.0 * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    audio = dec.decode(write(tmp_path / "t.flac", tone, rate), SR)
    assert abs(len(audio) - 2 * SR) <= 2
    spectrum = np.abs(np.fft.rfft(audio[SR // 4 : -SR // 4]))
    peak_hz = np.argmax(spectrum) * SR / (len(audio) - SR // 2)
    assert abs(peak_hz - 440) < 2


def test_blocks_are_bounded(tmp_path):
    path = write(tmp_path / "long.flac", music(30.0, seed=2, sample_rate=48_000), 48_000)
    sizes = [len(b) for b in dec.decode_blocks(path, SR)]
    assert sum(sizes) == pytest.approx(30 * SR, abs=10)
    assert max(sizes) <= dec.BLOCK_FRAMES  # downsampling: never more than one read block


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (
            lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)),
            "not a readable audio file",
        ),
        (lambda p: p.write_text("hello, I am text\n" * 50), "not a readable audio file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.symlink_to(p.parent / "missing.wav"), "broken symbolic link"),
    ],
)
def test_bad_files_name_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.mp3"
    make(path)
    with pytest.raises(DecodeError) as err:
        dec.decode(path, SR)
    assert str(path) in str(err.value) and reason in str(err.value)
