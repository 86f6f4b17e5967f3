"""The query library: one Identifier shared by many threads, capped clips, uploads, thresholds.

Two halves. Fast: a seeded synthetic index (``mert_indexer.indexer.synthetic``)
searched from many threads at once against the sequential answers, and the
refusals that happen before any inference (clips too long or too short, bad
uploads). Real parts: an index built by ``indexer-client`` through the bundled
Triton, and :class:`Identifier` answering excerpts of it from 8 threads at once.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import tempfile
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mert_indexer.client.decode import decode
from mert_indexer.client.identify import (
    Identification,
    Identifier,
    QueryOptions,
    check_identity,
)
from mert_indexer.client.query import embed_clip
from mert_indexer.client.query_cli import build_parser
from mert_indexer.client.synth import write
from mert_indexer.client.triton_io import ConnectOptions, TritonPool
from mert_indexer.contract import ModelContract
from mert_indexer.errors import ConfigError, DecodeError, ModelMismatchError, QueryError
from mert_indexer.indexer.search import Match, Searcher
from mert_indexer.indexer.store import IndexStore, PendingFile
from mert_indexer.indexer.synthetic import (
    SyntheticEmbedder,
    clip_starts,
    indexed_track,
    synthetic_identity,
)
from tests.conftest import run_cli

THREADS = 8


def hammer(calls: list[Callable[[], Any]], rounds: int = 3) -> list[Any]:
    """Every call ``rounds`` times over ``THREADS`` threads released together.

    Calls are started in reverse order, so that each thread's neighbours differ
    from the sequential run. Returns the results in ``calls`` order, round after
    round; a worker's exception is raised here.
    """
    start = threading.Barrier(THREADS)
    first = threading.local()

    def released(call: Callable[[], Any]) -> Any:
        if not getattr(first, "done", False):  # each worker waits once, for all the others
            first.done = True
            start.wait(timeout=60)
        return call()

    jobs = [(r, i) for r in range(rounds) for i in reversed(range(len(calls)))]
    with ThreadPoolExecutor(THREADS) as pool:
        futures = {job: pool.submit(released, calls[job[1]]) for job in jobs}
        return [
            futures[(r, i)].result(timeout=600) for r in range(rounds) for i in range(len(calls))
        ]


# -- fast: a synthetic index ---------------------------------------------------------

SR = 24_000  # the served model's rate, so decoded clips weigh what they weigh in service
DIM = 32
N_TRACKS = 12
SYN_IDENTITY = synthetic_identity(DIM, SR)


def track_seconds(t: int) -> float:
    return 30.0 + 4.1 * t


def synthetic_contract() -> ModelContract:
    """The contract of a model that would have made the synthetic index."""
    i = SYN_IDENTITY
    return ModelContract(
        model_name="mert",
        input_name="audio",
        input_dtype="int16",
        output_name="embedding",
        window_samples=i["window_samples"],
        sample_rate=i["sample_rate"],
        embedding_dim=i["embedding_dim"],
        max_batch_size=16,
        model_id=i["model_id"],
        weights_sha256=i["weights_sha256"],
        layers=tuple(i["layers"]),
        pooling=i["pooling"],
        precision="fp32",
    )


def build_synthetic(
    root: Path, emb: SyntheticEmbedder, kind: str = "auto", n_tracks: int = N_TRACKS
) -> None:
    with IndexStore.open(root, SYN_IDENTITY, create=True) as store:
        for t in range(n_tracks):
            n, starts, x = indexed_track(emb, t, track_seconds(t), SR)
            store.add_track(
                PendingFile(f"track{t}.mp3", f"h{t}", 1, 1),
                n_samples=n,
                sample_rate=SR,
                starts=starts,
                embeddings=x,
            )
        store.commit()
        store.build_index(kind=kind)


@pytest.fixture(scope="module", params=["exact", "ivfpq"])
def synthetic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    emb = SyntheticEmbedder(dim=DIM, latent_dim=16, seed=5, offset=8.0)
    root = tmp_path_factory.mktemp(f"syn-{request.param}")
    n_tracks = 60 if request.param == "ivfpq" else N_TRACKS  # IVF-PQ trains on >= 1024 windows
    build_synthetic(root, emb, kind=request.param, n_tracks=n_tracks)
    with Searcher(root) as searcher:
        assert searcher.info["kind"] == request.param
        yield emb, searcher, n_tracks


def test_searcher_shared_by_threads_answers_as_alone(synthetic) -> None:
    emb, searcher, n_tracks = synthetic
    rng = np.random.default_rng(3)
    clips = []
    for i in range(24):
        t = int(rng.integers(n_tracks))
        seconds = float(rng.uniform(6.0, 14.0))
        at = float(rng.uniform(0, track_seconds(t) - seconds))
        starts = clip_starts(seconds, 0.5)
        x = emb.windows(t, at + starts, track_seconds=track_seconds(t), noise=0.05, noise_seed=i)
        clips.append((x, starts))
    calls = [lambda x=x, s=s: searcher.search(x, s, top=5) for x, s in clips]
    alone = [c() for c in calls]
    assert sum(bool(m) for m in alone) >= 20  # the answers compared are real answers
    shared = hammer(calls)
    for i, got in enumerate(shared):
        assert got == alone[i % len(alone)], f"clip {i % len(alone)} differs under threads"


class NoInference:
    """``infer`` for refusals that must come before any request."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        raise AssertionError("a refused clip reached inference")


