"""The indexing pipeline on real parts: bundled Triton, real decoding, the real index store.

Covers what the pipeline promises: the index does not depend on how the work
is split (threads, request size, transport); memory stays bounded when the
server is slow; a worker's exception ends the run in the calling thread with
the completed tracks committed; bad, short and silent files are named.

The ``test_fake_*`` tests check the pipeline's bookkeeping in seconds, with no
server: a :class:`FakeSender` whose embedding of a window is a hash of its
samples (exact in float16), the real index store, and a ``decoder=`` that
generates each track from the spec written in its file. Every stored vector
is then compared exactly with the hash of the window that should be there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.client.pipeline import Pipeline, PipelineOptions
from mert_indexer.client.report import RunSummary
from mert_indexer.client.synth import music, write
from mert_indexer.client.transport import make_sender
from mert_indexer.client.triton_io import ConnectOptions, TritonPool
from mert_indexer.client.windows import cut, to_wire
from mert_indexer.contract import ModelContract
from mert_indexer.errors import DecodeError, IndexerError
from mert_indexer.indexer.store import IndexStore

SR = 24_000


@pytest.fixture(scope="module")
def pool(triton):
    p = TritonPool(ConnectOptions(servers=(triton.grpc_url,), deadline_seconds=30))
    p.connect()
    yield p
    p.close()


@pytest.fixture(scope="module")
def mixed(catalogue, tmp_path_factory) -> list[Path]:
    """The shared catalogue plus an m4a (PyAV-only) and a 48 kHz mono flac."""
    folder = tmp_path_factory.mktemp("mixed")
    files = [Path(shutil.copy(p, folder)) for p in catalogue]
    files.append(write(folder / "aac.m4a", music(17.0, seed=41), 44_100))
    files.append(
        write(folder / "mono48k.flac", music(12.5, seed=42, sample_rate=48_000, channels=1), 48_000)
    )
    return files


def index_run(
    pool: TritonPool,
    files: list[Path],
    index: Path,
    *,
    workers: int = 2,
    batch: int = 4,
    slots: int = 2,
    shm: bool = False,
    hop: int | None = None,
    wrap=None,
    decoder=None,
    pyav_processes: int = 2,
    queue_windows: int | None = None,
) -> RunSummary:
    contract = pool.contract
    hop = hop or contract.window_samples
    sender = make_sender(pool, slots=slots, batch_size=batch, shm=shm)
    if wrap is not None:
        sender = wrap(sender)
    summary = RunSummary()
    try:
        with IndexStore.open(
            index, contract.identity() | {"hop_samples": hop}, create=True
        ) as store:
            plan = store.plan([str(f) for f in files])
            store.apply(plan)
            options = PipelineOptions(
                hop_samples=hop,
                decode_workers=workers,
                pyav_processes=pyav_processes,
                progress=False,
                queue_windows=queue_windows,
            )
            Pipeline(contract, sender, store, options, decoder=decoder).run(plan.todo, summary)
    finally:
        sender.close()
    return summary


def stored(index: Path) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    with IndexStore.open(index, None, create=False) as store:
        return {
            t.path: (starts, vectors.astype(np.float32), t.n_samples)
            for t, starts, vectors in store.iter_windows()
        }


class Wrapped:
    """A sender that delegates, for tests to slow it down or make it fail."""

    def __init__(self, inner, before_send) -> None:
        self.inner = inner
        self.slots = inner.slots
        self.batch_size = inner.batch_size
        self.before_send = before_send
        self.calls = 0
        self.lock = threading.Lock()

    def buffer(self, slot):
        return self.inner.buffer(slot)

    def send(self, slot, n):
        with self.lock:
            self.calls += 1
            call = self.calls
        self.before_send(call)
        return self.inner.send(slot, n)

    def cancel(self):
        self.inner.cancel()

    def confirm_model(self):
        self.inner.confirm_model()

    def close(self):
        self.inner.close()


def test_index_is_the_same_whatever_the_split(pool, mixed, tmp_path):
    """Threads, request size, in-flight count, transport and the PyAV pool change nothing."""
    ref = index_run(pool, mixed, tmp_path / "ref", workers=1, batch=1, slots=1, pyav_processes=0)
    assert ref.ok and ref.indexed == len(mixed)
    expected = stored(tmp_path / "ref")
    for name, kw in {
        "grpc": dict(workers=3, batch=8, slots=3),
        "shm": dict(workers=2, batch=5, slots=4, shm=True),
    }.items():
        got_summary = index_run(pool, mixed, tmp_path / name, **kw)
        assert got_summary.ok and got_summary.indexed == len(mixed)
        got = stored(tmp_path / name)
        assert got.keys() == expected.keys()
        for path, (starts, vectors, n) in expected.items():
            g_starts, g_vectors, g_n = got[path]
            assert g_n == n and np.array_equal(g_starts, starts), (name, path)
            np.testing.assert_allclose(
                g_vectors, vectors, rtol=2e-3, atol=2e-3, err_msg=f"{name}: {path}"
            )


def test_overlapping_hop_windows(pool, mixed, tmp_path):
    window = pool.contract.window_samples
    summary = index_run(pool, mixed[:2], tmp_path / "idx", hop=window // 2)
    assert summary.ok
    for starts, _, n in stored(tmp_path / "idx").values():
        regular = np.arange(0, n - window + 1, window // 2)
        assert starts[: len(regular)].tolist() == regular.tolist()
        assert starts[-1] == n - window  # the last window is aligned to the end


def test_slow_server_keeps_memory_bounded(pool, tmp_path):
    """Decoders wait for the server: windows held and RSS stay flat, not the catalogue's size."""
    psutil = pytest.importorskip("psutil")
    base = music(30.0, seed=7, sample_rate=44_100)
    files = [
        write(tmp_path / f"long{i}.flac", np.tile(base * (0.5 + 0.2 * i), (10, 1)), 44_100)
        for i in range(4)
    ]  # 4 x 300 s: 240 windows, 58 MB as int16 windows
    index_run(pool, files[:1], tmp_path / "warm", batch=4, slots=2)  # imports, allocator warm-up
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    batch, slots, queue_windows, workers = 4, 2, 8, 2
    try:
        summary = index_run(
            pool,
            files,
            tmp_path / "idx",
            workers=workers,
            batch=batch,
            slots=slots,
            queue_windows=queue_windows,
            wrap=lambda s: Wrapped(s, lambda call: time.sleep(0.1)),
        )
    finally:
        done.set()
        sampler.join()
    assert summary.ok and summary.windows == 240
    bound = queue_windows + slots * batch + batch + workers
    assert summary.peak_in_flight <= slots
    assert batch <= summary.peak_windows_held <= bound, summary.peak_windows_held
    growth_mb = (peak[0] - baseline) / 2**20
    assert growth_mb < 25, f"RSS grew {growth_mb:.0f} MB (without backpressure: ~40 MB)"


