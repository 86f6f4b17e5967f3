"""``indexer-client`` end to end: several servers, the model guard, the summary and exit codes."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from mert_indexer.client.report import RunSummary, display, summary_lines
from mert_indexer.client.synth import music, write
from mert_indexer.client.triton_io import ConnectOptions, TritonPool
from mert_indexer.errors import ModelContractError
from tests.conftest import export_tiny, run_cli, serve_options


@pytest.fixture(scope="module")
def second_server(tiny_repo):
    """Another bundled Triton serving the same tiny model."""
    from mert_indexer.server.launcher import LocalTriton

    with LocalTriton(serve_options(tiny_repo)) as server:
        yield server


@pytest.fixture(scope="module")
def other_model_server(tmp_path_factory):
    """A Triton serving a tiny model with different weights (--seed 1)."""
    from mert_indexer.server.launcher import LocalTriton

    repo = export_tiny(tmp_path_factory.mktemp("seed1") / "model_repository", "--seed", "1")
    with LocalTriton(serve_options(repo)) as server:
        yield server


def inference_count(server) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics("mert", as_json=True)
    finally:
        client.close()
    return sum(int(m.get("inference_count", 0)) for m in stats.get("model_stats", []))


def test_two_servers_share_the_load(triton, second_server, catalogue, tmp_path):
    before = (inference_count(triton), inference_count(second_server))
    proc = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--server",
        second_server.grpc_url,
        "--input",
        str(catalogue[0].parent),
        "--index",
        str(tmp_path / "idx"),
        "--no-progress",
        "--no-build",
        "--batch-size",
        "2",
        "--in-flight",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    first = inference_count(triton) - before[0]
    second = inference_count(second_server) - before[1]
    windows = int(re.search(r"\((\d+) windows", proc.stdout).group(1))
    assert first + second == windows  # inference_count counts windows (batch items)
    assert first >= windows // 5 and second >= windows // 5, (first, second)


def test_servers_with_different_models_are_refused(triton, other_model_server):
    pool = TritonPool(
        ConnectOptions(servers=(triton.grpc_url, other_model_server.grpc_url), deadline_seconds=30)
    )
    try:
        with pytest.raises(ModelContractError, match="serves a different model"):
            pool.connect()
    finally:
        pool.close()


def test_index_of_another_model_is_refused(triton, other_model_server, catalogue, tmp_path):
    index = tmp_path / "idx"
    first = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(catalogue[0]),
        "--index",
        str(index),
        "--no-progress",
    )
    assert first.returncode == 0, first.stderr
    snapshot = {p.name: p.stat().st_size for p in index.rglob("*") if p.is_file()}
    proc = run_cli(
        "indexer-client",
        "--server",
        other_model_server.grpc_url,
        "--input",
        str(catalogue[1]),
        "--index",
        str(index),
        "--no-progress",
    )
    assert proc.returncode == 1
    assert "built by another model" in proc.stderr and "weights_sha256" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {
        p.name: p.stat().st_size for p in index.rglob("*") if p.is_file() if p.name != "LOCK"
    } == {k: v for k, v in snapshot.items() if k != "LOCK"}


def test_summary_names_every_problem_and_exits_non_zero(triton, catalogue, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(catalogue[0], folder)
    write(folder / "short.flac", music(2.0, seed=3), 44_100)
    (folder / "junk.ogg").write_bytes(b"\0" * 4000)
    (folder / "dir.mp3").mkdir()
    weird = os.fsdecode(b"caf\xe9 \xff.wav")  # not UTF-8: surrogate escapes in Python
    shutil.copy(catalogue[0], folder / weird)
    run = ("indexer-client", "--server", triton.grpc_url, "--input", str(folder), "--no-progress")
    proc = run_cli(*run, "--index", str(tmp_path / "idx"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "indexed 1 track(s)" in proc.stdout
    assert "skipped 1, failed 3" in proc.stdout
    err = proc.stderr
    assert f"skipped: {folder / 'short.flac'}: shorter than one window" in err
    assert f"failed: {folder / 'junk.ogg'}: not a readable audio file" in err
    assert f"failed: {folder / 'dir.mp3'}:" in err
    assert "caf\\xe9 \\xff.wav" in err  # escaped, not crashed on
    assert "one track, no other music to calibrate the no-match threshold against" in err
    assert "tracks/hour" in proc.stdout and "h of audio" in proc.stdout
    # A calibration reference that is no index: one line, nothing indexed or lost.
    proc = run_cli(
        *run, "--index", str(tmp_path / "idx"), "--calibrate-with", str(tmp_path / "nowhere")
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"indexer-client: error: {tmp_path / 'nowhere'}: the calibration reference is no "
        "index store here (catalog.sqlite missing)"
    )


def test_bad_flag_combinations_are_rejected():
    for args, message in [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--shm", "--server", "192.0.2.1:8001"], "--shm needs every server"),
        (["--hop-seconds", "-1"], "--hop-seconds must be positive"),
    ]:
        proc = run_cli("indexer-client", "--input", ".", *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_summary_lines_escape_undecodable_names():
    s = RunSummary(
        indexed=2,
        audio_seconds=7200.0,
        wall_seconds=60.0,
        failed=[(os.fsdecode(b"/x/\xff.mp3"), "boom")],
    )
    out, err = summary_lines(s)
    assert "2.00 h of audio" in out[0] and "120x realtime" in out[0] and "120 tracks/hour" in out[0]
    assert err[0] == "failed: /x/\\xff.mp3: boom"
    assert display(os.fsdecode(b"ok-\xc3\xa9")) == "ok-é"
    err[0].encode("utf-8")  # printable: no surrogates left
