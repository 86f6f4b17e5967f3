"""Query voting: the right track and offset from noisy sub-windows, no match for the unknown.

Two synthetic regimes (``mert_indexer.indexer.synthetic``): well-separated, trained-model-like
vectors, and untrained-model-like ones where every cosine between unrelated
windows lies in 0.95-0.995 (a common offset vector plus small per-window parts).
Clips are windowed as the client windows them: 10 s, 0.5 s hop, 11 windows.
"""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.errors import QueryError, StoreError
from mert_indexer.indexer.calibration import PAIR_MIN_TRACKS, pair_evidence
from mert_indexer.indexer.hypothesis import best_hypothesis
from mert_indexer.indexer.kinds import IndexOptions
from mert_indexer.indexer.plan import PendingFile
from mert_indexer.indexer.search import Searcher, SearchOptions, refine_offset
from mert_indexer.indexer.store import IndexStore
from mert_indexer.indexer.synthetic import (
    SyntheticEmbedder,
    clip_starts,
    indexed_track,
    synthetic_identity,
)

SR = 100
DIM = 32
IDENTITY = synthetic_identity(DIM, SR)
N_TRACKS = 20
CLIP = clip_starts(10.0, 0.5)  # 0, 0.5, ..., 5.0


def seconds_of(track: int) -> float:
    return 40.0 + 7.3 * track


def build(
    root: Path,
    emb: SyntheticEmbedder,
    n_tracks: int,
    hop: float | None = None,
    first: int = 0,
    reference: Path | None = None,
    **options: object,
) -> None:
    """Index synthetic tracks ``first``, ... as the client does, or every ``hop`` seconds.

    ``reference``: the store to calibrate against (``indexer-client --calibrate-with``).
    """
    with IndexStore.open(root, IDENTITY, create=True) as store:
        if reference is not None:
            store.set_calibration_reference(reference)
        for t in range(first, first + n_tracks):
            if hop is None:
                n, starts, x = indexed_track(emb, t, seconds_of(t), SR)
            else:  # overlapping windows (indexer-client --hop-seconds)
                n = round(seconds_of(t) * SR)
                at = np.arange(0.0, seconds_of(t) - 5.0 + 1e-9, hop)
                starts = np.round(at * SR).astype(np.int64)
                x = emb.windows(t, at, track_seconds=seconds_of(t))
            store.add_track(
                PendingFile(f"track{t}.mp3", f"h{t}", 1, 1),
                n_samples=n,
                sample_rate=SR,
                starts=starts,
                embeddings=x,
            )
        store.commit()
        store.build_index(options=IndexOptions(**options))  # type: ignore[arg-type]


def other_music_answered(searcher: Searcher, emb: SyntheticEmbedder, first: int, at: float) -> int:
    """How many of 100 clips (from ``at`` s) of un-indexed tracks ``first``, ... get an answer."""
    return sum(
        bool(
            searcher.search(
                emb.windows(first + i, at + CLIP, track_seconds=60, noise=0.05, noise_seed=i), CLIP
            )
        )
        for i in range(100)
    )


def excerpts_placed(searcher: Searcher, emb: SyntheticEmbedder) -> int:
    """How many of 20 noisy 10 s excerpts of track 0 are answered within 0.5 s."""
    rng = np.random.default_rng(3)
    found = 0
    for i in range(20):
        at = float(rng.uniform(0, seconds_of(0) - 10.0))
        clip = emb.windows(0, at + CLIP, track_seconds=seconds_of(0), noise=0.05, noise_seed=i)
        m = searcher.search(clip, CLIP)
        found += bool(m) and abs(m[0].offset_seconds - at) <= 0.5
    return found


@pytest.fixture(scope="module", params=[0.0, 8.0], ids=["separated", "untrained-like"])
def indexed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    emb = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=11, offset=request.param)
    root = tmp_path_factory.mktemp("idx")
    build(root, emb, N_TRACKS)
    if request.param:
        x = emb.windows(0, np.arange(0, 60, 5.0), track_seconds=60)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        cos = x @ emb.windows(1, np.arange(0, 60, 5.0), track_seconds=60).T
        cos /= np.linalg.norm(emb.windows(1, np.arange(0, 60, 5.0), track_seconds=60), axis=1)
        assert cos.min() > 0.95  # the regime we mean to mimic
    with Searcher(root) as searcher:
        yield emb, searcher


