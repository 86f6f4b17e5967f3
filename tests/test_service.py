"""The search service on real parts: the bundled Triton, indexes built by indexer-client, HTTP.

The service runs in this process on a background thread (uvicorn, a free
port) and is spoken to over real sockets; the CLI test starts the console
script itself. Queries rank without the no-match threshold (``min_score=off``)
where they must find a track: the tiny random model cannot support the
threshold (see tests/test_end_to_end.py).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from mert_indexer.client.decode import decode
from mert_indexer.client.synth import write, write_catalogue
from mert_indexer.client.triton_io import ConnectOptions, TritonPool
from mert_indexer.indexer.calibration import MIN_THRESHOLD
from mert_indexer.indexer.generation import INDEX_DIR, read_current
from mert_indexer.indexer.search import Searcher
from mert_indexer.indexer.store import IndexStore, PendingFile
from mert_indexer.indexer.synthetic import SyntheticEmbedder, indexed_track, synthetic_identity
from mert_indexer.service.options import ServiceOptions
from mert_indexer.service.server import ServiceThread
from tests.conftest import BIN, ROOT, free_port, run_cli, serve_options

SR = 24_000
MAX_UPLOAD = 2_000_000
MAX_CLIP = 20.0
# The excerpts the end-to-end tests find (right track first, ranked): (track, start s).
FOUND = [(0, 7.3), (3, 2.0), (5, 11.75)]

# -- helpers -------------------------------------------------------------------------


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON or text) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as r:
            status, got, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, got, raw = e.code, dict(e.headers), e.read()
    text = raw.decode()
    is_json = got.get("content-type", got.get("Content-Type", "")).startswith("application/json")
    return status, got, json.loads(text) if is_json else text


def multipart(data: bytes, filename: str, field: str = "file") -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def identify(base: str, clip: Path, query: str = "min_score=off", **kw: Any) -> tuple:
    body, headers = multipart(clip.read_bytes(), clip.name)
    return request("POST", f"{base}/v1/identify?{query}", body, headers, **kw)


def wait_for(predicate, timeout: float = 60.0, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(step)


def ready(base: str, **kw: Any) -> bool:
    try:
        return request("GET", f"{base}/readyz", **kw)[0] == 200
    except OSError:
        return False


def options(index: Path, grpc_url: str, **kw: Any) -> ServiceOptions:
    from mert_indexer.client.identify import QueryOptions

    return ServiceOptions(
        index=index,
        port=0,
        connect=ConnectOptions(servers=(grpc_url,)),
        watch_seconds=0.2,
        health_seconds=0.5,
        triton_retry_seconds=1.0,
        max_upload_bytes=MAX_UPLOAD,
        query=QueryOptions(max_clip_seconds=MAX_CLIP),
        **kw,
    )


def build_index(grpc_url: str, folder: Path, index: Path) -> None:
    proc = run_cli(
        "indexer-client",
        "--server",
        grpc_url,
        "--input",
        str(folder),
        "--index",
        str(index),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def excerpt(src: Path, start: float, seconds: float, dest: Path) -> Path:
    audio = decode(src, SR)
    return write(dest, audio[int(start * SR) : int((start + seconds) * SR)], SR)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service_index(triton, catalogue, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("svc-index") / "idx"
    build_index(triton.grpc_url, catalogue[0].parent, index)
    return index


@pytest.fixture(scope="module")
def svc(triton, service_index) -> Iterator[ServiceThread]:
    with ServiceThread(options(service_index, triton.grpc_url)) as service:
        wait_for(lambda: ready(service.url))
        yield service


@pytest.fixture(scope="module")
def excerpts(catalogue, tmp_path_factory) -> list[tuple[Path, float, Path]]:
    folder = tmp_path_factory.mktemp("svc-excerpts")
    return [
        (catalogue[w], at, excerpt(catalogue[w], at, 8.0, folder / f"ex{w}.wav")) for w, at in FOUND
    ]


# -- the API ---------------------------------------------------------------------------


def test_identify_finds_track_and_offset_from_multipart_and_raw_body(svc, excerpts):
    for track, start, clip in excerpts:
        status, _, got = identify(svc.url, clip)
        assert status == 200, got
        best = got["matches"][0]
        assert best["track"] == str(track)
        assert abs(best["offset_seconds"] - start) <= 5.0  # one index window (tiny model)
        assert set(best) >= {
            "track",
            "track_id",
            "offset_seconds",
            "score",
            "clip_start_seconds",
            "clip_end_seconds",
        }
        assert isinstance(best["track_id"], int) and 0 <= best["score"] <= 1
        assert 0 <= best["clip_start_seconds"] < best["clip_end_seconds"] <= 8.0 + 1e-6
        assert got["duration_seconds"] == pytest.approx(8.0, abs=0.01)
        assert set(got["timings_ms"]) == {"decode", "embed", "search"}
        raw = request(
            "POST",
            f"{svc.url}/v1/identify?min_score=off&filename={clip.name}",
            clip.read_bytes(),
            {"Content-Type": "application/octet-stream"},
        )
        assert raw[0] == 200
        assert [m["track"] for m in raw[2]["matches"]] == [m["track"] for m in got["matches"]]
        # Without a file name, the Content-Type names the format.
        typed = request("POST", f"{svc.url}/v1/identify?min_score=off", clip.read_bytes(),
                        {"Content-Type": "audio/wav"})  # fmt: skip
        assert typed[0] == 200 and typed[2]["matches"][0]["track"] == str(track)
    top = identify(svc.url, excerpts[0][2], "min_score=off&top=2")[2]
    assert len(top["matches"]) == 2
    # With the index's threshold, an answer is a list, possibly empty (no match).
    assert isinstance(identify(svc.url, excerpts[0][2], "")[2]["matches"], list)


def test_openapi_describes_the_versioned_api(svc):
    status, _, spec = request("GET", f"{svc.url}/openapi.json")
    assert status == 200
    paths = spec["paths"]
    assert {"/v1/identify", "/v1/tracks", "/v1/tracks/{track_id}", "/v1/index"} <= set(paths)
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)
    body = paths["/v1/identify"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/octet-stream" in body
    params = {p["name"] for p in paths["/v1/identify"]["post"]["parameters"]}
    assert {"top", "min_score"} <= params
    assert "413" in paths["/v1/identify"]["post"]["responses"]
    assert request("GET", f"{svc.url}/docs")[0] == 404  # Swagger UI would load a CDN


def test_tracks_paginate_with_windows_and_durations(svc, catalogue):
    status, _, first = request("GET", f"{svc.url}/v1/tracks?limit=4")
    assert status == 200 and first["total"] == len(catalogue) and len(first["tracks"]) == 4
    rest = request("GET", f"{svc.url}/v1/tracks?offset=4&limit=4")[2]
    tracks = first["tracks"] + rest["tracks"]
    assert len(tracks) == len(catalogue)
    ids = [t["track_id"] for t in tracks]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {t["track"] for t in tracks} == {str(p) for p in catalogue}
    for t in tracks:
        assert t["windows"] >= 3
        # Decoders may disagree on a length by a few ms (DESIGN.md: up to ~0.4 s).
        assert t["duration_seconds"] == pytest.approx(sf.info(t["track"]).duration, abs=0.5)
        status, _, one = request("GET", f"{svc.url}/v1/tracks/{t['track_id']}")
        assert status == 200 and one == t
    assert request("GET", f"{svc.url}/v1/tracks?offset=100")[2]["tracks"] == []
    status, _, err = request("GET", f"{svc.url}/v1/tracks/999999")
    assert status == 404 and err["error"]["code"] == "unknown_track"
    assert "999999" in err["error"]["message"]
    for bad in ("/v1/tracks/abc", "/v1/tracks?limit=0", "/v1/tracks?offset=-1"):
        status, _, err = request("GET", svc.url + bad)
        assert status == 422 and err["error"]["code"] == "invalid_parameter", bad


def test_index_describes_model_kind_counts_generation(svc, triton):
    status, _, ix = request("GET", f"{svc.url}/v1/index")
    assert status == 200
    assert ix["kind"] == "exact" and ix["tracks"] == 6 and ix["windows"] > 6
    assert ix["generation"].isdigit() and ix["built_at"] > 1e9 and ix["bytes"] > 0
    pool = TritonPool(ConnectOptions(servers=(triton.grpc_url,)))
    try:
        assert ix["model"]["model_id"] == pool.connect().model_id
    finally:
        pool.close()
    assert ix["limits"]["max_upload_bytes"] == MAX_UPLOAD
    assert ix["limits"]["min_clip_seconds"] == 5.0
    # The index's calibrated threshold: what identify's default "no match" means.
    assert MIN_THRESHOLD <= ix["threshold"] <= 1.0
    assert ix["thresholds_by_pairs"] is None  # a few tracks: one threshold, whatever the pairs
    assert ix["calibrated_against"] is None  # no reference: the catalogue's own windows alone
    status, _, health = request("GET", f"{svc.url}/healthz")
    assert status == 200 and health == {"status": "ok"}
    status, _, readiness = request("GET", f"{svc.url}/readyz")
    assert status == 200 and readiness["ready"] is True


# -- track similarity (rankings: the tiny random model means nothing musically) -----------


def similar_to(base: str, clip: Path, query: str = "", **kw: Any) -> tuple:
    body, headers = multipart(clip.read_bytes(), clip.name)
    return request("POST", f"{base}/v1/similar?{query}", body, headers, **kw)


def assert_ranking(similar: list[dict[str, Any]], catalogue: list[Path]) -> None:
    scores = [t["score"] for t in similar]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 - 1e-6 <= x <= 1.0 + 1e-6 for x in scores)
    assert {t["track"] for t in similar} <= {str(p) for p in catalogue}
    assert all(set(t) == {"track", "track_id", "score"} for t in similar)


def test_similar_tracks_of_a_track_leave_it_out_best_first(svc, catalogue):
    tracks = request("GET", f"{svc.url}/v1/tracks")[2]["tracks"]
    for t in tracks:
        status, _, got = request("GET", f"{svc.url}/v1/tracks/{t['track_id']}/similar")
        assert status == 200, got
        assert (got["track_id"], got["track"]) == (t["track_id"], t["track"])
        assert got["generation"].isdigit()
        # No two catalogue tracks share a content hash: every other track, itself left out.
        assert sorted(s["track_id"] for s in got["similar"]) == sorted(
            o["track_id"] for o in tracks if o["track_id"] != t["track_id"]
        )
        assert_ranking(got["similar"], catalogue)
    first = tracks[0]["track_id"]
    whole = request("GET", f"{svc.url}/v1/tracks/{first}/similar")[2]["similar"]
    two = request("GET", f"{svc.url}/v1/tracks/{first}/similar?top=2")[2]["similar"]
    assert two == whole[:2]
    status, _, err = request("GET", f"{svc.url}/v1/tracks/999999/similar")
    assert status == 404 and err["error"]["code"] == "unknown_track"
    assert "999999" in err["error"]["message"]
    for bad in ("abc/similar", f"{first}/similar?top=0", f"{first}/similar?top=1000"):
        status, _, err = request("GET", f"{svc.url}/v1/tracks/{bad}")
        assert status == 422 and err["error"]["code"] == "invalid_parameter", bad


def test_similar_to_an_uploaded_clip_ranks_catalogue_tracks(svc, catalogue, excerpts, bad_clips):
    clip = excerpts[0][2]
    status, _, got = similar_to(svc.url, clip)
    assert status == 200, got
    assert got["clip"] == clip.name and got["duration_seconds"] == pytest.approx(8.0, abs=0.01)
    assert len(got["similar"]) == len(catalogue)  # a ranking of every track, no threshold
    assert_ranking(got["similar"], catalogue)
    assert set(got["timings_ms"]) == {"embed", "search"}
    raw = request("POST", f"{svc.url}/v1/similar?top=2&filename={clip.name}", clip.read_bytes(),
                  {"Content-Type": "application/octet-stream"})  # fmt: skip
    assert raw[0] == 200
    assert [t["track_id"] for t in raw[2]["similar"]] == [t["track_id"] for t in got["similar"][:2]]
    for case, code in (("short", "clip_too_short"), ("long", "clip_too_long"),
                       ("not_audio", "not_decodable")):  # fmt: skip
        status, _, err = similar_to(svc.url, bad_clips[case])
        assert status == 422 and err["error"]["code"] == code, err
    status, _, err = request("POST", f"{svc.url}/v1/similar", b"", {})
    assert status == 400 and err["error"]["code"] == "empty_body"
    status, err = _post_unfinished(svc.url, {"Content-Length": str(MAX_UPLOAD + 1)}, [],
                                   path="/v1/similar")  # fmt: skip
    assert status == 413 and err["error"]["code"] == "upload_too_large"


def test_openapi_describes_the_similarity_routes(svc):
    spec = request("GET", f"{svc.url}/openapi.json")[2]
    track = spec["paths"]["/v1/tracks/{track_id}/similar"]["get"]
    clip = spec["paths"]["/v1/similar"]["post"]
    for op, model in ((track, "SimilarToTrack"), (clip, "SimilarToClip")):
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{model}"}
        assert {"404", "409", "422", "503"} <= set(op["responses"])
        assert "top" in {p["name"] for p in op["parameters"]}
    assert "multipart/form-data" in clip["requestBody"]["content"]
    item = spec["components"]["schemas"]["SimilarOut"]["properties"]
    assert set(item) == {"track", "track_id", "score"}


def test_similarity_needs_the_token_when_one_is_set(triton, service_index, excerpts):
    with ServiceThread(options(service_index, triton.grpc_url, token="s3cret")) as svc_:
        wait_for(lambda: ready(svc_.url))
        good = {"Authorization": "Bearer s3cret"}
        tid = request("GET", f"{svc_.url}/v1/tracks", headers=good)[2]["tracks"][0]["track_id"]
        body, form = multipart(excerpts[0][2].read_bytes(), "clip.wav")
        for headers, want in (({}, 401), ({"Authorization": "Bearer wrong"}, 401), (good, 200)):
            status, _, got = request("GET", f"{svc_.url}/v1/tracks/{tid}/similar", headers=headers)
            assert status == want, got
            status, _, got = request("POST", f"{svc_.url}/v1/similar", body, {**form, **headers})
            assert status == want, got
            if want == 401:
                assert got["error"]["code"] == "unauthorized"


def test_generation_without_a_track_index_says_to_rebuild(triton, service_index, excerpts,
                                                          tmp_path):  # fmt: skip
    index = tmp_path / "idx"
    shutil.copytree(service_index, index)
    gen = index / INDEX_DIR / str(read_current(index / INDEX_DIR))
    info = json.loads((gen / "info.json").read_text())
    del info["track_index"]  # as a generation built before track similarity
    (gen / "info.json").write_text(json.dumps(info))
    with ServiceThread(options(index, triton.grpc_url)) as svc_:
        wait_for(lambda: ready(svc_.url))
        tid = request("GET", f"{svc_.url}/v1/tracks")[2]["tracks"][0]["track_id"]
        status, _, err = request("GET", f"{svc_.url}/v1/tracks/{tid}/similar")
        assert status == 409 and err["error"]["code"] == "no_track_index", err
        assert "rebuild" in err["error"]["message"]
        status, _, err = similar_to(svc_.url, excerpts[0][2])
        assert status == 409 and err["error"]["code"] == "no_track_index", err
        assert identify(svc_.url, excerpts[0][2])[0] == 200  # identification is unaffected


@pytest.fixture(scope="module")
def bad_clips(catalogue, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    audio = decode(catalogue[0], SR)
    clips = {
        "short": write(folder / "short.wav", audio[: 3 * SR], SR),
        "long": write(folder / "long.flac", np.tile(audio, 2)[: int((MAX_CLIP + 5) * SR)], SR),
    }
    # Cut short: its header promises 15 s. (libsndfile trusts a WAV's file size instead.)
    whole = write(folder / "whole.flac", audio[: 15 * SR], SR).read_bytes()
    (folder / "truncated.flac").write_bytes(whole[: int(len(whole) * 0.6)])
    clips["truncated"] = folder / "truncated.flac"
    (folder / "noise.mp3").write_bytes(np.random.default_rng(0).bytes(50_000))
    clips["not_audio"] = folder / "noise.mp3"
    return clips


@pytest.mark.parametrize(
    "case, status, code, words",
    [
        ("short", 422, "clip_too_short", "window"),
        ("long", 422, "clip_too_long", f"longer than {MAX_CLIP:g} s"),
        ("truncated", 422, "not_decodable", "truncated.flac"),
        ("not_audio", 422, "not_decodable", "noise.mp3"),
    ],
)
def test_bad_clip_is_a_4xx_naming_the_problem(svc, bad_clips, case, status, code, words):
    got = identify(svc.url, bad_clips[case])
    assert got[0] == status, got
    assert got[2]["error"]["code"] == code
    assert words in got[2]["error"]["message"]
    assert request("GET", f"{svc.url}/healthz")[0] == 200


@pytest.mark.parametrize(
    "query, body, headers, status, code, words",
    [
        ("", b"", {}, 400, "empty_body", "no audio"),
        ("", *multipart(b"", "empty.wav"), 400, "empty_body", "no audio"),
        ("", *multipart(b"RIFF", "x.wav", field="clip"), 400, "missing_file", "'file'"),
        ("", b"--x\r\nnonsense", {"Content-Type": "multipart/form-data"}, 400,
         "malformed_multipart", "boundary"),
        ("top=0", b"x", {}, 422, "invalid_parameter", "top"),
        ("top=abc", b"x", {}, 422, "invalid_parameter", "top"),
        ("top=1000", b"x", {}, 422, "invalid_parameter", "top"),
        ("min_score=2", b"x", {}, 422, "invalid_parameter", "min_score"),
        ("min_score=high", b"x", {}, 422, "invalid_parameter", "min_score"),
    ],
)  # fmt: skip
def test_bad_request_is_a_4xx_naming_the_problem(svc, query, body, headers, status, code, words):
    got = request("POST", f"{svc.url}/v1/identify?{query}", body, headers)
    assert got[0] == status, got
    assert got[2]["error"]["code"] == code, got
    assert words in got[2]["error"]["message"]


def _post_unfinished(
    base: str, headers: dict[str, str], chunks: list[bytes], path: str = "/v1/identify"
) -> tuple[int, Any]:
    """Send headers and ``chunks`` of a body that is never finished; read the answer."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", path)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    for chunk in chunks:
        conn.send(chunk)
    response = conn.getresponse()  # a server waiting for the rest would time out here
    answer = response.status, json.loads(response.read())
    conn.close()
    return answer


