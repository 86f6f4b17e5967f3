"""The indexing pipeline on real parts: bundled Triton, real decoding, the real index store.

Covers what the pipeline promises: the index does not depend on how the work
is split (threads, request size, transport); memory stays bounded when the
server is slow; a worker's exception ends the run in the calling thread with
the completed tracks committed; bad, short and silent files are named.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.client.pipeline import Pipeline, PipelineOptions
from mert_indexer.client.report import RunSummary
from mert_indexer.client.synth import music, write
from mert_indexer.client.transport import make_sender
from mert_indexer.client.triton_io import ConnectOptions, TritonPool
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


def test_decoder_crash_reaches_the_caller(pool, catalogue, tmp_path):
    from mert_indexer.client.decode import decode_blocks

    def decoder(path: str):
        if path == str(catalogue[2]):
            time.sleep(1.0)  # let the first tracks complete
            raise RuntimeError(f"decoder bug on {path}")
        return decode_blocks(path, SR)

    with pytest.raises(RuntimeError, match="decoder bug"):
        index_run(pool, catalogue, tmp_path / "idx", workers=1, batch=2, slots=2, decoder=decoder)
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
