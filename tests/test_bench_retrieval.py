"""The parts of benchmarks/bench_retrieval.py that can be wrong silently (no Triton)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_retrieval as br

SR = 24_000
HOP = SR // 2


def music_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Band-limited noise with a few tones: broadband, like music, and seeded."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    chord = (220, 330, 660) if seed < 100 else rng.uniform(150, 900, 3)
    tones = sum(0.1 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in chord)
    noise = br.spectral_filter(rng.standard_normal(len(t)).astype(np.float32), SR, br.tilt_gain)
    return (tones + 0.05 * noise).astype(np.float32)


def peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[np.argmax(spec)])


def tone(hz: float, seconds: float) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(round(seconds * SR)) / SR)).astype(np.float32)


def test_offsets_are_never_on_a_grid() -> None:
    rng = np.random.default_rng(0)
    offsets = [br.draw_offset(rng, 60 * SR, 11 * SR, HOP) for _ in range(3000)]
    for o in offsets:
        assert min(o % HOP, HOP - o % HOP) >= br.MIN_GRID_DISTANCE
        assert o % (5 * SR) >= br.MIN_GRID_DISTANCE  # the index grid is on the hop grid
        assert o % br.FRAME_SAMPLES != 0
        assert 0 <= o <= 49 * SR
    assert len(set(offsets)) > 2900  # arbitrary samples, not a handful of positions
    assert not br.off_grid(7 * HOP, HOP) and not br.off_grid(7 * HOP + 100, HOP)
    assert not br.off_grid(320 * 1000, HOP)


def by_name() -> dict[str, br.Degradation]:
    return {d.name: d for d in br.degradations()}


@pytest.mark.parametrize("name", sorted(by_name()))
def test_every_degradation_gives_the_clip_length(name: str) -> None:
    deg = by_name()[name]
    audio = music_like(8.0)
    n = 5 * SR
    y = br.degrade(audio, 1234, n, deg, np.random.default_rng(1), SR)
    assert y.shape == (n,) and y.dtype == np.float32 and np.isfinite(y).all()
    if name != "exact":
        assert not np.allclose(y, audio[1234 : 1234 + n])


@pytest.mark.parametrize("snr", [20, 10, 5, 0])
def test_noise_has_the_target_snr(snr: int) -> None:
    x = music_like(5.0)
    y = by_name()[f"noise_{snr}db"].apply(x, np.random.default_rng(3), SR)
    measured = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x) ** 2.0))
    assert abs(measured - snr) < 0.5
    spec = np.abs(np.fft.rfft(y - x)) ** 2  # white: as much power in each half of the band
    half = len(spec) // 2
    assert 0.8 < spec[:half].sum() / spec[half:].sum() < 1.25


def test_gain_is_exact_and_clipping_bounded() -> None:
    x = music_like(2.0)
    quiet = by_name()["gain_-12db"].apply(x, np.random.default_rng(0), SR)
    np.testing.assert_allclose(quiet, x * 10 ** (-12 / 20), rtol=1e-6)
    loud = by_name()["gain_+6db"].apply(x * 2, np.random.default_rng(0), SR)
    assert np.abs(loud).max() <= 1.0
    inside = np.abs(x * 2 * 10 ** (6 / 20)) < 1
    np.testing.assert_allclose(loud[inside], (x * 2 * 10 ** (6 / 20))[inside], rtol=1e-6)
    assert (~inside).any()  # the test signal does clip


@pytest.mark.parametrize("ratio", [1.02, 0.98])
def test_pitch_changes_duration_and_pitch_together(ratio: float) -> None:
    x = tone(1000.0, 4.0)
    y = br.change_speed(x, SR, ratio)
    assert abs(len(x) / len(y) - ratio) < 1e-3
    assert abs(peak_hz(y[SR : 2 * SR]) / 1000.0 - ratio) < 0.003
    assert by_name()[f"pitch_{ratio - 1:+.0%}"].speed == ratio


@pytest.mark.skipif(not br.atempo_available(), reason="FFmpeg has no atempo filter")
@pytest.mark.parametrize("ratio", [1.05, 0.95])
def test_tempo_changes_duration_and_keeps_pitch(ratio: float) -> None:
    x = tone(1000.0, 4.0)
    y = br.change_tempo(x, SR, ratio)
    assert abs(len(x) / len(y) - ratio) < 0.005
    assert abs(peak_hz(y[SR : 2 * SR]) - 1000.0) < 3.0


def test_filters_do_what_they_say() -> None:
    lo = br.spectral_filter(tone(1000.0, 1.0), SR, br.butterworth_lowpass)
    hi = br.spectral_filter(tone(8000.0, 1.0), SR, br.butterworth_lowpass)
    assert np.abs(lo).max() == pytest.approx(0.3, rel=0.01)
    assert 20 * np.log10(np.abs(hi[1000:-1000]).max() / 0.3) < -40  # 8th order, one octave up
    x = tone(4000.0, 1.0)
    tilted = br.spectral_filter(x, SR, br.tilt_gain)
    db = 20 * np.log10(np.std(tilted) / np.std(x))
    assert db == pytest.approx(-6.0, abs=0.1)  # two octaves above the pivot, -3 dB/octave


def test_reverb_keeps_timing_and_loudness() -> None:
    x = np.zeros(2 * SR, np.float32)
    x[SR // 2] = 1.0
    ir = br.synthetic_ir(np.random.default_rng(0), SR, 0.5)
    tail = ir[1:] ** 2
    assert tail.sum() == pytest.approx(1.0)  # direct-to-reverberant 0 dB
    level = 10 * np.log10(tail[int(0.5 * SR) - 200 : int(0.5 * SR)].mean() / tail[:200].mean())
    assert level == pytest.approx(-60, abs=6)  # 60 dB down at RT60
    m = music_like(3.0)
    y = by_name()["reverb"].apply(m, np.random.default_rng(0), SR)
    assert np.sqrt(np.mean(y**2)) == pytest.approx(np.sqrt(np.mean(m**2)), rel=1e-4)
    assert br.best_lag(m[:SR], y, 2000) == 0  # the direct path stays on time


@pytest.mark.parametrize("name", ["mp3_64k", "aac_64k"])
def test_codecs_stay_aligned(name: str) -> None:
    x = music_like(3.0, seed=4)
    y = by_name()[name].apply(x, np.random.default_rng(0), SR)
    assert br.best_lag(x[:SR], y, 4096) == 0
    corr = np.corrcoef(x[1000:-1000], y[1000:-1000])[0, 1]
    assert 0.7 < corr < 0.9999  # lossy, but the same audio


def test_repeat_detector_accepts_a_literal_repeat_and_rejects_another_passage() -> None:
    # "a" repeats at 12 s; "b" holds a's chord over other noise; "c" is other music
    a, b, c = music_like(6, seed=1), music_like(6, seed=2), music_like(6, seed=101)
    track = np.concatenate([a, b, a, c])
    n, lag = 5 * SR, SR // 2
    ncc, got = br.repeat_ncc(track, SR // 3, 12 * SR + SR // 3 + 3000, n, lag)
    assert ncc > 0.999 and got == -3000
    ncc, _ = br.repeat_ncc(track, SR // 3, 6 * SR + SR // 3, n, lag)  # same chord, b
    assert ncc < br.REPEAT_NCC
    ncc, _ = br.repeat_ncc(track, SR // 3, 18 * SR + SR // 3, n, lag)  # c
    assert ncc < 0.3
    ncc, _ = br.repeat_ncc(track, SR // 3, SR // 3 + lag // 2, n, lag)  # itself, not a repeat
    assert ncc < br.REPEAT_NCC


def answer(ok: bool, offset_ok: bool = False, error: float | None = None, **kw) -> br.Answer:
    return br.Answer("t", 0.0, kw.pop("score", 0.9), ok, offset_ok, kw.pop("repeat", False), error)


def test_metrics_on_a_hand_made_example() -> None:
    good = [answer(True, True, e) for e in (0.0, 0.1, 0.2, 0.3)]
    rep = answer(True, True, 0.05, repeat=True)
    wrong_off = answer(True, False, 1.0)
    qs = [
        br.Query("excerpt", "t", 1.0, a, a, 1, 0.9, 0.9) for a in [*good, rep, wrong_off]
    ]  # 6 answered excerpts
    qs += [br.Query("excerpt", "t", 1.0, None, answer(False), 2, 0.3, 0.5)]  # rejected
    qs += [br.Query("excerpt", "t", 1.0, None, None, None, None, None)]  # nothing at all
    qs += [br.Query("unindexed", "u", 1.0, None, answer(False), None, None, 0.2) for _ in range(3)]
    qs += [br.Query("unindexed", "u", 1.0, answer(False), answer(False), None, None, 0.7)]
    m = br.cell_metrics(qs)
    assert m["excerpts"] == 8 and m["unindexed"] == 4
    r = m["ranked"]
    assert r["top1_track"] == 6 / 8 and r["top1_offset"] == 5 / 8 and r["repeats_counted"] == 1
    errors = [0.0, 0.1, 0.2, 0.3, 0.05, 1.0]
    assert r["offset_error_median"] == pytest.approx(0.15)
    assert r["offset_error_p95"] == pytest.approx(np.percentile(errors, 95))
    assert r["offset_error_p95"] == pytest.approx(0.3 + 0.75 * 0.7)
    assert r["true_track_in_candidates"] == 7 / 8
    t = m["threshold"]
    assert t["wrongly_rejected"] == 2 / 8
    assert t["nomatch_recall"] == 3 / 4  # 3 of 4 un-indexed clips answered no match
    assert t["nomatch_precision"] == 3 / 5  # 5 no-match answers, 3 of them right
    assert t["unindexed_matched"] == 1 / 4
    assert m["scores"]["unindexed_top_max"] == 0.7


def test_miss_classes() -> None:
    right = answer(True, True)
    assert br.classify_miss(right, [right], 0.6) is None
    low = answer(True, True, score=0.4)
    assert br.classify_miss(None, [low], 0.6) == "below threshold"
    off = answer(True, False)
    assert br.classify_miss(off, [off], 0.6) == "wrong offset"
    other = answer(False)
    assert br.classify_miss(other, [other, low], 0.6) == "outranked"
    assert br.classify_miss(None, [other], 0.6) == "no evidence"
    assert br.classify_miss(None, [], 0.6) == "no evidence"


def test_split_file_forms(tmp_path: Path) -> None:
    p = tmp_path / "s.json"
    p.write_text('{"train": ["a.ogg", {"file": "b.ogg", "sha256": "x"}], "held_out": ["c.ogg"]}')
    assert br.read_split(p) == (["a.ogg", "b.ogg"], ["c.ogg"])
    p.write_text('{"model_id": "x", "data": {"train": ["a.ogg"], "held_out": [{"file": "c.ogg"}]}}')
    assert br.read_split(p) == (["a.ogg"], ["c.ogg"])
    p.write_text('{"train": []}')
    with pytest.raises(br.ConfigError, match="held_apart"):
        br.read_split(p)


def test_results_names_keep_their_dots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # "--out .../retrieval_x_hop2.5_cat_train" once wrote retrieval_x_hop2.json:
    # the dot was taken for a suffix, and the next run overwrote the last.
    out = tmp_path / "retrieval_x_hop2.5_cat_train"
    committed = Path(br.RESULTS) / "retrieval_standin_q100_cat_held_apart.json"
    br.result_path(out, ".json").write_text(committed.read_text())
    assert br.main(["--render", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"retrieval_x_hop2.5_cat_train.{ext}" for ext in ("json", "md", "png")
    ]
    assert "Retrieval on real music" in capsys.readouterr().out