def _chunked(body: bytes, size: int = 65536) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(c), c) for c in (body[i : i + size] for i in
            range(0, len(body), size))]  # fmt: skip


def test_upload_cap_is_checked_while_streaming(svc):
    # Declared too large: refused before any of the body is sent.
    for headers in ({}, multipart(b"", "a.wav")[1]):
        status, err = _post_unfinished(
            svc.url, {**headers, "Content-Length": str(MAX_UPLOAD + 1)}, []
        )
        assert status == 413 and err["error"]["code"] == "upload_too_large"
        assert f"{MAX_UPLOAD:,} bytes" in err["error"]["message"]
    # Chunked, no length: refused at the chunk that passes the cap, the rest never sent.
    raw = b"x" * (MAX_UPLOAD + 1000)
    form, headers = multipart(raw, "big.wav")
    for body, head in ((raw, {}), (form[: MAX_UPLOAD + 1000], headers)):
        status, err = _post_unfinished(
            svc.url, {**head, "Transfer-Encoding": "chunked"}, _chunked(body)
        )
        assert status == 413 and err["error"]["code"] == "upload_too_large"
    assert request("GET", f"{svc.url}/healthz")[0] == 200


def test_concurrent_clients_get_the_answers_they_get_alone(svc, excerpts):
    clips = [clip for _, _, clip in excerpts]
    alone = [identify(svc.url, c)[2] for c in clips]
    jobs = [clips[i % len(clips)] for i in range(16)]
    start = threading.Barrier(8)

    def one(clip: Path) -> Any:
        if threading.current_thread().name not in started:
            started.add(threading.current_thread().name)
            start.wait(timeout=60)
        return identify(svc.url, clip)

    started: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, jobs))
    for i, (status, _, got) in enumerate(answers):
        want = alone[i % len(clips)]
        assert status == 200, got
        assert [m["track"] for m in got["matches"]] == [m["track"] for m in want["matches"]]
        for g, w in zip(got["matches"], want["matches"], strict=True):
            # Triton may batch windows of several clips together: float rounding, no more.
            assert g["offset_seconds"] == pytest.approx(w["offset_seconds"], abs=1e-3)
            assert g["score"] == pytest.approx(w["score"], abs=2e-4)


