"""Hard negatives for the stand-in: mining finds a track's confusable places, batches draw them
as negatives but never a literal repeat, and training with them stays deterministic.

Real parts: the waveform check on real arrays, mining with a real (spectral)
embedding of the windows, real torch training steps on generated music files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from export import standin, standin_data, standin_mining  # noqa: E402
from mert_indexer.client import synth  # noqa: E402
from mert_indexer.errors import ConfigError  # noqa: E402

SR = standin.SAMPLE_RATE
WINDOW = standin.WINDOW_SAMPLES


def spectral_embed(windows: np.ndarray) -> np.ndarray:
    """Log energy in 48 bands of each window's spectrum, gain removed: sees content only."""
    spectrum = np.abs(np.fft.rfft(windows, axis=1)) ** 2
    bands = np.array_split(spectrum[:, 1:], 48, axis=1)
    energy = np.log(np.stack([b.sum(axis=1) for b in bands], axis=1) + 1e-9)
    return (energy - energy.mean(axis=1, keepdims=True)).astype(np.float32)


def piece(seconds: float, seed: int) -> np.ndarray:
    """Generated music, mono."""
    audio = synth.music(seconds, seed=seed, sample_rate=SR)
    return (audio.mean(axis=1) if audio.ndim == 2 else audio).astype(np.float32)


def test_literal_repeat_is_the_same_audio_within_the_lag():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(30 * SR).astype(np.float32) * 0.1
    a, b, lag = 2 * SR, 20 * SR, 300
    audio[b + lag : b + lag + WINDOW] = audio[a : a + WINDOW]
    assert standin_mining.literal_repeat(audio, a, b, max_lag=1000)
    assert not standin_mining.literal_repeat(audio, a, b, max_lag=100)  # the copy is further
    assert not standin_mining.literal_repeat(audio, a, 12 * SR, max_lag=1000)  # other audio
    # The same audio under noise at 30 dB SNR is still a repeat; at 0 dB it is not.
    noisy = audio.copy()
    copy = audio[a : a + WINDOW]
    noisy[b + lag : b + lag + WINDOW] = copy + rng.standard_normal(WINDOW) * copy.std() * 10**-1.5
    assert standin_mining.literal_repeat(noisy, a, b, max_lag=1000)
    noisy[b + lag : b + lag + WINDOW] = copy + rng.standard_normal(WINDOW) * copy.std()
    assert not standin_mining.literal_repeat(noisy, a, b, max_lag=1000)


def test_mining_finds_a_tracks_near_repeat_a_window_away_or_more():
    first, middle, last = piece(6, 1), piece(6, 2), piece(6, 3)
    rng = np.random.default_rng(1)
    near = first * 0.8 + rng.standard_normal(len(first)).astype(np.float32) * first.std() * 0.05
    track = np.concatenate([first, middle, near, last])
    other = piece(20, 4)
    confusers = standin_mining.mine([("t", track), ("o", other)], spectral_embed, top=3)
    assert confusers.grid == SR
    table = confusers.by_track["t"]
    assert table.shape == (len(standin_mining.grid_starts(len(track), SR)), 3)
    # The window at 0 s is most like the same music at 12 s, played again.
    assert table[0, 0] == 12 * SR
    for row, found in enumerate(table):
        kept = found[found >= 0]
        assert np.all(np.abs(kept - row * SR) >= WINDOW)  # never an overlapping window
    # Looked up off the grid, candidates keep the window's phase within the grid.
    assert confusers.candidates("t", 300)[0] == 12 * SR + 300
    assert len(confusers.candidates("unknown", 0)) == 0


def test_batches_draw_confusers_but_never_a_literal_repeat():
    first = piece(6, 5)
    track_audio = np.concatenate([first, piece(6, 6), first, piece(6, 7), piece(6, 8)])
    track = standin_data.Track(name="t", path=Path("t.wav"), sha256="0", audio=track_audio)
    table = np.full((len(standin_mining.grid_starts(len(track_audio), SR)), 2), -1, np.int64)
    table[0] = [12 * SR, 24 * SR]  # a literal repeat of the window at 0 s, then other music
    confusers = standin_mining.Confusers(grid=SR, by_track={"t": table})
    for seed in range(5):
        found = standin_data.hard_starts(track, [0], 1, confusers, 0, np.random.default_rng(seed))
        assert found == [24 * SR]
    # A confuser overlapping a window already in the group is not drawn either.
    assert (
        standin_data.hard_starts(track, [0, 22 * SR], 1, confusers, 0, np.random.default_rng(0))
        == []
    )


def test_batches_with_confusers_hold_them_a_window_from_the_rest(tmp_path: Path):
    audio = np.concatenate([piece(6, 9), piece(6, 10), piece(6, 11), piece(6, 12)])
    track = standin_data.Track(name="t", path=tmp_path / "t.wav", sha256="0", audio=audio)
    confusers = standin_mining.mine([(track.name, audio)], spectral_embed)
    spec = standin_data.BatchSpec(pairs=2, per_track=2, max_shift_s=0.1, hard_negatives=1)
    anchors, _, _ = standin_data.batch([track], spec, seed=0, step=0, confusers=confusers)
    again, _, _ = standin_data.batch([track], spec, seed=0, step=0, confusers=confusers)
    assert np.array_equal(anchors, again)
    starts = []
    for window in anchors:
        hits = np.flatnonzero(audio[: len(audio) - WINDOW + 1] == window[0])
        starts.append(next(int(i) for i in hits if np.array_equal(audio[i : i + WINDOW], window)))
    seed_start, hard = starts
    assert abs(hard - seed_start) >= WINDOW
    assert any(abs(hard - c) <= SR for c in confusers.candidates("t", seed_start))


@pytest.fixture(scope="module")
def music(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("music")
    for i in range(2):
        synth.write(folder / f"piece{i}.wav", synth.music(14, seed=200 + i, sample_rate=SR), SR)
    return folder


def test_training_with_hard_negatives_is_deterministic_and_recorded(music: Path, tmp_path: Path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from export.standin_train import TrainOptions, train

    def run(out: Path) -> dict:
        options = TrainOptions(
            music=music,
            out=out,
            steps=2,
            seed=5,
            batch=standin_data.BatchSpec(pairs=4, per_track=2, hard_negatives=1),
            mine_every=1,
            threads=1,
            validate=False,
            progress=False,
        )
        return train(options).training

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["objective"]["mining"] == {"every_steps": 1, "grid_s": 1.0}
    assert first["objective"]["batch"]["hard_negatives"] == 1
    with pytest.raises(ConfigError, match="hard-negatives"):
        TrainOptions(
            music=music,
            out=tmp_path,
            steps=1,
            batch=standin_data.BatchSpec(per_track=2, hard_negatives=2),
        )
