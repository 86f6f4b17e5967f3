"""The bundled Triton serving the tiny export: batching, parity, instances, health, bad input.

All against the real server (the session's ``triton`` fixture, or one started
here with other settings) and its own statistics and metrics.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from mert_indexer.client.triton_io import ConnectOptions, TritonPool
from mert_indexer.contract import dump_config, load_config
from mert_indexer.errors import InferenceError
from mert_indexer.server.launcher import LocalTriton
from tests import conftest
from tests.conftest import serve_options

MODEL = "mert"
# Triton's result and ONNX Runtime's in-process result come from the same
# graph and the same kernels; only the batch the rows share differs, which
# may change the summation order inside a kernel. Measured: ≤ 3e-6 relative.
RTOL, ATOL = 1e-4, 1e-5


def client(server: LocalTriton):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url)


def windows(n: int, contract, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pcm = rng.normal(0, 4000, (n, contract.window_samples)).clip(-32768, 32767)
    return pcm.astype(contract.input_dtype)


def infer(c, batch: np.ndarray, contract) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput(
        contract.input_name,
        list(batch.shape),
        {"int16": "INT16", "float32": "FP32"}[batch.dtype.name],
    )
    inp.set_data_from_numpy(batch)
    result = c.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput(contract.output_name)])
    return result.as_numpy(contract.output_name)


def stats(c) -> tuple[int, int]:
    s = c.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def ort_session(server: LocalTriton):
    import onnxruntime as ort

    return ort.InferenceSession(str(server.models[0].onnx_path), providers=["CPUExecutionProvider"])


def variant(repo: Path, dest: Path, edit) -> Path:
    """A copy of ``repo`` whose config ``edit`` changed; the model files are linked."""
    src = repo / MODEL
    out = dest / MODEL
    out.mkdir(parents=True)
    for version in src.iterdir():
        if version.is_dir():
            (out / version.name).symlink_to(version.resolve())
    config = load_config(src / "config.pbtxt")
    edit(config)
    (out / "config.pbtxt").write_text(dump_config(config))
    return dest


# ---------------------------------------------------------------- the session server


def test_concurrent_single_window_requests_are_batched(triton):
    contract = triton.models[0].contract
    data = windows(8, contract)
    with client(triton) as c:
        before = stats(c)

    def one_client(i: int) -> None:
        with client(triton) as own:
            for k in range(8):
                assert infer(own, data[(i + k) % 8][None], contract).shape == (
                    1,
                    contract.embedding_dim,
                )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one_client, range(16)))
    with client(triton) as c:
        after = stats(c)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 16 * 8
    assert executions < inferences / 2, f"{inferences} windows in {executions} executions"


def test_served_embeddings_equal_onnxruntime_in_process(triton):
    contract = triton.models[0].contract
    data = windows(12, contract, seed=1)
    session = ort_session(triton)
    reference = np.concatenate(
        [session.run(None, {session.get_inputs()[0].name: w[None]})[0] for w in data]
    )
    with client(triton) as c:
        whole = infer(c, data, contract)

    # The same windows as single requests from many threads: merged by the batcher.
    def alone(window: np.ndarray) -> np.ndarray:
        with client(triton) as own:
            return infer(own, window[None], contract)

    with ThreadPoolExecutor(12) as pool:
        single = np.concatenate(list(pool.map(alone, data)))
    for served in (whole, single):
        assert served.dtype == np.float32 and served.shape == reference.shape
        np.testing.assert_allclose(served, reference, rtol=RTOL, atol=ATOL)
    assert np.abs(reference).max() > 10 * ATOL  # a meaningful comparison


def test_health_and_prometheus_metrics_answer(triton):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        with urllib.request.urlopen(triton.http_url + path, timeout=5) as r:
            assert r.status == 200, path
    contract = triton.models[0].contract
    with client(triton) as c:
        infer(c, windows(3, contract), contract)
        # The server is shared by the session: requests that other tests left in
        # flight may complete between two reads. Compare a metrics page with
        # the statistics only when they are the same before and after it.
        for _ in range(50):
            before = stats(c)
            with urllib.request.urlopen(triton.metrics_url, timeout=5) as r:
                text = r.read().decode()
            if stats(c) == before:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the server never stopped serving other requests for a metrics read")
        inferences, executions = before

    def metric(name: str) -> float:
        m = re.search(rf'^{name}{{model="{MODEL}",version="1"}} (\S+)$', text, re.MULTILINE)
        assert m, f"{name} missing from the metrics"
        return float(m.group(1))

    assert metric("nv_inference_count") == inferences
    assert metric("nv_inference_exec_count") == executions
    assert metric("nv_inference_request_success") >= 1
    assert metric("nv_inference_queue_duration_us") > 0


@pytest.mark.parametrize("case", ["wrong shape", "wrong dtype", "too large a batch"])
def test_malformed_request_gets_a_clear_error_and_the_server_keeps_serving(triton, case):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    contract = triton.models[0].contract
    if case == "wrong shape":
        inp = grpcclient.InferInput(contract.input_name, [1, 1000], contract.wire_dtype)
        inp.set_data_from_numpy(np.zeros((1, 1000), contract.input_dtype))
        expected = r"unexpected shape for input 'AUDIO'.*expected \[-1,120000\]"
    elif case == "wrong dtype":
        inp = grpcclient.InferInput(contract.input_name, [1, contract.window_samples], "FP64")
        inp.set_data_from_numpy(np.zeros((1, contract.window_samples), np.float64))
        expected = r"data-type is 'FP64', but model 'mert' expects 'INT16'"
    else:
        n = contract.max_batch_size + 1
        inp = grpcclient.InferInput(
            contract.input_name, [n, contract.window_samples], contract.wire_dtype
        )
        inp.set_data_from_numpy(np.zeros((n, contract.window_samples), contract.input_dtype))
        expected = rf"batch-size must be <= {contract.max_batch_size}"
    with client(triton) as c:
        with pytest.raises(InferenceServerException) as info:
            c.infer(MODEL, [inp])
        assert re.search(expected, str(info.value), re.IGNORECASE | re.DOTALL), str(info.value)
        assert infer(c, windows(2, contract), contract).shape == (2, contract.embedding_dim)
        assert c.is_server_live() and c.is_model_ready(MODEL)


def test_the_client_treats_a_refused_request_as_final(triton):
    """A malformed request fails at once; it is not retried as if the server were down."""
    pool = TritonPool(ConnectOptions(servers=(triton.grpc_url,), deadline_seconds=60))
    contract = pool.connect()
    t0 = time.monotonic()
    with pytest.raises(InferenceError, match="refused"):
        pool.infer(np.zeros((1, 1000), contract.input_dtype))
    assert time.monotonic() - t0 < 10
    pool.close()


# ---------------------------------------------------------------- float32 input: NaN and Inf


@pytest.fixture(scope="module")
def float32_repo(tmp_path_factory) -> Path:
    return conftest.export_tiny(
        tmp_path_factory.mktemp("f32") / "model_repository", "--input-dtype", "float32"
    )


@pytest.fixture(scope="module")
def float32_server(float32_repo, tmp_path_factory):
    def finite_warmup(config):
        # Triton's random_data fills FP32 with random bits: NaN and Inf included,
        # which the model rightly refuses. Zeros are a valid window.
        for sample in config.model_warmup:
            for tensor in sample.inputs.values():
                tensor.zero_data = True

    repo = variant(float32_repo, tmp_path_factory.mktemp("f32-zero-warmup"), finite_warmup)
    server = LocalTriton(serve_options(repo))
    server.start()
    yield server
    server.stop()


def test_float32_export_loads_as_exported(float32_repo):
    """The export's own warm-up must be a window the model accepts (finite samples)."""
    with LocalTriton(serve_options(float32_repo)) as server:
        assert server.is_ready()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_is_refused_alone(float32_server, bad):
    from tritonclient.utils import InferenceServerException

    contract = float32_server.models[0].contract
    assert contract.input_dtype == "float32"
    good = windows(7, contract).astype(np.float32) / 32768
    poisoned = good[:1].copy()
    poisoned[0, 1234] = bad
    with client(float32_server) as c, pytest.raises(InferenceServerException, match="NaN or Inf"):
        infer(c, poisoned, contract)
    # Sent together with good requests, it fails alone: the others in its batch are answered.
    barrier = threading.Barrier(8)

    def send(batch: np.ndarray):
        with client(float32_server) as own:
            barrier.wait()
            try:
                return infer(own, batch, contract)
            except InferenceServerException as exc:
                return exc

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, [poisoned] + [g[None] for g in good]))
    assert isinstance(results[0], InferenceServerException)
    assert all(isinstance(r, np.ndarray) and np.isfinite(r).all() for r in results[1:])


