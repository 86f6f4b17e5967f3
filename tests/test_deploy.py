"""Scale-out: manifests validate, shards partition the catalogue, and shards merge to one index."""

from __future__ import annotations

import json

import pytest
import yaml

from mert_indexer.client.discover import Shard, find_audio
from tests.conftest import ROOT, run_cli, serve_options, window_set

K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33.0"


@pytest.mark.parametrize("manifest", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schema(manifest):
    from kubernetes_validate import utils

    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert docs
    for doc in docs:
        utils.validate(doc, K8S_VERSION, strict=True)


def _k8s(kind: str, name: str) -> dict:
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind}/{name}")


def test_triton_deployment_probes_gpu_and_scrape():
    dep = _k8s("Deployment", "triton")
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert any(a.startswith("--model-repository=") for a in c["args"])
    hpa = _k8s("HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "triton"
    rules = _k8s("ConfigMap", "prometheus-adapter-triton-rules")["data"]["config.yaml"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in rules and "nv_inference_queue_duration_us" in rules


def test_indexing_job_is_indexed_and_consistent():
    job = _k8s("Job", "mert-index")["spec"]
    assert job["completionMode"] == "Indexed"
    c = job["template"]["spec"]["containers"][0]
    shards = next(e["value"] for e in c["env"] if e["name"] == "SHARDS")
    assert int(shards) == job["completions"] == job["parallelism"]
    cmd = " ".join(c["args"])
    assert "--shard ${JOB_COMPLETION_INDEX}/${SHARDS}" in cmd
    assert "/work/shards/shard-${JOB_COMPLETION_INDEX}" in cmd
    merge = _k8s("Job", "mert-merge")["spec"]["template"]["spec"]["containers"][0]
    assert "indexer-merge /work/index /work/shards/shard-*" in " ".join(merge["args"])


def test_compose_file_has_what_it_needs():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    triton, client = compose["services"]["triton"], compose["services"]["indexer"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    gpu = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert any(v.endswith(":/models:ro") for v in triton["volumes"])
    assert client["depends_on"]["triton"]["condition"] == "service_healthy"
    assert client["command"][0] == "indexer-client"
    assert (ROOT / "deploy" / client["build"]["dockerfile"].split("/")[-1]).exists()


def test_search_deployment_reads_the_index_read_only_and_probes_readiness():
    dep = _k8s("Deployment", "mert-search")
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["args"][0] == "indexer-search-serve"
    assert "--server=triton:8001" in c["args"] and "--index=/work/index" in c["args"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = c["ports"][0]["containerPort"]
    assert f"--listen=0.0.0.0:{port}" in c["args"]
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/port"] == str(port)
    assert notes["prometheus.io/path"] == "/metrics"
    (mount,) = c["volumeMounts"]
    assert mount["readOnly"] is True and mount["mountPath"] == "/work"
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": "mert-work", "readOnly": True}
    merge = _k8s("Job", "mert-merge")["spec"]["template"]["spec"]["containers"][0]
    assert "indexer-merge /work/index" in " ".join(merge["args"])  # what the search reads
    (token,) = [e for e in c["env"] if e["name"] == "MERT_SEARCH_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True
    svc = _k8s("Service", "mert-search")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert (ROOT / "deploy" / "Dockerfile.search").exists()


def test_compose_search_service_reads_the_index_and_waits_for_triton():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    search, indexer = compose["services"]["search"], compose["services"]["indexer"]
    assert search["command"][0] == "indexer-search-serve"
    assert "--server=triton:8001" in search["command"]
    index = next(a for a in indexer["command"] if a.startswith("--index="))
    assert index in search["command"]  # the index the indexer writes
    assert "../data:/data:ro" in search["volumes"]
    assert search["depends_on"]["triton"]["condition"] == "service_healthy"
    assert search["ports"] == ["127.0.0.1:8080:8080"]  # published on loopback only
    assert "/readyz" in " ".join(search["healthcheck"]["test"])
    assert (ROOT / "deploy" / search["build"]["dockerfile"].split("/")[-1]).exists()


def _names(n: int) -> list[str]:
    return [f"artist_{i % 17}/album_{i % 5}/track_{i:05d}.mp3" for i in range(n)]


def test_shards_partition_and_stay_stable():
    names = _names(2000)
    shards = [Shard(i, 4) for i in range(4)]
    parts = [{k for k in names if s.owns(k)} for s in shards]
    assert set().union(*parts) == set(names)
    assert sum(len(p) for p in parts) == len(names)  # disjoint
    assert all(350 < len(p) < 650 for p in parts)  # roughly balanced
    more = names + [f"new/track_{i}.flac" for i in range(500)]
    for s, before in zip(shards, parts, strict=True):
        after = {k for k in more if s.owns(k)}
        assert before <= after  # adding files never moves an old one


def test_shard_argument_is_checked():
    from mert_indexer.errors import ConfigError

    assert Shard.parse("2/5") == Shard(2, 5)
    for bad in ("5/5", "-1/3", "a/b", "3"):
        with pytest.raises(ConfigError):
            Shard.parse(bad)


def test_find_audio_shards_relative_to_input(tmp_path):
    for i in range(30):
        (tmp_path / f"d{i % 3}").mkdir(exist_ok=True)
        (tmp_path / f"d{i % 3}" / f"t{i}.wav").write_bytes(b"")
    everything = {c.path for c in find_audio([tmp_path])}
    split = [{c.path for c in find_audio([tmp_path], Shard(i, 3))} for i in range(3)]
    assert set().union(*split) == everything and sum(map(len, split)) == 30


def test_two_servers_two_shards_merge_equals_one_run(tiny_repo, catalogue, tmp_path):
    """The README's scaling section, locally: 2 Triton servers, 2 shards, a merge."""
    from mert_indexer.server.launcher import LocalTriton

    folder = str(catalogue[0].parent)
    with LocalTriton(serve_options(tiny_repo)) as a, LocalTriton(serve_options(tiny_repo)) as b:
        for i, server in enumerate((a, b)):
            proc = run_cli(
                "indexer-client",
                "--server",
                server.grpc_url,
                "--input",
                folder,
                "--index",
                str(tmp_path / f"shard-{i}"),
                "--shard",
                f"{i}/2",
                "--no-build",
                "--no-progress",
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = run_cli(
            "indexer-merge",
            str(tmp_path / "merged"),
            str(tmp_path / "shard-0"),
            str(tmp_path / "shard-1"),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = run_cli(
            "indexer-client",
            "--server",
            a.grpc_url,
            "--server",
            b.grpc_url,
            "--input",
            folder,
            "--index",
            str(tmp_path / "single"),
            "--no-progress",
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

        merged, single = window_set(tmp_path / "merged"), window_set(tmp_path / "single")
        assert merged == single and len(single) > len(catalogue)

        clip = tmp_path / "clip.wav"
        from mert_indexer.client.decode import decode
        from mert_indexer.client.synth import write

        audio = decode(catalogue[2], 24_000)
        write(clip, audio[5 * 24_000 : 12 * 24_000], 24_000)
        answers = []
        for index in ("merged", "single"):
            proc = run_cli(
                "indexer-query",
                "--server",
                a.grpc_url,
                "--index",
                str(tmp_path / index),
                "--json",
                "--min-score",
                "off",
                str(clip),
            )
            assert proc.returncode == 0, proc.stderr
            answers.append(json.loads(proc.stdout)[0][0])
        assert answers[0]["track"] == answers[1]["track"] == str(catalogue[2])
        assert answers[0]["offset_seconds"] == pytest.approx(answers[1]["offset_seconds"], abs=1e-3)