def test_metrics_count_requests_stages_clip_seconds_and_index(svc, excerpts):
    before = request("GET", f"{svc.url}/metrics")[2]
    identify(svc.url, excerpts[0][2])
    request("GET", f"{svc.url}/v1/tracks/999999")
    status, headers, text = request("GET", f"{svc.url}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    ok = 'mert_search_requests_total{endpoint="/v1/identify",status="200"}'
    assert metric(text, "mert_search_requests_total", endpoint="/v1/identify", status="200") == (
        metric(before, "mert_search_requests_total", endpoint="/v1/identify", status="200") + 1
    ), ok
    assert metric(text, "mert_search_requests_total", endpoint="/v1/tracks/{track_id}",
                  status="404") >= 1  # fmt: skip
    for stage in ("decode", "embed", "search"):
        assert metric(text, "mert_search_stage_seconds_count", stage=stage) >= 1
    assert metric(text, "mert_search_clip_seconds_total") >= 8.0
    assert metric(text, "mert_search_index_generation") >= 1
    assert metric(text, "mert_search_index_windows") > 6
    assert metric(text, "mert_search_index_tracks") == 6
    assert metric(text, "mert_search_index_bytes") > 0
    assert metric(text, "mert_search_ready") == 1
    assert 'mert_search_request_seconds_bucket{endpoint="/v1/identify",le="0.1"}' in text


def test_triton_priorities_configured_and_sent(triton, catalogue):
    from mert_indexer.contract import load_config

    committed = load_config(ROOT / "model_repository" / "mert" / "config.pbtxt")
    assert committed.dynamic_batching.priority_levels == 2
    assert committed.dynamic_batching.default_priority_level == 2  # indexing: the lower one
    pool = TritonPool(ConnectOptions(servers=(triton.grpc_url,)))
    try:
        contract = pool.connect()
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(triton.grpc_url)
        live = client.get_model_config(contract.model_name, as_json=True)["config"]
        client.close()
        assert int(live["dynamic_batching"]["priority_levels"]) == 2  # the exporter's template
        assert int(live["dynamic_batching"]["default_priority_level"]) == 2
        from mert_indexer.client.windows import to_wire

        audio = decode(catalogue[0], SR)[: contract.window_samples * 2]
        batch = to_wire(audio, contract.input_dtype).reshape(2, -1)
        high, default = pool.infer(batch, priority=1), pool.infer(batch)
        np.testing.assert_allclose(high, default, rtol=1e-5, atol=1e-6)
    finally:
        pool.close()
    assert ServiceOptions().query_priority == 1


# -- hot swap ----------------------------------------------------------------------------


def test_new_generation_swapped_in_while_queries_run_and_indexing_adds_tracks(
    triton, catalogue, service_index, excerpts, tmp_path
):
    folder = tmp_path / "originals"
    shutil.copytree(catalogue[0].parent, folder)
    index = tmp_path / "idx"
    shutil.copytree(service_index, index)
    added = write_catalogue(
        tmp_path / "new", 2, seconds=(12, 14), suffixes=(".wav", ".flac"), seed=99
    )
    with ServiceThread(options(index, triton.grpc_url)) as svc_:
        wait_for(lambda: ready(svc_.url))
        first = request("GET", f"{svc_.url}/v1/index")[2]["generation"]
        service = svc_.service
        # A long query: holds the live generation across the swap.
        with service.generations.use() as held:
            assert held is not None and held.name == first
            stop = threading.Event()
            answers: list[tuple[int, Any]] = []

            def hammer() -> None:
                i = 0
                while not stop.is_set():
                    status, _, got = identify(svc_.url, excerpts[i % len(excerpts)][2])
                    answers.append((status, got))
                    i += 1

            threads = [threading.Thread(target=hammer) for _ in range(3)]
            for t in threads:
                t.start()
            try:
                wait_for(lambda: len(answers) >= 3)
                for p in added:
                    shutil.copy(p, folder / f"added_{p.name}")
                build_index(triton.grpc_url, folder, index)
                wait_for(lambda: request("GET", f"{svc_.url}/v1/index")[2]["generation"] != first)
                n = len(answers)
                wait_for(lambda: len(answers) >= n + 3)
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=60)
            # The held generation still answers, its files deleted by the build.
            assert not (index / "index" / first).exists()
            assert service.generations.held == 2
            cs = np.arange(0, 4.0, 0.5)
            emb = np.random.default_rng(0).standard_normal((len(cs), held.info["dim"]))
            rank = dataclasses.replace(held.searcher.options, min_score=None)
            assert held.searcher.search(emb.astype(np.float32), cs, top=1, options=rank)
        assert service.generations.held == 1  # released when its last user finished
        assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200]
        generations = {got["generation"] for _, got in answers}
        assert first in generations and len(generations) == 2
        ix = request("GET", f"{svc_.url}/v1/index")[2]
        assert ix["tracks"] == len(catalogue) + 2
        listed = request("GET", f"{svc_.url}/v1/tracks")[2]["tracks"]
        assert {f"added_{p.name}" for p in added} <= {Path(t["track"]).name for t in listed}
        clip = excerpt(added[1], 4.0, 7.0, tmp_path / "added.wav")
        best = identify(svc_.url, clip)[2]["matches"][0]
        assert best["track"] == str(folder / f"added_{added[1].name}")
        text = request("GET", f"{svc_.url}/metrics")[2]
        assert metric(text, "mert_search_index_swaps_total") == 2  # the first load, the swap
        assert metric(text, "mert_search_generations_held") == 1


