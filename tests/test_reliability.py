"""Fault injection: bad input, server faults, client kills, a full disk, TLS.

Every bad file must be named with a one-line reason while the run goes on and
counts it; nothing already indexed may be lost or duplicated.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.client.synth import music, write
from mert_indexer.indexer.verify import verify_store
from tests.conftest import BIN, run_cli, serve_options, window_set

SR = 44_100


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _latin1_tagged_mp3(path: Path) -> Path:
    """An mp3 whose ID3v2 title is Latin-1 bytes declared as UTF-8 (breaks strict readers)."""
    body = write(path.with_suffix(".tmp.mp3"), music(8.0, seed=41, sample_rate=SR), SR)
    title = "Caf\xe9 del Mar".encode("latin-1")
    frame = b"TIT2" + (len(title) + 1).to_bytes(4, "big") + b"\x00\x00" + b"\x03" + title
    header = b"ID3\x04\x00\x00" + _syncsafe(len(frame))
    path.write_bytes(header + frame + body.read_bytes())
    body.unlink()
    return path


def _syncsafe(n: int) -> bytes:
    return bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F])


def _png(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(5).bytes(3000))
    return path


# name -> (maker, expected: "indexed" or a substring of the reported reason)
BAD_INPUTS = {
    "zero_bytes.mp3": (lambda p: p.write_bytes(b"") or p, "empty file (0 bytes)"),
    "empty.wav": (lambda p: write(p, np.zeros((0, 2), np.float32), SR), "shorter than one window"),
    "truncated.mp3": (lambda p: _truncate(write(p, music(20, 11, SR), SR)), "truncated"),
    "truncated.flac": (lambda p: _truncate(write(p, music(20, 12, SR), SR)), "mid-stream"),
    "truncated.ogg": (lambda p: _truncate(write(p, music(20, 13, SR), SR)), "truncated"),
    "random_bytes.mp3": (
        lambda p: p.write_bytes(np.random.default_rng(1).bytes(20000)) or p,
        "not a readable audio file",
    ),
    "text.wav": (lambda p: p.write_text("not audio\n" * 100) or p, "not a readable audio file"),
    "image.flac": (_png, "not a readable audio file"),
    "folder.mp3": (lambda p: p.mkdir() or p, "is a directory"),
    "broken_link.ogg": (
        lambda p: p.symlink_to(p.parent / "nowhere.ogg") or p,
        "broken symbolic link",
    ),
    "loop_a.wav": (
        lambda p: (
            (p.symlink_to(p.parent / "loop_b.wav"), (p.parent / "loop_b.wav").symlink_to(p)) and p
        ),
        "symbolic link loop",
    ),
    "short.wav": (lambda p: write(p, music(3.0, 14, SR), SR), "shorter than one window"),
    "silence.flac": (lambda p: write(p, np.zeros((SR * 8, 2), np.float32), SR), "digital silence"),
    # Inputs that are odd but fine: they must be indexed.
    "mono.wav": (lambda p: write(p, music(8, 15, SR, channels=1), SR), "indexed"),
    "six_channels.wav": (lambda p: write(p, music(8, 16, SR, channels=6), SR), "indexed"),
    "rate_8k.flac": (lambda p: write(p, music(8, 17, 8_000), 8_000), "indexed"),
    "rate_96k.flac": (lambda p: write(p, music(8, 18, 96_000), 96_000), "indexed"),
    "latin1_tags.mp3": (_latin1_tagged_mp3, "indexed"),
}
NON_UTF8_NAME = b"caf\xe9_non_utf8.wav"


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("messy")
    for name, (make, _) in BAD_INPUTS.items():
        make(folder / name)
    for i in range(2):
        write(folder / f"good_{i}.mp3", music(12, 100 + i, SR), SR)
    staged = write(folder / "staged.wav", music(8, 19, SR), SR)
    os.rename(os.fsencode(staged), os.fsencode(folder) + b"/" + NON_UTF8_NAME)
    return folder


@pytest.fixture(scope="module")
def messy_run(triton, messy_folder, tmp_path_factory):
    index = tmp_path_factory.mktemp("messy_index") / "idx"
    proc = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(messy_folder),
        "--index",
        str(index),
        "--no-progress",
    )
    return proc, index


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_each_input_kind_is_reported_or_indexed(messy_run, messy_folder, name):
    proc, _ = messy_run
    expected = BAD_INPUTS[name][1]
    lines = [ln for ln in proc.stderr.splitlines() if name in ln]
    if expected == "indexed":
        assert not lines, lines
    else:
        assert len(lines) == 1, proc.stderr  # one line per bad file
        assert expected in lines[0]


def test_messy_run_goes_on_counts_and_fails(messy_run):
    proc, index = messy_run
    assert proc.returncode == 1
    # loop_b.wav (the other half of the loop) and the non-UTF-8 name are reported too.
    bad = sum(1 for _, exp in BAD_INPUTS.values() if exp != "indexed") + 2
    good = len(BAD_INPUTS) - bad + 2 + 2  # odd-but-fine + good_*
    assert f"indexed {good} track(s)" in proc.stdout, proc.stdout
    assert any("non_utf8.wav" in ln and "UTF-8" in ln for ln in proc.stderr.splitlines())
    # The summary line counts every bad input, skipped or failed.
    import re

    m = re.search(r"skipped (\d+), failed (\d+)", proc.stdout)
    assert m and int(m.group(1)) + int(m.group(2)) == bad, proc.stdout
    paths = {p for p, _ in window_set(index)}
    assert len(paths) == good and not any("non_utf8" in p for p in paths)


def test_rerun_of_messy_folder_adds_nothing(triton, messy_folder, messy_run):
    _, index = messy_run
    proc = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(messy_folder),
        "--index",
        str(index),
        "--no-progress",
    )
    assert "indexed 0 track(s)" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def many_tracks(tmp_path_factory) -> Path:
    from mert_indexer.client.synth import write_catalogue

    folder = tmp_path_factory.mktemp("many")
    write_catalogue(folder, 24, seconds=(10, 16), suffixes=(".flac", ".wav"), seed=7)
    return folder


@pytest.fixture(scope="module")
def reference_windows(triton, many_tracks, tmp_path_factory) -> list[tuple[str, int]]:
    index = tmp_path_factory.mktemp("ref") / "idx"
    proc = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(many_tracks),
        "--index",
        str(index),
        "--no-progress",
        "--no-build",
    )
    assert proc.returncode == 0, proc.stderr
    keys = window_set(index)
    assert len({p for p, _ in keys}) == 24 and len(keys) > 24
    assert verify_store(index, check_index=False).ok  # rows tile each track, starts inside it
    return keys


def _committed_tracks(index: Path) -> int:
    if not (index / "catalog.sqlite").exists():
        return 0
    try:
        return len({p for p, _ in window_set(index)})
    except Exception:  # the first writer may still be creating the store
        return 0


def _wait_for_progress(
    proc: subprocess.Popen, index: Path, tracks: int, timeout: float = 300
) -> bool:
    """Wait until ``tracks`` tracks are committed; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _committed_tracks(index) >= tracks:
            return True
        time.sleep(0.05)
    raise AssertionError("no progress")