def test_finds_track_and_offset_from_noisy_sub_windows(indexed) -> None:
    emb, searcher = indexed
    rng = np.random.default_rng(1)
    for i in range(30):
        t = int(rng.integers(N_TRACKS))
        at = float(rng.uniform(0, seconds_of(t) - 10.0))
        clip = emb.windows(t, at + CLIP, track_seconds=seconds_of(t), noise=0.05, noise_seed=i)
        matches = searcher.search(clip, CLIP, top=3)
        assert matches, f"clip {i} of track{t} at {at:.2f} s: no match"
        assert matches[0].track == f"track{t}.mp3"
        assert abs(matches[0].offset_seconds - at) <= 0.5, (at, matches[0])  # within one hop
        assert all(a.score >= b.score for a, b in itertools.pairwise(matches))


def test_no_match_for_unindexed_tracks(indexed) -> None:
    emb, searcher = indexed
    for i in range(30):
        t = 1000 + i  # never indexed
        clip = emb.windows(t, 17.0 + CLIP, track_seconds=60, noise=0.05, noise_seed=i)
        assert searcher.search(clip, CLIP) == [], f"unindexed clip {i} matched"


def test_track_indexed_twice_matches_both_copies(tmp_path: Path) -> None:
    emb = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=5)
    with IndexStore.open(tmp_path, IDENTITY, create=True) as store:
        for t in range(8):
            n, starts, x = indexed_track(emb, t, 60.0, SR)
            store.add_track(
                PendingFile(f"track{t}.mp3", f"h{t}", 1, 1),
                n_samples=n,
                sample_rate=SR,
                starts=starts,
                embeddings=x,
            )
        n, starts, x = indexed_track(emb, 3, 60.0, SR)  # the same music, another encoding
        store.add_track(
            PendingFile("copy-of-3.ogg", "other-bytes", 1, 1),
            n_samples=n,
            sample_rate=SR,
            starts=starts,
            embeddings=x + 0.01,
        )
        store.commit()
        store.build_index()
    with Searcher(tmp_path) as searcher:
        matches = searcher.search(emb.windows(3, 22.0 + CLIP, track_seconds=60.0), CLIP)
    assert {m.track for m in matches[:2]} == {"track3.mp3", "copy-of-3.ogg"}
    assert all(abs(m.offset_seconds - 22.0) <= 0.5 for m in matches[:2])


def test_compressed_index_search(tmp_path: Path) -> None:
    emb = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=13, offset=8.0)
    build(tmp_path, emb, 60, exact_max=1000, nlist=32)
    rng = np.random.default_rng(2)
    with Searcher(tmp_path) as searcher:
        assert searcher.info["kind"] == "ivfpq"
        for _i in range(10):
            t = int(rng.integers(60))
            at = float(rng.uniform(0, seconds_of(t) - 10.0))
            m = searcher.search(
                emb.windows(t, at + CLIP, track_seconds=seconds_of(t), noise=0.05), CLIP
            )
            assert m and m[0].track == f"track{t}.mp3" and abs(m[0].offset_seconds - at) <= 0.5


def test_bad_queries_are_refused(indexed) -> None:
    _, searcher = indexed
    with pytest.raises(QueryError, match="expects"):
        searcher.search(np.zeros((3, DIM + 1), np.float32), np.arange(3.0))
    with pytest.raises(QueryError, match="start times"):
        searcher.search(np.zeros((3, DIM), np.float32), np.arange(2.0))
    with pytest.raises(QueryError, match="NaN"):
        searcher.search(np.full((1, DIM), np.nan, np.float32), np.zeros(1))
    assert searcher.identity == IDENTITY


def test_matches_name_the_catalog_track_id(indexed) -> None:
    emb, searcher = indexed
    with IndexStore.open(searcher.index_dir, None, create=False) as store:
        ids = {t.path: t.id for t in store.tracks()}
    for t in (0, 2, N_TRACKS - 1):
        clip = emb.windows(t, 3.0 + CLIP, track_seconds=seconds_of(t))
        best = searcher.search(clip, CLIP)[0]
        assert (best.track, best.track_id) == (f"track{t}.mp3", ids[f"track{t}.mp3"])