# -- Triton down, another model ----------------------------------------------------------


def test_triton_down_is_503_with_retry_after_and_recovers(tiny_repo, service_index, excerpts):
    from mert_indexer.server.launcher import LocalTriton

    opts = serve_options(tiny_repo)
    clip = excerpts[0][2]
    server = LocalTriton(opts)
    server.start()
    try:
        with ServiceThread(options(service_index, server.grpc_url)) as svc_:
            wait_for(lambda: ready(svc_.url))
            assert identify(svc_.url, clip)[0] == 200
            server.stop()
            status, headers, err = identify(svc_.url, clip)
            assert status == 503 and err["error"]["code"] == "triton_unavailable", err
            assert int(headers["retry-after"]) > 0
            wait_for(lambda: request("GET", f"{svc_.url}/readyz")[0] == 503, timeout=20)
            status, headers, why = request("GET", f"{svc_.url}/readyz")
            assert why["ready"] is False and "Triton" in why["reason"]
            assert "retry-after" in headers
            assert request("GET", f"{svc_.url}/healthz")[0] == 200  # up, not ready
            server = LocalTriton(opts)  # the same ports
            server.start()
            wait_for(lambda: ready(svc_.url), timeout=30)
            status, _, got = identify(svc_.url, clip)
            assert status == 200 and got["matches"][0]["track"] == str(excerpts[0][0])
    finally:
        server.stop()