SLOW_CLIENT = (
    "--no-progress",
    "--no-build",
    "--batch-size",
    "1",
    "--in-flight",
    "1",
    "--workers",
    "1",
    "--commit-seconds",
    "0",
)


def slow_client(server_url: str, tracks: Path, index: Path, *extra: str) -> list[str]:
    """An ``indexer-client`` command line that indexes ``tracks`` one window at a time."""
    return [
        str(BIN / "indexer-client"),
        "--server",
        server_url,
        "--input",
        str(tracks),
        "--index",
        str(index),
        *SLOW_CLIENT,
        *extra,
    ]


def test_client_sigkilled_three_times_then_rerun_is_exact(
    tiny_repo, many_tracks, reference_windows, tmp_path
):
    from mert_indexer.server.launcher import LocalTriton

    # A server of its own: the killed clients' requests still in flight complete (or are
    # cancelled) after the kill, which must not reach the session's server and its tests.
    with LocalTriton(serve_options(tiny_repo)) as server:
        index = tmp_path / "idx"
        cmd = slow_client(server.grpc_url, many_tracks, index)
        rng = np.random.default_rng(3)
        kills = 0
        for target in sorted(rng.choice(np.arange(2, 20), size=3, replace=False)):
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if _wait_for_progress(proc, index, int(target)):
                time.sleep(float(rng.uniform(0, 0.3)))  # anywhere in the next track
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        assert kills == 3
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert window_set(index) == reference_windows  # no duplicates, no gaps