def test_rank_only_mode_answers_every_clip(indexed) -> None:
    emb, searcher = indexed
    clip = emb.windows(4242, 17.0 + CLIP, track_seconds=60, noise=0.05)
    assert searcher.search(clip, CLIP) == []
    rank_only = Searcher(searcher.index_dir, options=SearchOptions(min_score=None))
    guesses = rank_only.search(clip, CLIP, top=3)
    catalogued = {f"track{t}.mp3" for t in range(N_TRACKS)}
    assert guesses and {m.track for m in guesses} <= catalogued
    assert len({m.track for m in guesses}) == len(guesses)  # one guess per track


@pytest.mark.parametrize("hop", [None, 1.25], ids=["hop=window", "hop=1.25s"])
@pytest.mark.parametrize("offset", [0.0, 8.0], ids=["separated", "untrained-like"])
def test_one_track_catalogue_rejects_other_music(
    tmp_path: Path, offset: float, hop: float | None
) -> None:
    # One indexed track has no other track to calibrate the no-match floor
    # against; without a floor, 46 of 100 clips of other music matched it here.
    # Its own distant windows set it: two windows apart, however dense the
    # index (at 1.25 s, windows two positions apart overlap: the floor was 0.74
    # here against 0.69 at the default hop).
    emb = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=17, offset=offset)
    build(tmp_path, emb, 1, hop)
    if hop is not None:  # the same distant windows as at the default hop: about the same floor
        build(tmp_path / "sparse", emb, 1)
        with Searcher(tmp_path) as dense, Searcher(tmp_path / "sparse") as sparse:
            floor = dense.info["params"]["null_similarity"]
            assert floor <= sparse.info["params"]["null_similarity"] + 0.02
    with Searcher(tmp_path) as searcher:
        matched = other_music_answered(searcher, emb, 500, 11.0)
        assert matched <= 1, f"{matched} of 100 clips of other music matched the one track"
        found = excerpts_placed(searcher, emb)
        assert found >= 18, f"only {found} of 20 excerpts of the indexed track found"


@pytest.mark.parametrize("offset", [0.0, 8.0], ids=["separated", "untrained-like"])
def test_two_track_catalogue_rejects_other_music(tmp_path: Path, offset: float) -> None:
    # Left out of its own track, each sampled window meets one other track only:
    # there is no next track to tell a copy by. Taking its lowest hit for one set
    # the floor from the lowest similarities (-0.40 here) and 74 of 100 clips of
    # other music were answered.
    emb = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=17, offset=offset)
    build(tmp_path, emb, 2, hop=1.25)
    with Searcher(tmp_path) as searcher:
        assert searcher.info["params"]["null_similarity"] > 0.3
        matched = other_music_answered(searcher, emb, 500, 11.0)
        assert matched <= 1, f"{matched} of 100 clips of other music matched two tracks"


@pytest.mark.parametrize("offset", [0.0, 8.0], ids=["separated", "untrained-like"])
def test_one_track_catalogue_calibrated_against_a_reference(tmp_path: Path, offset: float) -> None:
    # A reference (other music, its own store, never searched) gives a one-track
    # catalogue what its own windows cannot: how near other music comes. Clips
    # of music in neither are rejected, excerpts are found, and the reference
    # is recorded: later builds (adds, deletes) calibrate against it again.
    emb = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=17, offset=offset)
    build(tmp_path / "reference", emb, 30, hop=1.25, first=1)
    build(tmp_path / "one", emb, 1, hop=1.25, reference=tmp_path / "reference")
    with Searcher(tmp_path / "one") as searcher:
        params = searcher.info["params"]
        assert params["calibrated_against"] == {
            "index": str(tmp_path / "reference"),
            "tracks": 30,
            "windows": searcher.info["params"]["calibrated_against"]["windows"],
        }
        assert params["min_score"] is not None and params["min_score_by_pairs"] is None
        matched = other_music_answered(searcher, emb, 500, 11.0)
        assert matched <= 1, f"{matched} of 100 clips of other music matched the one track"
        found = excerpts_placed(searcher, emb)
        assert found >= 19, f"only {found} of 20 excerpts of the indexed track found"
    with IndexStore.open(tmp_path / "one", IDENTITY, create=False) as store:
        assert store.calibration_reference() == str(tmp_path / "reference")
        # Another model's store, the catalogue itself, a folder without a store: refused.
        other = synthetic_identity(DIM + 1, SR)
        IndexStore.open(tmp_path / "other", other, create=True).close()
        for bad, says in (
            (tmp_path / "other", "another model or at another hop (embedding_dim: 33 != 32"),
            (tmp_path / "one", "is the catalogue itself"),
            (tmp_path / "nowhere", "is no index store"),
        ):
            with pytest.raises(StoreError, match=re.escape(says)):
                store.set_calibration_reference(bad)
        assert store.calibration_reference() == str(tmp_path / "reference")
        # The reference gone: the next build warns and calibrates without it.
        shutil.rmtree(tmp_path / "reference")
        store.build_index(rebuild=True)
        with Searcher(tmp_path / "one") as searcher:
            assert searcher.info["params"]["calibrated_against"] is None
        assert store.set_calibration_reference(None)
        assert store.calibration_reference() is None