def test_index_of_another_model_is_not_ready_with_the_reason(triton, tmp_path):
    emb = SyntheticEmbedder(dim=32, seed=3)
    with IndexStore.open(tmp_path / "syn", synthetic_identity(32, SR), create=True) as store:
        for t in range(4):
            n, starts, x = indexed_track(emb, t, 30.0, SR)
            store.add_track(PendingFile(f"t{t}.wav", f"h{t}", 1, 1), n_samples=n,
                            sample_rate=SR, starts=starts, embeddings=x)  # fmt: skip
        store.commit()
        store.build_index(kind="exact")
    with Searcher(tmp_path / "syn") as searcher:
        assert searcher.identity["model_id"] == "synthetic"
    with ServiceThread(options(tmp_path / "syn", triton.grpc_url)) as svc_:
        wait_for(lambda: "mismatch" in str(request("GET", f"{svc_.url}/readyz")[2]))
        status, _, why = request("GET", f"{svc_.url}/readyz")
        assert status == 503 and why["ready"] is False
        assert "synthetic" in why["reason"] and "mert-tiny" in why["reason"]
        clip = write(tmp_path / "c.wav", np.zeros(6 * SR, np.float32), SR)
        status, headers, err = identify(svc_.url, clip)
        assert status == 503 and err["error"]["code"] == "model_mismatch"
        assert "retry-after" in headers