def test_server_killed_and_restarted_mid_run(tiny_repo, many_tracks, reference_windows, tmp_path):
    from mert_indexer.server.launcher import LocalTriton

    options = serve_options(tiny_repo)
    server = LocalTriton(options)
    server.start()
    index = tmp_path / "idx"
    cmd = slow_client(server.grpc_url, many_tracks, index, "--deadline", "120")
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for_progress(client, index, 4)
        os.killpg(server.process.pid, signal.SIGKILL)  # the whole server, stubs included
        server.process.wait()
        server.stop()
        time.sleep(2.0)
        server = LocalTriton(options)
        server.start()
        _out, err = client.communicate(timeout=600)
    finally:
        server.stop()
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, err
    assert window_set(index) == reference_windows


def _vectors(index: Path) -> dict[str, np.ndarray]:
    from mert_indexer.indexer.store import IndexStore

    with IndexStore.open(index, None, create=False) as store:
        return {t.path: v.astype(np.float32) for t, _, v in store.iter_windows()}


@pytest.mark.parametrize(
    "change", ["identity", pytest.param("seed1", marks=pytest.mark.slow)], ids=str
)
def test_server_restarted_with_another_model_stops_the_run(
    tiny_repo, triton, many_tracks, reference_windows, tmp_path, change
):
    """Issue 13, item 5: the served repository gets another model mid-run and the server is
    restarted; the client's retries reach it, re-read its identity, and stop the run with a
    typed error. What was committed is the old model's; nothing of the new one is stored.
    ``identity``: the same weights under another identity (fast); ``seed1``: a re-export
    with other weights, checked vector by vector against the old model."""
    import re as _re

    from mert_indexer.server.launcher import LocalTriton
    from tests.conftest import export_tiny

    repo = tmp_path / "served"
    shutil.copytree(tiny_repo, repo)
    other = export_tiny(tmp_path / "other", "--seed", "1") if change == "seed1" else None
    options = serve_options(repo)
    server = LocalTriton(options)
    server.start()
    index = tmp_path / "idx"
    cmd = slow_client(server.grpc_url, many_tracks, index, "--deadline", "120")
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for_progress(client, index, 4)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        server.stop()
        config = repo / "mert" / "config.pbtxt"
        if other is None:
            text = config.read_text()
            config.write_text(
                _re.sub(
                    r'(weights_sha256" value: \{ string_value: ")[0-9a-f]+',
                    r"\g<1>" + "e" * 64,
                    text,
                )
            )
            assert "e" * 64 in config.read_text()
        else:
            shutil.copy2(other / "mert" / "1" / "model.onnx", repo / "mert" / "1" / "model.onnx")
            shutil.copy2(other / "mert" / "config.pbtxt", config)
        server = LocalTriton(options)
        server.start()
        _out, err = client.communicate(timeout=300)
    finally:
        server.stop()
        if client.poll() is None:
            client.kill()
    assert client.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("indexer-client: error:") and "the model changed during the run" in last
    committed = window_set(index)
    tracks = {p for p, _ in committed}
    assert len(tracks) >= 4 and set(committed) <= set(reference_windows)
    if other is not None:  # every stored vector is the old model's
        ref = tmp_path / "ref"
        inputs = [a for p in sorted(tracks) for a in ("--input", p)]
        proc = run_cli(
            "indexer-client",
            "--server",
            triton.grpc_url,
            *inputs,
            "--index",
            str(ref),
            "--no-progress",
            "--no-build",
        )
        assert proc.returncode == 0, proc.stderr
        got, want = _vectors(index), _vectors(ref)
        assert got.keys() == want.keys()
        for path in got:
            np.testing.assert_allclose(got[path], want[path], rtol=2e-3, atol=2e-3)


