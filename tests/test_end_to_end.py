"""The whole system on real parts: exporter, bundled Triton, decoding, FAISS, the CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mert_indexer.client.decode import decode
from mert_indexer.client.synth import write
from tests.conftest import run_cli

SR = 24_000


@pytest.fixture(scope="module")
def built_index(triton, catalogue, tmp_path_factory):
    index = tmp_path_factory.mktemp("index") / "idx"
    folder = catalogue[0].parent
    proc = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(folder),
        "--index",
        str(index),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"indexed {len(catalogue)} track(s)" in proc.stdout
    return index


# The tiny random model cannot tell a clip window from windows of other tracks
# well enough for the no-match threshold (tests/test_search.py tests that on
# seeded vectors), so these queries rank best guesses without it.
RANK = ("--min-score", "off")


def excerpt(src: Path, start: float, seconds: float, dest: Path) -> Path:
    audio = decode(src, SR)
    return write(dest, audio[int(start * SR) : int((start + seconds) * SR)], SR)


@pytest.mark.parametrize("which, start", [(0, 7.3), (3, 2.0), (5, 11.75)])
def test_excerpt_found_with_offset(triton, catalogue, built_index, tmp_path, which, start):
    clip = excerpt(catalogue[which], start, 8.0, tmp_path / "clip.wav")
    proc = run_cli(
        "indexer-query",
        "--server",
        triton.grpc_url,
        "--index",
        str(built_index),
        "--json",
        *RANK,
        str(clip),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == 1 and results[0], proc.stdout
    best = results[0][0]
    assert best["track"] == str(catalogue[which])
    # Within one hop of the index (5 s windows, no overlap). The tiny random
    # model cannot resolve finer: its windows a second apart look alike.
    assert abs(best["offset_seconds"] - start) <= 5.0
    assert isinstance(best["score"], float)


def test_json_is_one_entry_per_clip_in_order(triton, catalogue, built_index, tmp_path):
    clips = [excerpt(catalogue[i], 3.0, 6.0, tmp_path / f"c{i}.flac") for i in (4, 1)]
    proc = run_cli(
        "indexer-query",
        "--server",
        triton.grpc_url,
        "--index",
        str(built_index),
        "--json",
        *RANK,
        *map(str, clips),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r[0]["track"] for r in results] == [str(catalogue[4]), str(catalogue[1])]


def test_rerun_indexes_nothing_new(triton, catalogue, built_index):
    proc = run_cli(
        "indexer-client",
        "--server",
        triton.grpc_url,
        "--input",
        str(catalogue[0].parent),
        "--index",
        str(built_index),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "indexed 0 track(s)" in proc.stdout
    assert f"unchanged {len(catalogue)}" in proc.stdout


def test_human_output_names_track_and_time(triton, catalogue, built_index, tmp_path):
    clip = excerpt(catalogue[2], 4.0, 6.0, tmp_path / "clip.ogg")
    proc = run_cli(
        "indexer-query", "--server", triton.grpc_url, "--index", str(built_index), *RANK, str(clip)
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[1]
    assert first.startswith("  1. " + str(catalogue[2]) + "  at 0:0")


def test_clip_shorter_than_a_window_is_refused(triton, catalogue, built_index, tmp_path):
    clip = excerpt(catalogue[0], 1.0, 2.0, tmp_path / "short.wav")
    proc = run_cli(
        "indexer-query",
        "--server",
        triton.grpc_url,
        "--index",
        str(built_index),
        "--json",
        str(clip),
    )
    assert proc.returncode == 1
    assert "short.wav" in proc.stderr and "full window" in proc.stderr
    assert json.loads(proc.stdout) == [[]]


def test_served_embeddings_are_finite_and_shaped(triton):
    from mert_indexer.client.triton_io import ConnectOptions, TritonPool

    pool = TritonPool(ConnectOptions(servers=(triton.grpc_url,)))
    contract = pool.connect()
    batch = np.zeros((3, contract.window_samples), dtype=contract.input_dtype)
    batch[:, ::7] = 1000
    emb = pool.infer(batch)
    pool.close()
    assert emb.shape == (3, contract.embedding_dim) and np.isfinite(emb).all()