@pytest.fixture(scope="module")
def synthetic_identifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Identifier]:
    root = tmp_path_factory.mktemp("syn-id")
    build_synthetic(root, SyntheticEmbedder(dim=DIM, seed=6))
    with Searcher(root) as searcher:
        yield Identifier(searcher, synthetic_contract(), NoInference())


def write_tone(path: Path, seconds: float, sample_rate: int) -> Path:
    """A mono PCM_16 WAV of a quiet tone with noise, written in 10 s blocks (bounded memory)."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    total = round(seconds * sample_rate)
    with sf.SoundFile(str(path), "w", sample_rate, 1, format="WAV", subtype="PCM_16") as fh:
        for first in range(0, total, 10 * sample_rate):
            n = min(10 * sample_rate, total - first)
            t = (first + np.arange(n)) / sample_rate
            fh.write(0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n))
    return path


def test_long_clip_refused_while_decoding_in_bounded_memory(synthetic_identifier, tmp_path):
    # 20 minutes at 8 kHz: 115 MB once decoded to 24 kHz float32; the cap lets 30 s through.
    clip = write_tone(tmp_path / "long set.wav", 20 * 60, 8_000)
    capped = Identifier(
        synthetic_identifier.searcher,
        synthetic_identifier.contract,
        NoInference(),
        QueryOptions(max_clip_seconds=30),
    )
    tracemalloc.start()
    try:
        with pytest.raises(QueryError, match=r"long set\.wav: clip is longer than 30 s"):
            capped.identify(clip)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 30 s of 24 kHz float32 is 2.9 MB; one block more, and the decoder's buffers.
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB while refusing a capped clip"


def test_clip_shorter_than_a_window_is_refused_before_inference(synthetic_identifier, tmp_path):
    clip = write_tone(tmp_path / "short.flac.wav", 3.0, 44_100)
    with pytest.raises(QueryError, match=r"short\.flac\.wav: clip is 3\.00 s.*full window"):
        synthetic_identifier.identify(clip)
    with pytest.raises(QueryError, match=r"^short\.wav: clip is 3\.00 s"):  # an upload, by name
        synthetic_identifier.identify(clip.read_bytes(), name="short.wav")


def test_bad_upload_named_and_its_temporary_file_removed(
    synthetic_identifier, tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(DecodeError, match=r"^take 2\.mp3: not a readable audio file"):
        synthetic_identifier.identify(b"\x00not audio" * 100, name="take 2.mp3")
    with pytest.raises(DecodeError, match=r"^upload: empty file"):
        synthetic_identifier.identify(io.BytesIO(b""))
    # A hostile name picks no path: only a plain suffix is kept.
    with pytest.raises(DecodeError, match=r"^\.\./\.\./x\.wav/\.\.: "):
        synthetic_identifier.identify(b"RIFF", name="../../x.wav/..")
    assert list(tmp_path.iterdir()) == []


def test_bad_call_arguments_are_refused(synthetic_identifier, tmp_path):
    clip = tmp_path / "unused.wav"
    with pytest.raises(QueryError, match="top"):
        synthetic_identifier.identify(clip, top=0)
    with pytest.raises(QueryError, match="min_score"):
        synthetic_identifier.identify(clip, min_score=1.5)
    with pytest.raises(ConfigError, match="max_clip_seconds"):
        QueryOptions(max_clip_seconds=0)
    with pytest.raises(ConfigError, match="hop_seconds"):
        QueryOptions(hop_seconds=0)


def test_index_of_another_model_is_refused() -> None:
    contract = synthetic_contract()
    check_identity(SYN_IDENTITY, contract, index="idx")  # the same model
    check_identity({}, contract, index="idx")  # no identity recorded: nothing to compare
    other = dataclasses.replace(contract, model_id="m-other", weights_sha256="f" * 64)
    with pytest.raises(
        ModelMismatchError,
        match=r"^idx was built with synthetic \(weights 000000000000\); "
        r"the server serves m-other \(weights ffffffffffff\)$",
    ):
        check_identity(SYN_IDENTITY, other, index="idx")


def test_query_cli_accepts_no_progress_without_advertising_it() -> None:
    parser = build_parser()
    assert "--no-progress" not in parser.format_help()
    assert parser.parse_args(["--no-progress", "clip.wav"]).no_progress
    from mert_indexer.client.cli import build_parser as client_parser

    assert "--no-progress" in client_parser().format_help()


# -- real parts: the bundled Triton serving the tiny model ----------------------------

SERVED_SR = 24_000


@pytest.fixture(scope="module")
def built_index(triton, catalogue, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("qindex") / "idx"
    proc = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(catalogue[0].parent),
        "--index",
        str(index),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return index


@pytest.fixture(scope="module")
def identifier(triton, built_index) -> Iterator[Identifier]:
    pool = TritonPool(ConnectOptions(servers=(triton.grpc_url,)))
    try:
        with Searcher(built_index) as searcher:
            yield Identifier(searcher, pool.connect(), pool.infer)
    finally:
        pool.close()


def excerpt(src: Path, start: float, seconds: float, dest: Path) -> Path:
    audio = decode(src, SERVED_SR)
    return write(
        dest, audio[int(start * SERVED_SR) : int((start + seconds) * SERVED_SR)], SERVED_SR
    )


# The excerpts the end-to-end tests find (right track first, without a threshold:
# the tiny random model cannot support it), and more in other formats.
FOUND = [(0, 7.3, ".wav"), (3, 2.0, ".wav"), (5, 11.75, ".wav")]
MORE = [(1, 4.0, ".flac"), (2, 6.5, ".ogg"), (4, 3.0, ".flac")]


@pytest.fixture(scope="module")
def excerpts(catalogue, tmp_path_factory) -> list[tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("excerpts")
    return [
        (catalogue[w], excerpt(catalogue[w], at, 8.0, folder / f"ex{w}-{at}{suffix}"))
        for w, at, suffix in FOUND + MORE
    ]


def same_answer(got: Identification, want: Identification) -> None:
    """Same tracks in the same order, offsets and scores equal.

    Triton's dynamic batcher may put a clip's windows into batches with other
    clips' windows under concurrency; the model's arithmetic then runs at
    another batch size, so the comparison allows float rounding, not more.
    """
    assert got.clip == want.clip and got.duration_seconds == want.duration_seconds
    assert [m.track for m in got.matches] == [m.track for m in want.matches], got.clip
    for g, w in zip(got.matches, want.matches, strict=True):
        assert g.offset_seconds == pytest.approx(w.offset_seconds, abs=1e-3), got.clip
        assert g.score == pytest.approx(w.score, abs=2e-4), got.clip


def test_one_identifier_shared_by_8_threads_answers_as_alone(identifier, excerpts):
    calls = [lambda c=clip: identifier.identify(c, min_score=None) for _, clip in excerpts]
    alone = [c() for c in calls]
    for (source, _), result in zip(excerpts[: len(FOUND)], alone, strict=False):
        assert result.matches[0].track == str(source)
    shared = hammer(calls)
    for i, got in enumerate(shared):
        same_answer(got, alone[i % len(alone)])
    timings = alone[0].timings.as_dict()
    assert set(timings) == {"decode", "embed", "search"} and all(v > 0 for v in timings.values())
    assert alone[0].duration_seconds == pytest.approx(8.0)


def test_upload_bytes_and_file_objects_answer_as_the_path(identifier, excerpts):
    source, clip = excerpts[1]
    by_path = identifier.identify(clip, min_score=None)
    by_bytes = identifier.identify(clip.read_bytes(), name=clip.name, min_score=None)
    with open(clip, "rb") as fh:
        by_file = identifier.identify(fh, min_score=None)  # named by the file object
    ogg = excerpts[len(FOUND) + 1][1]  # an Ogg upload goes through its own checks too
    assert identifier.identify(ogg.read_bytes(), name=ogg.name, min_score=None).matches
    assert by_path.matches and by_path.matches[0].track == str(source)
    assert by_bytes.clip == clip.name and by_file.clip == str(clip)
    assert by_bytes.matches == by_path.matches == by_file.matches
    assert by_bytes.duration_seconds == by_path.duration_seconds


def test_min_score_per_call_leaves_the_shared_searcher_alone(identifier, excerpts):
    source, clip = excerpts[0]
    before = identifier.identify(clip, top=6)  # the searcher's own: the index's threshold
    ranked = identifier.identify(clip, top=6, min_score=None)  # no floor, no threshold
    assert ranked.matches and ranked.matches[0].track == str(source)
    floor = identifier.identify(clip, top=6, min_score=0.0)  # the floor, then any score
    scores = sorted({m.score for m in floor.matches})
    for lo, hi in itertools.pairwise([*scores, 1.0]):
        cut = (lo + hi) / 2  # between two scores: rounding cannot move a match across
        got = identifier.identify(clip, top=6, min_score=cut).matches
        assert got == tuple(m for m in floor.matches if m.score >= cut)
    assert all(m.score >= 1.0 for m in identifier.identify(clip, min_score=1.0).matches)
    own = identifier.searcher.threshold  # calibrated when the index was built
    assert identifier.searcher.options.min_score == own
    assert identifier.identify(clip, top=6).matches == before.matches
    assert all(m.score >= own for m in before.matches)


def test_embed_clip_still_embeds_a_file(identifier, excerpts):
    clip = excerpts[0][1]
    emb, starts = embed_clip(clip, identifier.contract, identifier.infer)
    assert emb.shape == (len(starts), identifier.contract.embedding_dim)
    assert starts[0] == 0.0 and starts[-1] == pytest.approx(3.0)  # 8 s clip, 5 s windows
    matches: list[Match] = identifier.searcher.search(emb, starts, top=5)
    assert [m.track for m in matches] == [m.track for m in identifier.identify(clip).matches]


def test_query_cli_still_takes_no_progress(triton, built_index, excerpts):
    source, clip = excerpts[0]
    proc = run_cli(
        "indexer-query",
        "--server",
        triton.grpc_url,
        "--index",
        str(built_index),
        "--no-progress",
        "--json",
        "--min-score",
        "off",
        str(clip),
    )
    assert proc.returncode == 0, proc.stderr
    assert f'"track": "{source}"' in proc.stdout