def test_request_failure_stops_the_run_and_keeps_completed_tracks(pool, catalogue, tmp_path):
    def fail_on_sixth(call: int) -> None:
        if call == 6:
            raise RuntimeError("boom: the sender broke")

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="boom"):
        index_run(
            pool,
            catalogue,
            tmp_path / "idx",
            workers=1,
            batch=2,
            slots=1,
            wrap=lambda s: Wrapped(s, fail_on_sixth),
        )
    committed = stored(tmp_path / "idx")
    assert 1 <= len(committed) < len(catalogue)  # what was complete is kept, and only that
    for starts, vectors, n in committed.values():
        assert len(starts) == len(vectors) > 0 and starts[-1] == n - pool.contract.window_samples
    time.sleep(0.5)
    left = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not [n for n in left if n.startswith("decode-")], left


def test_decoder_error_costs_its_file_and_a_thread_crash_stops_the_run(pool, catalogue, tmp_path):
    """An exception while one file decodes fails that file; a crash of the thread stops all."""
    from mert_indexer.client.decode import decode_blocks

    class ThreadDied(BaseException):  # not an Exception: not about one file
        pass

    def decoder(path: str):
        if path == str(catalogue[2]):
            raise RuntimeError(f"decoder bug on {path}")
        return decode_blocks(path, SR)

    summary = index_run(pool, catalogue, tmp_path / "one", workers=1, batch=2, decoder=decoder)
    failed = dict(summary.failed)
    assert list(failed) == [str(catalogue[2])]
    assert failed[str(catalogue[2])].startswith("decoding failed: RuntimeError: decoder bug")
    assert summary.indexed == len(catalogue) - 1 and not summary.ok

    def dying(path: str):
        if path == str(catalogue[2]):
            time.sleep(1.0)  # let the first tracks complete
            raise ThreadDied("the decode thread itself died")
        return decode_blocks(path, SR)

    with pytest.raises(ThreadDied):
        index_run(pool, catalogue, tmp_path / "idx", workers=1, batch=2, slots=2, decoder=dying)
    committed = stored(tmp_path / "idx")
    assert set(committed) == {str(catalogue[0]), str(catalogue[1])}