def test_best_hypothesis_scores_aligned_pairs_and_keeps_the_clip_inside_the_track() -> None:
    # A 10 s clip (11 windows, 0.5 s hop) against a 50 s track (windows every 5 s).
    clip = clip_starts(10.0, 0.5)
    track = np.arange(0.0, 50.0, 5.0)
    sims = np.full((len(clip), len(track)), 0.3)
    bg = np.full(len(clip), 0.5)
    sims[2, 3] = 0.95  # offset 14 s: one near-copy
    score, jp, ip, pairs = best_hypothesis(sims, clip, track, 0.5, pair_evidence(sims, bg))
    assert (jp, ip, pairs) == (2, 3, 1) and score == pytest.approx(0.9)
    # Offset 45 s would put the clip's last window at 50 s, beyond the track's last
    # (45 s): no hypothesis, however strong its pair.
    sims[0, 9] = 0.99
    assert best_hypothesis(sims, clip, track, 0.5, pair_evidence(sims, bg))[1:3] == (2, 3)
    # Two aligned pairs at one offset (the clip on the index grid: 10 s) average;
    # a lone stronger pair elsewhere beats their mean, not each of them.
    sims[0, 2], sims[10, 3] = 0.97, 0.85  # offset 10 s: evidence 0.94 and 0.70
    score, jp, ip, _ = best_hypothesis(sims, clip, track, 0.5, pair_evidence(sims, bg))
    assert (jp, ip) == (2, 3) and score == pytest.approx(0.9)
    sims[10, 3] = 0.93  # now 0.94 and 0.86: mean 0.90 + a hair
    sims[0, 2] = 0.975
    score, jp, ip, pairs = best_hypothesis(sims, clip, track, 0.5, pair_evidence(sims, bg))
    assert (jp, ip, pairs) == (0, 2, 2) and score == pytest.approx((0.95 + 0.86) / 2)


def shifted_peaks(clip: np.ndarray, track: np.ndarray, at: float, bias: np.ndarray) -> np.ndarray:
    """Similarities of a clip taken ``at`` s into a track, each window's peak off by ``bias``.

    ``sims[j, i]`` falls with the misalignment of clip window ``j`` and track
    window ``i`` (a parabola 1.5 s wide each side, as a shift-tolerant model's);
    window ``i`` peaks ``bias[i]`` s early or late, as one window's content
    can make it.
    """
    d = track[None, :] - (clip[:, None] + at) - bias[None, :]
    return np.clip(1.0 - (d / 1.5) ** 2, 0.0, None) * 0.8 + 0.15


def test_refine_offset_reads_every_aligned_window_not_only_the_best_one() -> None:
    # A 10 s clip from 20.55 s into a track with windows every 1.25 s: four
    # indexed windows lie in it; their peaks are 0.2 s off, two early, two late.
    clip = clip_starts(10.0, 0.5)
    track = np.arange(0.0, 60.0, 1.25)
    bias = np.zeros(len(track))
    bias[[17, 18, 19, 20]] = [0.2, -0.2, 0.2, -0.2]
    sims = shifted_peaks(clip, track, 20.55, bias)
    bg = np.full(len(clip), 0.5)
    evidence = pair_evidence(sims, bg)
    _score, jp, ip, _pairs = best_hypothesis(sims, clip, track, 0.5, evidence)
    one = track[ip] - clip[jp]  # the best pair's own reading
    assert abs(one - 20.55) > 0.15
    offset = refine_offset(sims, clip, track, (jp, ip), 0.5, evidence, track_axis=True)
    assert offset == pytest.approx(20.55, abs=0.05)
    # A clip of one window reads along the track's overlapping windows instead,
    # or keeps its pair's offset where the windows do not overlap.
    one_window = np.array([0.0])
    sims = shifted_peaks(one_window, track, 20.6, np.zeros(len(track)))
    evidence = pair_evidence(sims, bg[:1])
    ip = int(np.argmax(sims[0]))
    assert track[ip] == 20.0
    along = refine_offset(sims, one_window, track, (0, ip), 0.0, evidence, track_axis=True)
    assert along == pytest.approx(20.6, abs=0.05)
    assert refine_offset(sims, one_window, track, (0, ip), 0.0, evidence, track_axis=False) == 20.0