def test_no_index_yet_is_not_ready_then_served_when_built(triton, catalogue, tmp_path):
    index = tmp_path / "later"
    with ServiceThread(options(index, triton.grpc_url)) as svc_:
        wait_for(lambda: "no index" in str(request("GET", f"{svc_.url}/readyz")[2]))
        status, _, err = request("GET", f"{svc_.url}/v1/index")
        assert status == 503 and err["error"]["code"] == "index_unavailable"
        build_index(triton.grpc_url, catalogue[0].parent, index)
        wait_for(lambda: ready(svc_.url))


# -- security and the CLI ----------------------------------------------------------------


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    from tests.test_reliability import _certificates as make

    return make(folder)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_cli_serves_https_with_a_bearer_token(triton, service_index, excerpts, tmp_path):
    ca, cert, key = _certificates(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "indexer-search-serve"), "--index", str(service_index),
         "--server", triton.grpc_url, "--listen", f"127.0.0.1:{port}",
         "--ssl-cert", str(cert), "--ssl-key", str(key), "--token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"https://localhost:{port}"
    tls = ssl.create_default_context(cafile=str(ca))
    try:
        wait_for(lambda: proc.poll() is not None or ready(base, context=tls), timeout=60)
        assert proc.poll() is None
        status, headers, err = request("GET", f"{base}/v1/index", context=tls)
        assert status == 401 and err["error"]["code"] == "unauthorized"
        assert headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer s3cret-tokeN"}
        assert request("GET", f"{base}/v1/index", headers=wrong, context=tls)[0] == 401
        good = {"Authorization": "Bearer s3cret-token"}
        assert request("GET", f"{base}/v1/index", headers=good, context=tls)[0] == 200
        body, headers = multipart(excerpts[0][2].read_bytes(), "clip.wav")
        status, _, got = request("POST", f"{base}/v1/identify?min_score=off", body,
                                 {**headers, **good}, context=tls)  # fmt: skip
        assert status == 200 and got["matches"][0]["track"] == str(excerpts[0][0])
        assert request("POST", f"{base}/v1/identify", body, headers, context=tls)[0] == 401
        assert request("GET", f"{base}/", context=tls)[0] == 200  # the page asks for it
        with pytest.raises(OSError):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    # Drained, then gone: uvicorn re-raises the signal after its graceful shutdown.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "released index generation" in out


