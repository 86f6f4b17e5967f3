"""The trained stand-in: its training is deterministic, its checkpoint is MERT's format, and the
committed checkpoint is shift tolerant where random-init MERT is not.

Real parts throughout: real torch training steps on generated music written to
real files, real PyAV re-encoding, the export's own loader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from export import augment, mert, standin, standin_data, standin_eval  # noqa: E402
from export.graph import PooledMert  # noqa: E402
from export.standin_train import TrainOptions, nt_xent, phase_consistency, train  # noqa: E402
from mert_indexer.client import synth  # noqa: E402
from mert_indexer.errors import ConfigError  # noqa: E402

SR = standin.SAMPLE_RATE
WINDOW = standin.WINDOW_SAMPLES


def generated_music(folder: Path, count: int = 2, seconds: float = 12.0) -> Path:
    """``count`` seeded pieces as wav files, 24 kHz mono."""
    for i in range(count):
        synth.write(
            folder / f"piece{i}.wav", synth.music(seconds, seed=100 + i, sample_rate=SR), SR
        )
    return folder


def tiny_run(music: Path, out: Path, seed: int = 3) -> dict:
    options = TrainOptions(
        music=music,
        out=out,
        steps=2,
        seed=seed,
        batch=standin_data.BatchSpec(pairs=2, per_track=1),
        threads=1,
        validate=False,
        progress=False,
    )
    return train(options).training


@pytest.fixture(scope="module")
def music(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_music(tmp_path_factory.mktemp("music"))


def test_training_is_deterministic_and_writes_a_loadable_checkpoint(music: Path, tmp_path: Path):
    first = tiny_run(music, tmp_path / "a")
    second = tiny_run(music, tmp_path / "b")
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["steps_done"] == 2 and first["stopped_by"] == "steps"
    other = tiny_run(music, tmp_path / "c", seed=4)
    assert other["weights_sha256"] != first["weights_sha256"]

    loaded = mert.load_local(tmp_path / "a")
    assert loaded.model_id == standin.MODEL_ID == "standin/" + standin.NAME
    assert loaded.weights_sha256 == first["weights_sha256"]
    assert loaded.sample_rate == SR and not loaded.random_init
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == "mert_model"
    assert "NOT MERT" in config["standin"]
    assert config["conv_stride"] == [5, 2, 2, 2, 2, 2, 2]  # MERT's: 320-sample hop
    assert config["conv_kernel"] == [10, 3, 3, 3, 3, 2, 2]
    training = json.loads((tmp_path / "a" / "training.json").read_text())
    assert [d["file"] for d in training["data"]["train"]] == ["piece0.wav", "piece1.wav"]
    assert training["data"]["held_out"] == []


def test_training_continues_from_a_checkpoint(music: Path, tmp_path: Path):
    first = tiny_run(music, tmp_path / "a")
    options = TrainOptions(
        music=music,
        out=tmp_path / "b",
        steps=1,
        init=tmp_path / "a",
        batch=standin_data.BatchSpec(pairs=2, per_track=1, phase_twins=2),
        threads=1,
        validate=False,
        progress=False,
    )
    second = train(options).training
    assert second["init"] == {"weights_sha256": first["weights_sha256"], "total_steps": 2}
    assert second["total_steps"] == 3
    assert second["weights_sha256"] != first["weights_sha256"]
    assert "phase consistency" in second["objective"]["loss"]
    assert second["objective"]["phase_weight"] == 10.0


def test_a_run_that_dies_leaves_its_last_checkpoint(
    music: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real_batch = standin_data.batch

    def batch_then_fail(*args, **kwargs):
        step = args[3]
        if step == 2:
            raise OSError("disk gone")
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(standin_data, "batch", batch_then_fail)
    options = TrainOptions(
        music=music,
        out=tmp_path / "run",
        steps=4,
        seed=3,
        checkpoint_every=1,
        batch=standin_data.BatchSpec(pairs=2, per_track=1),
        threads=1,
        validate=False,
        progress=False,
    )
    with pytest.raises(OSError, match="disk gone"):
        train(options)
    record = json.loads((tmp_path / "run" / "training.json").read_text())
    assert record["steps_done"] == 2 and record["stopped_by"] == "checkpoint"
    assert len(record["loss_every_10_steps"]) == 1 and record["validation"] is None
    assert mert.load_local(tmp_path / "run").weights_sha256 == record["weights_sha256"]
    monkeypatch.setattr(standin_data, "batch", real_batch)
    resumed = train(
        TrainOptions(
            music=music,
            out=tmp_path / "run",
            steps=1,
            init=tmp_path / "run",
            batch=standin_data.BatchSpec(pairs=2, per_track=1),
            threads=1,
            validate=False,
            progress=False,
        )
    ).training
    assert resumed["init"] == {"weights_sha256": record["weights_sha256"], "total_steps": 2}
    assert resumed["total_steps"] == 3 and resumed["stopped_by"] == "steps"


def test_options_refuse_a_run_without_an_end(music: Path, tmp_path: Path):
    with pytest.raises(ConfigError):
        TrainOptions(music=music, out=tmp_path)
    with pytest.raises(ConfigError):
        TrainOptions(music=music, out=tmp_path, steps=0)
    with pytest.raises(ConfigError, match="--checkpoint-every"):
        TrainOptions(music=music, out=tmp_path, steps=1, checkpoint_every=-1)


def test_split_holds_tracks_apart(tmp_path: Path):
    assert not set(standin.TRAIN_TRACKS) & set(standin.HELD_OUT_TRACKS)
    assert len(standin.TRAIN_TRACKS) + len(standin.HELD_OUT_TRACKS) == 16
    names = [*standin.TRAIN_TRACKS, *standin.HELD_OUT_TRACKS, "extra"]
    files = [tmp_path / f"{n}.ogg" for n in names]
    split = standin_data.split(files)
    assert {p.stem for p in split.held_out} == set(standin.HELD_OUT_TRACKS)
    assert {p.stem for p in split.train} == {*standin.TRAIN_TRACKS, "extra"}
    other = standin_data.split([tmp_path / "a.wav", tmp_path / "b.wav"])
    assert len(other.train) == 2 and not other.held_out


def test_batches_are_fixed_by_seed_and_step(music: Path):
    tracks = standin_data.load_tracks(tuple(sorted(music.iterdir())))
    spec = standin_data.BatchSpec(pairs=3, per_track=2)
    a1, p1, _ = standin_data.batch(tracks, spec, seed=1, step=5)
    a2, p2, _ = standin_data.batch(tracks, spec, seed=1, step=5)
    a3, _, _ = standin_data.batch(tracks, spec, seed=1, step=6)
    assert a1.shape == p1.shape == (3, WINDOW)
    assert np.array_equal(a1, a2) and np.array_equal(p1, p2)
    assert not np.array_equal(a1, a3)


def test_phase_twins_are_the_anchor_a_sub_frame_later(music: Path):
    tracks = standin_data.load_tracks(tuple(sorted(music.iterdir())))
    plain = standin_data.batch(tracks, standin_data.BatchSpec(pairs=3, per_track=2), 1, 5)
    spec = standin_data.BatchSpec(pairs=3, per_track=2, phase_twins=2)
    anchors, positives, twins = standin_data.batch(tracks, spec, seed=1, step=5)
    # Twins draw from a generator of their own: the rest of the batch is unchanged.
    assert np.array_equal(anchors, plain.anchors) and np.array_equal(positives, plain.positives)
    assert twins.shape == (2, WINDOW) and not len(plain.twins)
    audio = np.concatenate([t.audio for t in tracks])

    def where(window: np.ndarray) -> set[int]:
        found = np.flatnonzero(audio[: len(audio) - WINDOW + 1] == window[0])
        return {int(i) for i in found if np.array_equal(audio[i : i + WINDOW], window)}

    for anchor, twin in zip(anchors, twins, strict=False):
        shifts = {b - a for a in where(anchor) for b in where(twin)}
        assert any(0 < d < standin.HOP_SAMPLES for d in shifts), shifts


@pytest.mark.parametrize("container,codec", augment.CODECS)
def test_reencoding_is_realigned(container: str, codec: str):
    audio = synth.music(3.0, seed=7, sample_rate=SR, channels=1)[:, 0]
    decoded = augment.codec_roundtrip(audio, SR, container, codec, 64_000)
    aligned = augment.align(decoded, audio)
    assert len(aligned) == len(audio)
    error = np.mean((aligned - audio) ** 2) / np.mean(audio**2)
    assert error < 0.05, error


def test_nt_xent_prefers_matching_pairs():
    rng = torch.Generator().manual_seed(0)
    anchors = torch.randn(8, 16, generator=rng)
    matched = nt_xent(anchors, anchors + 0.01 * torch.randn(8, 16, generator=rng), 0.1)
    shuffled = nt_xent(anchors, anchors[torch.randperm(8, generator=rng)], 0.1)
    assert float(matched) < 0.1 < float(shuffled)


def test_phase_consistency_is_zero_for_identical_twins_only():
    rng = torch.Generator().manual_seed(0)
    views = torch.randn(8, 16, generator=rng)
    same = phase_consistency(views, views[:4], views[:4].clone())
    other = phase_consistency(views, views[:4], views[4:])
    assert abs(float(same)) < 1e-6 < float(other)
    # Around the views' mean: a common offset changes nothing.
    shifted = phase_consistency(views + 5.0, views[:4] + 5.0, views[4:] + 5.0)
    assert float(shifted) == pytest.approx(float(other), abs=1e-5)


def committed() -> mert.LoadedModel:
    if not (standin.COMMITTED / "config.json").is_file():
        pytest.fail(f"no committed stand-in at {standin.COMMITTED}")
    return mert.load_local(standin.COMMITTED)


def test_committed_checkpoint_is_the_standin():
    loaded = committed()
    assert loaded.model_id == standin.MODEL_ID
    training = json.loads((standin.COMMITTED / "training.json").read_text())
    assert training["weights_sha256"] == loaded.weights_sha256
    assert {d["file"].rsplit(".", 1)[0] for d in training["data"]["train"]} == set(
        standin.TRAIN_TRACKS
    )
    readme = (standin.COMMITTED / "README.md").read_text()
    assert "NOT MERT" in readme
    size = (standin.COMMITTED / "model.safetensors").stat().st_size
    assert size < 8 * 2**20  # small enough to commit


def test_committed_checkpoint_is_shift_tolerant_on_generated_music():
    loaded = committed()
    pooled = PooledMert(loaded.model, tuple(range(loaded.num_layers + 1)), "float32").eval()
    pieces = [synth.music(20.0, seed=200 + i, sample_rate=SR, channels=1)[:, 0] for i in range(3)]
    grid = [p[s : s + WINDOW] for p in pieces for s in range(0, len(p) - WINDOW + 1, SR * 2)]
    catalogue = standin_eval.embed(pooled, np.stack(grid))
    mean = catalogue.mean(axis=0)

    def unit(windows: list[np.ndarray]) -> np.ndarray:
        x = standin_eval.embed(pooled, np.stack(windows)) - mean
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    start, shift = 4 * SR, round(0.1 * SR)  # 2400 samples: 7.5 frames, off the frame grid
    anchor, shifted, elsewhere, other = unit(
        [
            pieces[0][start : start + WINDOW],
            pieces[0][start + shift : start + shift + WINDOW],
            pieces[0][start + WINDOW + 2 * SR : start + 2 * WINDOW + 2 * SR],
            pieces[1][start : start + WINDOW],
        ]
    )
    same, far, foreign = anchor @ shifted, anchor @ elsewhere, anchor @ other
    assert same > 0.8, (same, far, foreign)
    assert same > foreign + 0.3, (same, far, foreign)  # another piece: far below
    # Elsewhere in the same piece: lower, but close (same instruments, same key);
    # within-track discrimination is the stand-in's weak side (README).
    assert same > far, (same, far, foreign)


@pytest.mark.slow
def test_committed_checkpoint_exports_through_the_real_weights_path(tmp_path: Path):
    repo = tmp_path / "model_repository"
    cmd = [
        sys.executable,
        str(ROOT / "export" / "to_onnx.py"),
        "--model",
        str(standin.COMMITTED),
        "--output",
        str(repo),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = (repo / "mert" / "config.pbtxt").read_text()
    assert standin.MODEL_ID in config
    assert json.loads((standin.COMMITTED / "training.json").read_text())["weights_sha256"] in config
