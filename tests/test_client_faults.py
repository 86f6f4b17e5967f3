"""Faults on the client side: poisoned answers, files that break while read, hostile headers,
a model that changes mid-run, stale shared memory, the published ports.

Issue 13, items 5 (model identity during a run), 6 (one bad file never stops the
run), 7 (caps on hostile input, bounded memory) and 10 (shared-memory liveness,
compose ports). The pipeline tests use the fast in-process ``FakeSender`` of
``tests/test_pipeline.py`` where a real server cannot fail the way the test needs
(answer NaN for one file's windows), and the real bundled Triton otherwise.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from mert_indexer.client import decode as decode_mod
from mert_indexer.client import shm
from mert_indexer.client.decode import DEFAULT_MAX_TRACK_SECONDS, decode_blocks
from mert_indexer.client.pipeline import Pipeline, PipelineOptions
from mert_indexer.client.report import RunSummary
from mert_indexer.client.synth import music, write
from mert_indexer.client.transport import make_sender
from mert_indexer.client.triton_io import ConnectOptions, TritonPool
from mert_indexer.client.windows import cut, to_wire
from mert_indexer.errors import DecodeError, ModelChangedError, QueryError
from mert_indexer.indexer.store import IndexStore
from mert_indexer.server import preflight
from tests.test_pipeline import (
    FAKE,
    FAKE_RATE,
    FakeSender,
    assert_stored_exactly,
    fake_audio,
    fake_decoder,
    fake_track,
    stored,
)

ROOT = Path(__file__).resolve().parents[1]


def wav_header(rate: int, channels: int, frames: int, bits: int = 16) -> bytes:
    """A PCM WAV header claiming ``rate`` Hz (soundfile refuses to write absurd rates)."""
    block = channels * bits // 8
    data = frames * block
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
        + b"data"
        + struct.pack("<I", data)
    )


def hostile_wav(path: Path, rate: int, size: int = 131_072, seed: int = 0) -> Path:
    """A small WAV of noise that claims ``rate`` Hz: 131 kB at 1 Hz is 18 h of 'audio'."""
    frames = (size - 44) // 2
    noise = np.random.default_rng(seed).integers(-8000, 8000, frames, dtype=np.int16)
    path.write_bytes(wav_header(rate, 1, frames) + noise.tobytes())
    return path


def sparse_wav(path: Path, seconds: float, rate: int = 8_000) -> Path:
    """A mono 16-bit WAV of ``seconds`` of silence as a sparse file (no disk, no time)."""
    frames = int(seconds * rate)
    with open(path, "wb") as fh:
        fh.write(wav_header(rate, 1, frames))
        fh.truncate(44 + 2 * frames)
    return path


# -- item 6: one bad file costs that file, every run ---------------------------------------


class PoisonSender(FakeSender):
    """A FakeSender that answers NaN (or a value beyond float16) for chosen windows."""

    def __init__(self, *args, poison: dict[bytes, float], **kw) -> None:
        super().__init__(*args, **kw)
        self.poison = poison  # window bytes -> the value answered for it

    def send(self, slot: int, n: int) -> np.ndarray:
        windows = [w.tobytes() for w in self._buffers[slot][:n]]
        out = super().send(slot, n).copy()
        for r, w in enumerate(windows[: len(out)]):
            if w in self.poison:
                out[r] = self.poison[w]
        return out


def windows_of(path: Path, hop: int = FAKE.window_samples) -> list[bytes]:
    _, windows = cut(to_wire(fake_audio(path), FAKE.input_dtype), FAKE.window_samples, hop)
    return [w.tobytes() for w in windows]


def run_folder(files: list[Path], index: Path, sender, decoder) -> RunSummary:
    summary = RunSummary()
    hop = FAKE.window_samples
    with IndexStore.open(index, FAKE.identity() | {"hop_samples": hop}, create=True) as store:
        plan = store.plan([str(f) for f in files])
        store.apply(plan)
        for path, reason in plan.unreadable:
            summary.failed.append((path, reason))
            store.record_failure(path, reason)
        options = PipelineOptions(
            hop_samples=hop, decode_workers=3, pyav_processes=0, progress=False
        )
        Pipeline(FAKE, sender, store, options, decoder=decoder).run(plan.todo, summary)
        store.commit()
    return summary


def test_poisoned_answers_and_a_file_removed_mid_read_fail_alone_every_run(tmp_path):
    """NaN / beyond-float16 answers, a file removed while read, a decoder bug: named, counted,
    the run completes; the next run retries them and fails them the same clean way."""
    folder = tmp_path / "music"
    folder.mkdir()
    good = [fake_track(folder, f"g{i}.fake", 8.0 + 3 * i, seed=i) for i in range(5)]
    nan = fake_track(folder, "nan.fake", 22.0, seed=30)  # NaN for its second window
    huge = fake_track(folder, "huge.fake", 12.0, seed=31)  # 1e6 for its last window
    odd = fake_track(folder, "odd.fake", 9.0, seed=32)  # the decoder has a bug for it
    vanish = write(folder / "vanish.ogg", music(14.0, seed=33, sample_rate=44_100), 44_100)
    vanish_bytes = vanish.read_bytes()
    poison = {windows_of(nan)[1]: float("nan"), windows_of(huge)[-1]: 1e6}

    def decoder(path: str):
        if path == str(odd):
            raise KeyError("a decoder bug for one odd file")
        if path.endswith(".ogg"):
            return removed_after_first_block(path)
        return fake_decoder(path)

    def removed_after_first_block(path: str):
        blocks = decode_blocks(path, FAKE_RATE)
        yield next(blocks)
        os.unlink(path)  # removed while it is being read
        yield from blocks

    files = [*good[:2], nan, odd, vanish, *good[2:], huge]
    first = run_folder(files, tmp_path / "idx", PoisonSender(2, 3, poison=poison), decoder)
    failed = dict(first.failed)
    assert failed[str(nan)] == "the server answered NaN or infinity for window 1 (at 5.0 s)"
    assert failed[str(huge)].startswith("the server answered values beyond float16 range")
    assert failed[str(odd)] == "decoding failed: KeyError: 'a decoder bug for one odd file'"
    assert "read failed: No such file or directory" in failed[str(vanish)]
    assert set(failed) == {str(nan), str(huge), str(odd), str(vanish)}
    assert first.indexed == len(good) and not first.ok  # the CLI exits 1 on this
    assert_stored_exactly(tmp_path / "idx", good, FAKE.window_samples)
    with IndexStore.open(tmp_path / "idx", None, create=False) as store:
        assert set(store.failures()) == set(failed)  # retried next run

    vanish.write_bytes(vanish_bytes)  # the removed file is back; the rest as they were
    again = run_folder(files, tmp_path / "idx", PoisonSender(2, 3, poison=poison), fake_or_real)
    assert dict(again.failed) == {k: v for k, v in failed.items() if k != str(vanish)}
    assert again.indexed == 1  # only the file that is back
    assert set(stored(tmp_path / "idx")) == {str(f) for f in good} | {str(vanish)}


def fake_or_real(path: str):
    if path.endswith(".ogg"):
        return decode_blocks(path, FAKE_RATE)
    if path.endswith("odd.fake"):
        raise KeyError("a decoder bug for one odd file")
    return fake_decoder(path)


def test_poisoned_answer_through_real_triton(triton, catalogue, tmp_path):
    """The same through the real server and transport: the answer for one file's windows is
    replaced by NaN on its way back (the tiny model cannot be made to emit NaN itself)."""
    from tests.test_pipeline import Wrapped, index_run

    pool = TritonPool(ConnectOptions(servers=(triton.grpc_url,), deadline_seconds=30))
    contract = pool.connect()
    try:
        target = catalogue[1]
        audio = to_wire(decode_mod.decode(target, contract.sample_rate), contract.input_dtype)
        poisoned = {
            w.tobytes() for w in cut(audio, contract.window_samples, contract.window_samples)[1]
        }

        class NaNFor(Wrapped):
            def send(self, slot, n):
                rows = [w.tobytes() in poisoned for w in self.inner.buffer(slot)[:n]]
                out = self.inner.send(slot, n).copy()
                out[np.asarray(rows, bool)] = np.nan
                return out

        summary = index_run(
            pool, catalogue, tmp_path / "idx", wrap=lambda s: NaNFor(s, lambda call: None)
        )
        assert [p for p, _ in summary.failed] == [str(target)]
        # Every window of the file is poisoned; requests in flight answer in any order,
        # so the one named is whichever came back first.
        assert re.search(
            r"the server answered NaN or infinity for window \d+ \(at [\d.]+ s\)",
            summary.failed[0][1],
        ), summary.failed[0][1]
        assert summary.indexed == len(catalogue) - 1
        assert str(target) not in stored(tmp_path / "idx")
    finally:
        pool.close()


# -- item 5: the served model changes during the run -----------------------------------------


def test_model_change_without_a_failure_stops_before_commit(triton, catalogue, tmp_path):
    """A server that swaps its model between two answers (no error seen): the commit-time check
    stops the run with ModelChangedError, and no vector answered after the swap is stored."""
    from tests.test_pipeline import Wrapped

    pool = TritonPool(ConnectOptions(servers=(triton.grpc_url,), deadline_seconds=30))
    contract = pool.connect()
    client = pool._endpoints[0].client
    real_config = client.get_model_config
    swapped = threading.Event()

    def config_after_swap(name, as_json=False, **kw):
        cfg = real_config(name, as_json=as_json, **kw)
        if swapped.is_set():
            cfg["config"]["parameters"]["indexer.weights_sha256"]["string_value"] = "f" * 64
        return cfg

    client.get_model_config = config_after_swap

    class NewModelAfter(Wrapped):  # after the swap, answers are "the new model's": offset
        def send(self, slot, n):
            with self.lock:
                self.calls += 1
                if self.calls >= 9:
                    swapped.set()
            out = self.inner.send(slot, n)
            return out + 100.0 if swapped.is_set() else out

    sender = NewModelAfter(make_sender(pool, slots=1, batch_size=2, shm=False), lambda c: None)
    identity = contract.identity() | {"hop_samples": contract.window_samples}
    summary = RunSummary()
    try:
        with IndexStore.open(tmp_path / "idx", identity, create=True) as store:
            plan = store.plan([str(f) for f in catalogue])
            store.apply(plan)
            options = PipelineOptions(
                hop_samples=contract.window_samples,
                decode_workers=1,
                pyav_processes=0,
                commit_every_seconds=0.0,
                progress=False,
            )
            with pytest.raises(ModelChangedError, match="the model changed during the run"):
                Pipeline(contract, sender, store, options).run(plan.todo, summary)
        # Every later request is refused at once, too.
        with pytest.raises(ModelChangedError):
            pool.infer(np.zeros((1, contract.window_samples), contract.input_dtype))
    finally:
        sender.close()
        pool.close()
    committed = stored(tmp_path / "idx")
    assert 1 <= len(committed) < len(catalogue)  # the old model's tracks stay
    assert all(np.abs(v).max() < 50 for _, v, _ in committed.values())  # none of the new


# -- item 7: caps on hostile input, bounded memory -------------------------------------------


@pytest.mark.parametrize("rate", [1, 50, 7_999])
def test_wav_claiming_a_tiny_sample_rate_is_refused_with_bounded_memory(tmp_path, rate):
    path = hostile_wav(tmp_path / f"rate_{rate}.wav", rate)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=rf"sample rate {rate} Hz is below 8000 Hz") as err:
            for _ in decode_blocks(path, 24_000):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.path == str(path)
    assert peak < 2 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_blocks_stay_bounded_even_below_the_rate_floor(tmp_path, monkeypatch):
    """The block cap on its own: with the floor lowered, a 50 Hz file upsampled 480x still
    comes out in blocks of about MAX_BLOCK_OUTPUT samples (one read was 126 MB before). soxr
    releases its output in bursts at such ratios (measured: 1.5x, then nothing): bound 2x."""
    monkeypatch.setattr(decode_mod, "MIN_SOURCE_RATE", 1)
    path = hostile_wav(tmp_path / "rate_50.wav", 50)
    tracemalloc.start()
    try:
        blocks = decode_blocks(path, 24_000, max_seconds=None)
        sizes = [len(next(blocks)) for _ in range(4)]
        blocks.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert max(sizes) <= 2 * decode_mod.MAX_BLOCK_OUTPUT, sizes
    assert peak < 12 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_track_longer_than_the_cap_is_refused(tmp_path):
    seven_hours = sparse_wav(tmp_path / "seven_hours.wav", 7 * 3600)
    t0 = time.monotonic()
    with pytest.raises(DecodeError, match=r"7\.0 h long by its header; longer than 6 h"):
        next(decode_blocks(seven_hours, 24_000))
    assert time.monotonic() - t0 < 1.0  # refused from the header, nothing decoded
    # Streamed lengths (no trusted header: PyAV) are counted as they are decoded.
    m4a = write(tmp_path / "twelve.m4a", music(12.0, seed=3), 44_100)
    with pytest.raises(DecodeError, match=r"longer than 8 s, the longest track read"):
        list(decode_blocks(m4a, 24_000, max_seconds=8.0))
    assert DEFAULT_MAX_TRACK_SECONDS == 6 * 3600


def test_max_track_hours_reaches_the_pipeline(tmp_path):
    from mert_indexer.client.cli import build_parser

    args = build_parser().parse_args(["--input", "x"])
    assert args.max_track_hours * 3600 == PipelineOptions(hop_samples=1).max_track_seconds
    args = build_parser().parse_args(["--input", "x", "--max-track-hours", "0.5"])
    assert args.max_track_hours == 0.5
    from mert_indexer.client.cli import main

    with pytest.raises(SystemExit):
        main(["--input", "x", "--max-track-hours", "0"])


def test_non_finite_samples_fail_the_file(tmp_path):
    import soundfile as sf

    audio = music(8.0, seed=4, sample_rate=24_000)
    audio[50_000, 0] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, audio, 24_000, subtype="FLOAT")
    with pytest.raises(DecodeError, match="NaN or infinite"):
        list(decode_blocks(path, 24_000))


def test_three_hour_query_clip_is_refused_in_bounded_memory(tmp_path):
    """A 3-hour clip: decoding stops at the query cap (600 s), holding about the cap's audio."""
    from mert_indexer.client.query import DEFAULT_MAX_CLIP_SECONDS, decode_clip

    clip = sparse_wav(tmp_path / "three_hours.wav", 3 * 3600)
    tracemalloc.start()
    try:
        with pytest.raises(QueryError, match="longer than 600 s"):
            decode_clip(clip, 24_000, max_seconds=DEFAULT_MAX_CLIP_SECONDS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    held = DEFAULT_MAX_CLIP_SECONDS * 24_000 * 4  # 57.6 MB: the cap's float32 audio
    print(f"3 h query clip: peak traced {peak / 2**20:.1f} MiB (cap's audio {held / 2**20:.1f})")
    assert peak < held + 8 * 2**20, f"{peak / 2**20:.1f} MiB"


# -- item 10: shared-memory liveness by lock, compose ports --------------------------------

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from mert_indexer.client.shm import ShmRegion
r = ShmRegion({name!r}, (4,), "int16")
print("held", flush=True)
sys.stdin.read()
r.close()
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # gone (reuse within this test is vanishingly unlikely)


def test_stale_client_regions_are_judged_by_their_lock_not_their_pid(tmp_path):
    # A region naming a live PID (this process) that nobody holds: stale (an id reused).
    unowned = shm.SHM_DIR / f"{shm.PREFIX}{os.getpid()}-0badf00d-0"
    unowned.write_bytes(b"\0" * 64)
    # A region held by a live process whose name records an id that does not exist here
    # (what a client in another PID namespace looks like): alive.
    held_name = f"{shm.PREFIX}{_dead_pid()}-cafed00d-0"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(root=str(ROOT), name=held_name)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        removed = shm.remove_stale()
        assert unowned.name in removed and not unowned.exists()
        assert held_name not in removed and (shm.SHM_DIR / held_name).exists()
        mine = shm.create_regions(1, (4,), "int16")  # our own, held by us: never removed
        assert mine[0].name not in shm.remove_stale()
        mine[0].close()
    finally:
        child.stdin.close()
        child.wait(timeout=10)
        unowned.unlink(missing_ok=True)
    # The holder closed it cleanly; one that was killed leaves the file, now unlocked.
    (shm.SHM_DIR / held_name).write_bytes(b"\0" * 8)
    assert held_name in shm.remove_stale()


LEASE = """
import sys
sys.path.insert(0, {root!r})
from mert_indexer.server.preflight import ShmLease
lease = ShmLease.acquire()
print(lease.token, flush=True)
sys.stdin.read()
"""


def test_triton_regions_are_removed_only_when_their_lease_is_free():
    old = time.time() - 3600
    child = subprocess.Popen(
        [sys.executable, "-c", LEASE.format(root=str(ROOT))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    token = child.stdout.readline().strip()
    # Nobody here maps these and they are an hour old: what a server in another
    # container (another /proc) looks like from here.
    live = shm.SHM_DIR / f"{preflight.SHM_PREFIX}mert-{token}-{os.getpid()}"
    foreign = shm.SHM_DIR / f"{preflight.SHM_PREFIX}test-foreign-{os.getpid()}"
    try:
        for region in (live, foreign):
            region.write_bytes(b"\0" * 4096)
            os.utime(region, (old, old))
        removed = preflight.remove_stale_shm()
        assert live.exists() and foreign.exists(), removed
        child.kill()  # kill -9: the lease's lock goes with it
        child.wait(timeout=10)
        removed = preflight.remove_stale_shm()
        assert live.name in removed and not live.exists()
        assert foreign.exists()  # not ours: nothing can tell whether it is in use
        assert not (shm.SHM_DIR / f"{preflight.LEASE_PREFIX}{token}.lock").exists()
    finally:
        if child.poll() is None:
            child.kill()
        live.unlink(missing_ok=True)
        foreign.unlink(missing_ok=True)


def test_compose_publishes_triton_on_loopback_only():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    ports = compose["services"]["triton"]["ports"]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), ports
    for service in compose["services"].values():  # nothing else on every interface either
        assert all(str(p).count(":") >= 2 for p in service.get("ports", [])), service