def test_cli_defaults_and_refusals():
    from mert_indexer.service.cli import build_parser, options_from

    parser = build_parser()
    opts = options_from(parser.parse_args([]), parser)
    assert (opts.host, opts.port) == ("127.0.0.1", 8080)  # loopback unless told otherwise
    assert opts.token is None and opts.ssl_cert is None
    assert opts.connect.deadline_seconds == ServiceOptions().triton_retry_seconds
    assert opts.max_upload_bytes == ServiceOptions().max_upload_bytes
    got = options_from(parser.parse_args(["--listen", "[::1]:9000", "--server", "a:1"]), parser)
    assert (got.host, got.port, got.connect.servers) == ("::1", 9000, ("a:1",))
    for bad in (["--ssl-cert", "c.pem"], ["--listen", "nowhere"], ["--workers", "0"],
                ["--max-upload-mb", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            options_from(parser.parse_args(bad), parser)
    proc = run_cli("indexer-search-serve", "--help")
    assert proc.returncode == 0 and "--token-file" in proc.stdout and "--listen" in proc.stdout


def test_no_route_reads_a_path_from_the_request():
    """Uploads reach the decoder as bytes; the only name taken from a request is a bare one."""
    from mert_indexer.service.upload import clean_name

    assert clean_name("../../etc/passwd") == "passwd"
    assert clean_name("C:\\music\\a b.mp3") == "a b.mp3"
    assert clean_name("", "audio/flac") == "upload.flac"
    assert clean_name("..", "") == "upload"
    source = "\n".join(p.read_text() for p in (ROOT / "service").glob("*.py"))
    assert "open(" not in source and "read_bytes" not in source and "FileResponse" not in source