# ---------------------------------------------------------------- two instances, warm-up


WARMUP_ITERATIONS = 3


@pytest.fixture(scope="module")
def two_instances(tiny_repo, tmp_path_factory):
    def edit(config):
        del config.instance_group[:]
        config.instance_group.add(count=2)  # kind left to the derivation
        config.dynamic_batching.max_queue_delay_microseconds = 3000
        config.max_batch_size = 32
        warm = config.model_warmup[0]
        warm.batch_size = 16
        warm.count = WARMUP_ITERATIONS

    repo = variant(tiny_repo, tmp_path_factory.mktemp("two"), edit)
    server = LocalTriton(serve_options(repo, log_verbose=1))
    server.start()
    log_at_ready = server.log_path.read_text()
    yield server, load_config(repo / MODEL / "config.pbtxt"), log_at_ready
    server.stop()


def test_live_config_carries_instances_batcher_and_warmup(two_instances):
    from tritonclient.grpc import model_config_pb2 as mc

    server, source, _ = two_instances
    with client(server) as c:
        live = c.get_model_config(MODEL).config
    assert live.backend == "python"
    assert [(g.count, g.kind) for g in live.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert live.max_batch_size == 32
    assert live.dynamic_batching.max_queue_delay_microseconds == 3000
    assert list(live.model_warmup) == list(source.model_warmup)


def test_ready_only_after_warmup(two_instances):
    """When start() returned (ready), every warm-up iteration of every instance had run."""
    _, source, log_at_ready = two_instances
    name = source.model_warmup[0].name
    for instance in ("mert_0_0", "mert_0_1"):
        ran = re.findall(
            rf"instance {instance} is running warmup sample '{name}' "
            rf"for iteration (\d+)",
            log_at_ready,
        )
        assert sorted(map(int, ran)) == list(range(1, WARMUP_ITERATIONS + 1)), instance
    assert log_at_ready.index(f"iteration {WARMUP_ITERATIONS}") < log_at_ready.index(
        "successfully loaded 'mert'"
    )


def test_two_instances_execute_concurrently(two_instances):
    server, _, _ = two_instances
    contract = server.models[0].contract
    stubs = {}
    for p in psutil.Process(server.process.pid).children():
        for instance in ("mert_0_0", "mert_0_1"):
            if instance in p.cmdline():
                stubs[instance] = p
    assert set(stubs) == {"mert_0_0", "mert_0_1"}, "one stub process per instance"
    data = windows(4, contract, seed=3)
    stop = threading.Event()

    def load() -> None:
        with client(server) as c:
            while not stop.is_set():
                infer(c, data, contract)

    def cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        samples = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            samples.append([cpu(stubs["mert_0_0"]), cpu(stubs["mert_0_1"])])
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    steps = np.diff(np.array(samples), axis=0)
    both = int(((steps[:, 0] > 0) & (steps[:, 1] > 0)).sum())
    assert steps.sum(axis=0).min() > 0.2, f"an instance was idle: {steps.sum(axis=0)}"
    assert both >= 3, (
        f"the instances computed at the same time in only {both} of {len(steps)} samples"
    )