def test_bad_short_and_silent_files_are_named(pool, catalogue, tmp_path):
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"not audio at all" * 100)
    short = write(tmp_path / "short.wav", music(3.0, seed=5), 44_100)
    silent = write(tmp_path / "silent.flac", np.zeros((7 * 44_100, 2), np.float32), 44_100)
    truncated = tmp_path / "cut.m4a"
    full = write(tmp_path / "full.m4a", music(12.0, seed=6), 44_100).read_bytes()
    truncated.write_bytes(full[: len(full) // 3])
    summary = index_run(pool, [catalogue[0], bad, short, silent, truncated], tmp_path / "idx")
    skipped = dict(summary.skipped)
    failed = dict(summary.failed)
    assert "shorter than one window (3.00 s < 5.00 s)" in skipped[str(short)]
    assert "silence" in skipped[str(silent)]
    assert "not a readable audio file" in failed[str(bad)]
    assert summary.indexed + len(skipped) + len(failed) == 5
    assert not summary.ok
    with IndexStore.open(tmp_path / "idx", None, create=False) as store:
        assert str(bad) in store.failures()  # retried next run


# -- The pipeline's bookkeeping in seconds: a fake sender, the real store ------------------

FAKE_RATE = 1_000  # 5 s windows of 5,000 samples: small, so the tests take seconds
FAKE_DIM = 8
FAKE = ModelContract(
    model_name="fake",
    input_name="AUDIO",
    input_dtype="int16",
    output_name="EMBEDDING",
    window_samples=5 * FAKE_RATE,
    sample_rate=FAKE_RATE,
    embedding_dim=FAKE_DIM,
    max_batch_size=8,
    model_id="fake/window-hash",
    weights_sha256="0" * 64,
    layers=(1,),
    pooling="mean",
    precision="fp32",
)


def fake_embedding(window: np.ndarray) -> np.ndarray:
    """A hash of the window's samples as ``[FAKE_DIM]`` small integers (exact in float16)."""
    digest = hashlib.blake2b(window.tobytes(), digest_size=FAKE_DIM).digest()
    return np.frombuffer(digest, np.uint8).astype(np.float32)


class FakeSender:
    """A :class:`BatchSender` without a server: it answers :func:`fake_embedding` of each row.

    The answer is computed from the slot's buffer after a short, varying
    delay, so a slot refilled while in flight would give wrong vectors, and
    answers come back out of order. ``fail_on`` raises on that call;
    ``short_on`` answers one embedding too few on that call.
    """

    def __init__(
        self,
        slots: int,
        batch_size: int,
        *,
        delay: float = 0.002,
        fail_on: int | None = None,
        short_on: int | None = None,
    ) -> None:
        self.slots = slots
        self.batch_size = batch_size
        self._buffers = [
            np.zeros((batch_size, FAKE.window_samples), FAKE.input_dtype) for _ in range(slots)
        ]
        self.delay = delay
        self.fail_on = fail_on
        self.short_on = short_on
        self.calls = 0
        self.busy: set[int] = set()  # slots being sent now
        self.most_busy = 0
        self.answers: list[np.ndarray] = []
        self.cancelled = False
        self.confirmed = 0  # model checks asked for (one before each commit)
        self.lock = threading.Lock()

    def buffer(self, slot: int) -> np.ndarray:
        return self._buffers[slot]

    def send(self, slot: int, n: int) -> np.ndarray:
        with self.lock:
            if slot in self.busy:
                raise AssertionError(f"slot {slot} sent again while in flight")
            self.busy.add(slot)
            self.most_busy = max(self.most_busy, len(self.busy))
            self.calls += 1
            call = self.calls
        try:
            time.sleep(self.delay * (call % 3))
            if call == self.fail_on:
                raise RuntimeError("boom: the fake sender broke")
            out = np.stack([fake_embedding(w) for w in self._buffers[slot][:n]])
        finally:
            with self.lock:
                self.busy.discard(slot)
        with self.lock:
            self.answers.append(out)
        return out[:-1] if call == self.short_on else out

    def cancel(self) -> None:
        self.cancelled = True

    def confirm_model(self) -> None:
        self.confirmed += 1

    def close(self) -> None:
        self._buffers = []


class CountingStore:
    """The real store, noting how many tracks each commit makes durable."""

    def __init__(self, inner: IndexStore) -> None:
        self.inner = inner
        self.added = 0
        self.commits: list[int] = []

    def add_track(self, pending, **kw) -> None:
        self.inner.add_track(pending, **kw)
        self.added += 1

    def record_failure(self, path: str, reason: str) -> None:
        self.inner.record_failure(path, reason)

    def commit(self) -> None:
        self.inner.commit()
        self.commits.append(self.added)
        self.added = 0


def fake_track(
    folder: Path,
    name: str,
    seconds: float,
    *,
    seed: int,
    silent: bool = False,
    fail_after: float | None = None,
) -> Path:
    """A file holding the spec :func:`fake_decoder` generates the track from."""
    path = folder / name
    spec = {"seconds": seconds, "seed": seed, "silent": silent, "fail_after": fail_after}
    path.write_text(json.dumps(spec))
    return path


def fake_audio(path: str | Path) -> np.ndarray:
    spec = json.loads(Path(path).read_text())
    n = int(spec["seconds"] * FAKE_RATE)
    if spec["silent"]:
        return np.zeros(n, np.float32)
    return music(spec["seconds"], seed=spec["seed"], sample_rate=FAKE_RATE, channels=1)[:n, 0]


def fake_decoder(path: str) -> Iterator[np.ndarray]:
    """The track in blocks of random size; a ``fail_after`` spec breaks mid-stream."""
    spec = json.loads(Path(path).read_text())
    audio = fake_audio(path)
    rng = np.random.default_rng(spec["seed"])
    pos = 0
    while pos < len(audio):
        if spec["fail_after"] is not None and pos >= spec["fail_after"] * FAKE_RATE:
            raise DecodeError(path, "corrupt frame in the middle of the stream")
        n = int(rng.integers(1, 3 * FAKE_RATE))
        yield audio[pos : pos + n]
        pos += n


def expected(path: str | Path, hop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(starts, vectors, n_samples) the store must hold for ``path``: the truth, by hand."""
    audio = fake_audio(path)
    starts, windows = cut(to_wire(audio, FAKE.input_dtype), FAKE.window_samples, hop)
    return starts, np.stack([fake_embedding(w) for w in windows]), len(audio)


def fake_run(
    files: list[Path],
    index: Path,
    sender: FakeSender,
    *,
    workers: int = 3,
    hop: int = FAKE.window_samples,
    queue_windows: int | None = None,
    commit_every_tracks: int = 64,
    commit_every_seconds: float = 1e9,
) -> tuple[RunSummary, list[int]]:
    """Index ``files`` through ``sender``; (summary, tracks made durable by each commit)."""
    summary = RunSummary()
    with IndexStore.open(index, FAKE.identity() | {"hop_samples": hop}, create=True) as inner:
        plan = inner.plan([str(f) for f in files])
        inner.apply(plan)
        store = CountingStore(inner)
        options = PipelineOptions(
            hop_samples=hop,
            decode_workers=workers,
            pyav_processes=0,
            commit_every_tracks=commit_every_tracks,
            commit_every_seconds=commit_every_seconds,
            queue_windows=queue_windows,
            progress=False,
        )
        try:
            Pipeline(FAKE, sender, store, options, decoder=fake_decoder).run(plan.todo, summary)
        finally:
            sender.close()
    return summary, store.commits


def assert_stored_exactly(index: Path, files: list[Path], hop: int) -> None:
    got = stored(index)
    assert sorted(got) == sorted(str(f) for f in files)
    for f in files:
        starts, vectors, n = expected(f, hop)
        g_starts, g_vectors, g_n = got[str(f)]
        assert g_n == n, f
        assert np.array_equal(g_starts, starts), f
        assert np.array_equal(g_vectors, vectors), f  # each window at its own track and start


@pytest.mark.parametrize(
    "workers, batch, slots, hop_div",
    [(1, 1, 1, 1), (4, 5, 3, 1), (3, 7, 2, 2)],
    ids=["serial", "interleaved", "overlapping-hop"],
)
def test_fake_every_window_lands_at_its_track_and_start(tmp_path, workers, batch, slots, hop_div):
    """Many tracks over several decoders and slots: every vector is the right window's."""
    rng = np.random.default_rng(3)
    files = [
        fake_track(tmp_path, f"t{i:02d}.fake", float(rng.uniform(5.0, 23.0)), seed=i)
        for i in range(24)
    ]
    files.append(fake_track(tmp_path, "exact.fake", 5.0, seed=99))  # exactly one window
    hop = FAKE.window_samples // hop_div
    queue_windows = 6
    sender = FakeSender(slots, batch)
    summary, commits = fake_run(
        files, tmp_path / "idx", sender, workers=workers, hop=hop, queue_windows=queue_windows
    )
    assert summary.ok and summary.indexed == len(files)
    assert_stored_exactly(tmp_path / "idx", files, hop)
    truth = {str(f): expected(f, hop) for f in files}
    assert summary.windows == sum(len(s) for s, _, _ in truth.values())
    assert summary.audio_seconds == pytest.approx(sum(n for *_, n in truth.values()) / FAKE_RATE)
    assert commits == [len(files)]  # neither policy was due: one commit at the end
    # Requests in flight never exceed the slots. (summary.peak_in_flight counts requests
    # not yet gathered, so it may pass them by one: a slot is free before its answer is read.)
    assert 1 <= sender.most_busy <= slots and summary.peak_in_flight >= 1
    assert summary.peak_windows_held <= queue_windows + slots * batch + batch + workers
    if batch > 1:  # requests mix windows of several tracks, and still each lands at its own
        owner = {v.tobytes(): p for p, (_, vs, _) in truth.items() for v in vs}
        assert any(len({owner[v.tobytes()] for v in a}) > 1 for a in sender.answers)


def test_fake_bad_files_are_named_and_the_others_kept(tmp_path):
    """A decoder failure mid-track fails that file only; too short and silent ones are skipped."""
    good = [fake_track(tmp_path, f"g{i}.fake", 9.0 + 2 * i, seed=i) for i in range(6)]
    broken = fake_track(tmp_path, "broken.fake", 30.0, seed=20, fail_after=12.0)
    short = fake_track(tmp_path, "short.fake", 3.0, seed=21)
    silent = fake_track(tmp_path, "silent.fake", 7.0, seed=22, silent=True)
    files = [*good[:3], broken, short, *good[3:], silent]
    before = {t.name for t in threading.enumerate()}
    summary, _ = fake_run(files, tmp_path / "idx", FakeSender(2, 3), workers=3)
    failed, skipped = dict(summary.failed), dict(summary.skipped)
    assert failed == {str(broken): "corrupt frame in the middle of the stream"}
    assert "shorter than one window (3.00 s < 5.00 s)" in skipped[str(short)]
    assert "digital silence" in skipped[str(silent)]
    assert set(skipped) == {str(short), str(silent)}
    assert summary.indexed == len(good) and not summary.ok
    assert_stored_exactly(tmp_path / "idx", good, FAKE.window_samples)
    with IndexStore.open(tmp_path / "idx", None, create=False) as store:
        assert set(store.failures()) == {str(broken)}  # retried next run
    left = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not [n for n in left if n.startswith(("decode-", "infer"))], left


def test_fake_sender_error_stops_the_run_and_commits_complete_tracks(tmp_path):
    files = [fake_track(tmp_path, f"t{i}.fake", 6.0 + i / 4, seed=i) for i in range(10)]
    sender = FakeSender(2, 2, fail_on=6)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="boom"):
        fake_run(files, tmp_path / "idx", sender, workers=2)
    assert sender.cancelled
    committed = stored(tmp_path / "idx")
    assert 1 <= len(committed) < len(files)  # what was complete is kept, and only that
    done = [f for f in files if str(f) in committed]
    assert_stored_exactly(tmp_path / "idx", done, FAKE.window_samples)
    time.sleep(0.3)
    left = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not [n for n in left if n.startswith("decode-")], left


def test_fake_answer_of_the_wrong_length_is_an_error(tmp_path):
    files = [fake_track(tmp_path, f"t{i}.fake", 12.0, seed=i) for i in range(4)]
    with pytest.raises(IndexerError, match=r"answered \d+ embeddings for a request of \d+ windows"):
        fake_run(files, tmp_path / "idx", FakeSender(2, 2, short_on=3), workers=2)


def test_fake_commit_policy(tmp_path):
    """Commits come every ``commit_every_tracks`` tracks, or after each track at 0 seconds."""
    files = [fake_track(tmp_path, f"t{i:02d}.fake", 6.0 + i % 4, seed=i) for i in range(11)]
    every = 3
    _, commits = fake_run(
        files, tmp_path / "tracks", FakeSender(1, 1), workers=2, commit_every_tracks=every
    )
    assert sum(commits) == len(files) and len(commits) >= 3
    # Each commit but the last comes once the count is reached (an answer may finish two).
    assert all(every <= c <= every + 2 for c in commits[:-1]), commits
    assert len(stored(tmp_path / "tracks")) == len(files)

    _, commits = fake_run(
        files, tmp_path / "seconds", FakeSender(1, 1), workers=2, commit_every_seconds=0.0
    )
    assert sum(commits) == len(files) and max(commits) <= 2, commits


def test_the_cli_commit_default_is_the_pipelines():
    from mert_indexer.client.cli import build_parser

    args = build_parser().parse_args(["--input", "music"])
    assert args.commit_seconds == PipelineOptions(hop_samples=1).commit_every_seconds == 10.0