def test_server_never_back_fails_clearly_and_rerun_completes(
    tiny_repo, triton, many_tracks, reference_windows, tmp_path
):
    from mert_indexer.server.launcher import LocalTriton

    server = LocalTriton(serve_options(tiny_repo))
    server.start()
    index = tmp_path / "idx"
    cmd = slow_client(server.grpc_url, many_tracks, index, "--deadline", "5")
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_progress(client, index, 3)
    server.stop()
    _out, err = client.communicate(timeout=300)
    assert client.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("indexer-client: error:") and "within 5 s" in last, err
    partial = window_set(index)  # the catalog opens, consistent
    assert set(partial) <= set(reference_windows)
    done = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(many_tracks),
        "--index",
        str(index),
        "--no-progress",
        "--no-build",
    )
    assert done.returncode == 0, done.stderr
    assert window_set(index) == reference_windows


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_a_clear_error_and_nothing_is_corrupted(triton, many_tracks, small_fs):
    index = small_fs / "idx"
    proc = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(many_tracks),
        "--index",
        str(index),
        "--no-progress",
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("indexer-client: error:") and (
        "No space left" in last or "disk is full" in last
    ), proc.stderr
    report = verify_store(index, check_index=False)  # what was committed is readable, whole
    assert report.ok, report.problems
    # Free space (as a user would), rerun: it completes.
    big = small_fs.parent / "moved"
    shutil.copytree(index, big)
    done = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(many_tracks),
        "--index",
        str(big),
        "--no-progress",
        "--no-build",
    )
    assert done.returncode == 0, done.stderr


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    ca_key, ca = folder / "ca.key", folder / "ca.pem"
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    ssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return ca, cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_grpc_over_tls(tiny_repo, catalogue, tmp_path):
    from mert_indexer.server.launcher import LocalTriton

    ca, cert, key = _certificates(tmp_path)
    with LocalTriton(serve_options(tiny_repo, ssl_cert=cert, ssl_key=key)) as server:
        url = f"localhost:{server.options.grpc_port}"
        args = [
            "--server",
            url,
            "--input",
            str(catalogue[0]),
            "--index",
            str(tmp_path / "i"),
            "--no-progress",
            "--deadline",
            "5",
        ]
        ok = run_cli("indexer-client", *args, "--ssl-ca", str(ca))
        assert ok.returncode == 0, ok.stderr
        plain = run_cli("indexer-client", *args)
        assert plain.returncode == 1 and "indexer-client: error:" in plain.stderr


def test_local_server_binds_loopback_only(triton):
    import psutil

    conns = [
        c
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
        and c.laddr.port
        in (triton.options.grpc_port, triton.options.http_port, triton.options.metrics_port)
    ]
    assert conns and all(c.laddr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for c in conns)


def test_no_pickle_loading_in_the_code():
    """Stores, indexes and weights are never unpickled.

    No np.load allow_pickle, pickle or torch.load.
    """
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [
        *root.glob("client/**/*.py"),
        *root.glob("indexer/**/*.py"),
        *root.glob("server/**/*.py"),
        *root.glob("export/**/*.py"),
    ]:
        text = path.read_text()
        if (
            "allow_pickle=True" in text
            or "import pickle" in text
            or ("torch.load(" in text and "weights_only=True" not in text)
        ):
            offenders.append(str(path))
    assert not offenders
