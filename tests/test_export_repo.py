"""config.pbtxt ownership.

The export rewrites its block only, keeps the user's edits, refuses clashes.

Pure text and protobuf: no torch, no model; the end-to-end re-export is in test_export.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export import repo
from mert_indexer.contract import (
    CONTRACT_PARAMS,
    CONTRACT_VERSION,
    P_CONTRACT_VERSION,
    P_EMBEDDING_DIM,
    P_LAYERS,
    P_MODEL_ID,
    P_POOLING,
    P_PRECISION,
    P_SAMPLE_RATE,
    P_WEIGHTS_SHA256,
    P_WINDOW_SAMPLES,
    ModelContract,
    load_config,
)
from mert_indexer.errors import ConfigError


def spec(layers: str = "0,1,2", precision: str = "fp32", trt: bool = False) -> repo.BlockSpec:
    return repo.BlockSpec(
        input_dtype="int16",
        window_samples=120_000,
        embedding_dim=32,
        params={
            P_CONTRACT_VERSION: CONTRACT_VERSION,
            P_MODEL_ID: "random-init/mert-tiny/seed-0",
            P_WEIGHTS_SHA256: "ab" * 32,
            P_LAYERS: layers,
            P_POOLING: "mean_time_mean_layers",
            P_WINDOW_SAMPLES: "120000",
            P_SAMPLE_RATE: "24000",
            P_EMBEDDING_DIM: "32",
            P_PRECISION: precision,
        },
        tensorrt_int8=trt,
        notes=("validated: test",),
    )


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_fresh_config_is_the_gpu_template_and_carries_the_contract(tmp_path: Path) -> None:
    path = tmp_path / "mert" / "config.pbtxt"
    write(path, repo.compose_config(path, "mert", spec()))
    config = load_config(path)
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    group = config.instance_group[0]
    assert (group.count, list(group.gpus)) == (1, [0])
    assert not config.HasField("optimization")  # the TensorRT FP16 block is commented out
    assert '#         parameters { key: "precision_mode" value: "FP16" }' in path.read_text()
    assert config.model_warmup[0].inputs["AUDIO"].dims == [120_000]
    contract = ModelContract.from_config(config)
    assert contract.input_dtype == "int16" and contract.embedding_dim == 32
    assert set(CONTRACT_PARAMS) <= set(config.parameters)


def test_reexport_rewrites_only_the_block(tmp_path: Path) -> None:
    path = tmp_path / "mert" / "config.pbtxt"
    write(path, repo.compose_config(path, "mert", spec()))
    edited = (
        path.read_text()
        .replace("max_batch_size: 64", "max_batch_size: 16  # my GPU is small")
        .replace("kind: KIND_GPU\n    gpus: [ 0 ]", "kind: KIND_CPU")
        .replace("count: 1", "count: 3")
    )
    edited = (
        "# my own header comment\n"
        + edited
        + 'parameters { key: "mine" value: { string_value: "kept" } }\n'
    )
    write(path, edited)
    user_before, user_after = repo.split_config(edited, path)

    new_text = repo.compose_config(path, "mert", spec(layers="1", precision="fp16"))
    write(path, new_text)
    assert repo.split_config(new_text, path) == (user_before, user_after)
    config = load_config(path)
    assert config.max_batch_size == 16
    assert config.instance_group[0].count == 3
    assert config.parameters["mine"].string_value == "kept"
    assert config.parameters[P_LAYERS].string_value == "1"
    assert config.parameters[P_PRECISION].string_value == "fp16"
    assert ModelContract.from_config(config).layers == (1,)


def test_int8_block_selects_tensorrt_unless_the_user_has_an_optimization_block(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mert" / "config.pbtxt"
    write(path, repo.compose_config(path, "mert", spec(precision="int8", trt=True)))
    accel = load_config(path).optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "INT8"

    # The user turns on their own optimization block (outside ours): no duplicate field.
    text = path.read_text()
    before, after = repo.split_config(text, path)
    before += "optimization { graph { level: 1 } }\n"
    write(path, before + repo.render_block(spec(), with_optimization=False) + after)
    composed = repo.compose_config(path, "mert", spec(precision="int8", trt=True))
    write(path, composed)
    config = load_config(path)
    assert config.optimization.graph.level == 1
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t.replace(repo.BEGIN_MARKER, "# begin"),
        lambda t: t.replace(repo.END_MARKER, ""),
        lambda t: t + repo.BEGIN_MARKER + "\n" + repo.END_MARKER + "\n",
    ],
    ids=["no-begin", "no-end", "two-blocks"],
)
def test_missing_or_doubled_markers_are_refused(tmp_path: Path, damage) -> None:
    path = tmp_path / "mert" / "config.pbtxt"
    write(path, damage(repo.compose_config(path, "mert", spec())))
    with pytest.raises(ConfigError, match=r"markers|block"):
        repo.compose_config(path, "mert", spec())


def test_contract_keys_outside_the_block_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mert" / "config.pbtxt"
    write(path, repo.compose_config(path, "mert", spec()))
    write(
        path,
        path.read_text() + f'parameters {{ key: "{P_LAYERS}" value: {{ string_value: "6" }} }}\n',
    )
    with pytest.raises(ConfigError, match=P_LAYERS):
        repo.compose_config(path, "mert", spec())


def test_user_part_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mert" / "config.pbtxt"
    write(
        path,
        repo.compose_config(path, "mert", spec()).replace(
            "max_batch_size: 64", "max_batch_size: lots"
        ),
    )
    with pytest.raises(ConfigError, match="does not parse"):
        repo.compose_config(path, "mert", spec())


def test_install_swaps_the_version_folder_and_writes_a_readable_config(tmp_path: Path) -> None:
    model_dir = tmp_path / "repo" / "mert"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx.data").write_text("stale external data of an older export")
    staged = tmp_path / "work" / "model.onnx"
    staged.parent.mkdir()
    staged.write_bytes(b"new model")
    text = repo.compose_config(model_dir / "config.pbtxt", "mert", spec())
    repo.install([staged], model_dir, text)
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"new model"
    assert (model_dir / "config.pbtxt").stat().st_mode & 0o044 == 0o044
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