def test_overlapping_windows_keep_excerpts_above_the_threshold(tmp_path: Path) -> None:
    # Windows every 1.25 s of tracks whose windows resemble each other (95% of
    # the latent is the track's): a window's own track fills its 32 nearest
    # neighbours. The search asks for `overlap` times as many, so the background
    # is still another track's; with 32, excerpts at 0.2 noise scored 0.25-0.55
    # (rejected), now 0.87 or more.
    emb = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=5, track_share=0.95)
    build(tmp_path, emb, 8, hop=1.25)
    with Searcher(tmp_path) as searcher:
        assert searcher.overlap == 4
        params = searcher.info["params"]
        assert params["min_score"] is not None and searcher.threshold == params["min_score"]
        assert searcher.options.min_score == searcher.threshold
        assert searcher.thresholds is None  # 8 tracks: one threshold, whatever the pairs
        rng = np.random.default_rng(8)
        placed = 0
        for i in range(20):
            t = int(rng.integers(8))
            at = float(rng.uniform(0, seconds_of(t) - 10.0))
            clip = emb.windows(t, at + CLIP, track_seconds=seconds_of(t), noise=0.2, noise_seed=i)
            m = searcher.search(clip, CLIP)
            placed += bool(m) and m[0].track == f"track{t}.mp3"  # places alike: no offsets
        assert placed == 20, f"{placed} of 20 excerpts found"
        for i in range(30):
            clip = emb.windows(900 + i, 13.0 + CLIP, track_seconds=60, noise=0.05, noise_seed=i)
            assert searcher.search(clip, CLIP) == [], f"unindexed clip {i} matched"


def test_thresholds_by_aligned_pairs_of_a_large_catalogue(tmp_path: Path) -> None:
    # A clip's score is the mean evidence of its aligned pairs: chance reaches
    # less with more of them. A catalogue of PAIR_MIN_TRACKS tracks calibrates a
    # threshold per number of pairs on runs of its own windows; at a 1.25 s hop a
    # 10 s clip holds 4 indexed windows here. Measured (this catalogue, 300
    # clips of other music, 100 excerpts at 0.2 noise): other music answered 0
    # by pairs and 0 at the one-pair threshold, excerpts 92 against 78.
    emb = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=5, track_share=0.5)
    build(tmp_path, emb, PAIR_MIN_TRACKS, hop=1.25)
    with Searcher(tmp_path) as searcher:
        by_pairs = searcher.thresholds
        assert by_pairs is not None and by_pairs[0] == searcher.threshold
        assert list(by_pairs) == sorted(by_pairs, reverse=True) and by_pairs[3] < by_pairs[0]
        assert searcher.options.pair_thresholds == by_pairs
        flat = SearchOptions(min_score=searcher.threshold)  # one threshold for all
        answered = other_music_answered(searcher, emb, 5000, 13.0)
        assert answered <= 1, f"{answered} of 100 clips of other music answered"
        rng = np.random.default_rng(8)
        found = {"pairs": 0, "flat": 0}
        for i in range(50):
            t = int(rng.integers(PAIR_MIN_TRACKS))
            at = float(rng.uniform(0, seconds_of(t) - 10.0))
            clip = emb.windows(t, at + CLIP, track_seconds=seconds_of(t), noise=0.2, noise_seed=i)
            for name, opts in (("pairs", None), ("flat", flat)):
                m = searcher.search(clip, CLIP, options=opts)
                found[name] += bool(m) and m[0].track == f"track{t}.mp3"
        assert found["pairs"] >= found["flat"] + 4, found
