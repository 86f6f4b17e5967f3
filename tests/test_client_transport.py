"""Transport on a real Triton: gRPC payloads vs shared memory, retries, deadlines, cleanup."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from mert_indexer.client import shm
from mert_indexer.client.transport import GrpcSender, ShmSender
from mert_indexer.client.triton_io import (
    ConnectOptions,
    ServedModel,
    TritonPool,
    count_instances,
    is_local,
)
from mert_indexer.client.tuning import MAX_SLOT_BYTES, choose
from mert_indexer.errors import InferenceError, ServerUnavailableError
from tests.conftest import free_port


@pytest.fixture(scope="module")
def pool(triton):
    p = TritonPool(ConnectOptions(servers=(triton.grpc_url,), deadline_seconds=30))
    p.connect()
    yield p
    p.close()


def ours() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob(shm.PREFIX + f"{os.getpid()}-*")}


def registered(pool: TritonPool) -> set[str]:
    client = pool._endpoints[0].client
    status = client.get_system_shared_memory_status(as_json=True)
    return set((status.get("regions") or {}).keys())


def forget_all(pool: TritonPool) -> None:
    """What a server restart does to registrations (retrying while a region is in use)."""
    from tritonclient.utils import InferenceServerException

    for _ in range(100):
        try:
            pool._endpoints[0].client.unregister_system_shared_memory()
            return
        except InferenceServerException as exc:  # "in use", or "Failed to unregister ..."
            assert "in use" in str(exc) or "Failed to unregister" in str(exc), str(exc)
            time.sleep(0.05)
    raise AssertionError("regions stayed in use")


def random_windows(pool: TritonPool, n: int, seed: int) -> np.ndarray:
    c = pool.contract
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c.window_samples)) * 3000).astype(c.input_dtype)


def test_shared_memory_gives_what_grpc_gives(pool):
    windows = random_windows(pool, 5, seed=1)
    grpc = GrpcSender(pool, slots=2, batch_size=8)
    via_shm = ShmSender(pool, slots=2, batch_size=8)
    try:
        for sender in (grpc, via_shm):
            sender.buffer(1)[:5] = windows
        a = grpc.send(1, 5)
        b = via_shm.send(1, 5)
        assert len(ours()) == 2 and len(registered(pool) & ours()) == 2
    finally:
        grpc.close()
        via_shm.close()
    assert a.shape == (5, pool.contract.embedding_dim)
    np.testing.assert_array_equal(a, b)
    assert not ours() and not (registered(pool) & {r for r in ours()})


def test_shared_memory_is_released_after_an_error(pool):
    sender = ShmSender(pool, slots=3, batch_size=4)
    names = ours()
    assert len(names) == 3 and names <= registered(pool)
    try:
        with pytest.raises(InferenceError):
            pool.infer_shm(sender._regions[0], 5)  # more windows than the region holds
    finally:
        sender.close()
    assert not ours()
    assert not (names & registered(pool))


def test_regions_of_dead_clients_are_removed(tmp_path):
    # Liveness is the owner's lock on the file (tests/test_client_faults.py tries reused
    # and foreign PIDs): a file nobody holds is stale, a live region is held.
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = shm.SHM_DIR / f"{shm.PREFIX}{dead}-deadbeef-0"
    stale.write_bytes(b"x")
    mine = shm.ShmRegion(f"{shm.PREFIX}{os.getpid()}-cafecafe-0", (4,), "int16")
    try:
        removed = shm.remove_stale()
        assert stale.name in removed and not stale.exists()
        assert (shm.SHM_DIR / mine.name).exists()
    finally:
        stale.unlink(missing_ok=True)
        mine.close()


def test_invalid_request_fails_at_once(pool):
    bad = np.zeros((2, pool.contract.window_samples + 1), pool.contract.input_dtype)
    t0 = time.monotonic()
    with pytest.raises(InferenceError, match="refused"):
        pool.infer(bad)
    assert time.monotonic() - t0 < 5  # no retry loop for a request the server rejects


def test_down_endpoint_is_avoided(triton, pool):
    """One server of two is down: every request is answered by the other."""
    dead = f"127.0.0.1:{free_port()}"
    both = TritonPool(ConnectOptions(servers=(dead, triton.grpc_url), deadline_seconds=20))
    both.contract, both.served = pool.contract, pool.served  # connect() would wait for `dead`
    try:
        windows = random_windows(pool, 2, seed=2)
        for _ in range(6):
            assert both.infer(windows).shape == (2, pool.contract.embedding_dim)
        counts = both.requests_per_endpoint()
        assert counts == {dead: 0, triton.grpc_url: 6}
    finally:
        both.close()


def test_no_server_fails_clearly_after_the_deadline():
    url = f"127.0.0.1:{free_port()}"
    p = TritonPool(ConnectOptions(servers=(url,), deadline_seconds=1.5))
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=f"{url}: no ready model 'mert' within 2 s"):
        p.connect()
    assert 1.5 <= time.monotonic() - t0 < 10  # tried until the deadline, not longer
    p.close()


def test_instances_counted_from_config():
    assert count_instances({}) == 1
    assert count_instances({"instance_group": [{"count": 3, "kind": "KIND_CPU"}]}) == 3
    assert (
        count_instances(
            {"instance_group": [{"count": 2, "kind": "KIND_GPU", "gpus": [0, 1, 2]}, {"count": 1}]}
        )
        == 7
    )


def test_local_servers_are_recognised():
    assert is_local("localhost:8001") and is_local("127.0.0.1:8001") and is_local("[::1]:8001")
    assert not is_local("192.0.2.1:8001")  # TEST-NET-1: never this host


@pytest.mark.parametrize(
    "served, expect",
    [
        # one CPU instance, max batch 64: 16-window requests, enough in flight for two
        # server batches
        (ServedModel((1,), 64, True), (16, 8)),
        (ServedModel((2, 2), 64, True), (16, 32)),
        (ServedModel((1,), 8, True), (8, 2)),
        (ServedModel((1,), 0, False), (1, 2)),  # no batching: one window per request
    ],
)
def test_automatic_sizing(served, expect):
    s = choose(served, window_bytes=240_000, cores=6)
    assert (s.batch_size, s.in_flight) == expect
    assert s.decode_workers == 6 and s.pyav_processes == 6


def test_sizing_overrides_and_memory_cap():
    served = ServedModel((64,), 64, True)
    s = choose(
        served,
        window_bytes=480_000,
        cores=2,
        workers=5,
        pyav_processes=0,
        batch_size=32,
        in_flight=3,
    )
    assert (s.decode_workers, s.pyav_processes, s.batch_size, s.in_flight) == (5, 0, 32, 3)
    capped = choose(served, window_bytes=480_000, cores=2)
    assert capped.in_flight * capped.batch_size * 480_000 <= MAX_SLOT_BYTES


def test_forgotten_registration_is_renewed(pool):
    """A restarted server no longer knows our regions: they are registered again, once."""
    windows = random_windows(pool, 3, seed=3)
    sender = ShmSender(pool, slots=1, batch_size=4)
    try:
        sender.buffer(0)[:3] = windows
        expected = sender.send(0, 3)
        forget_all(pool)
        assert not (ours() & registered(pool))
        np.testing.assert_array_equal(sender.send(0, 3), expected)
        assert ours() <= registered(pool)
    finally:
        sender.close()
