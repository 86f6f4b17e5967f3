"""The one config.pbtxt: the committed GPU config, the documented edits, and the derived local twin.

Everything is parsed with Triton's own ``ModelConfig`` protobuf (the one the
server uses), so a config that passes here is one Triton accepts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mert_indexer.contract import (
    CONTRACT_PARAMS,
    CONTRACT_VERSION,
    P_CONTRACT_VERSION,
    P_EMBEDDING_DIM,
    P_WINDOW_SAMPLES,
    ModelContract,
    dump_config,
    load_config,
)
from mert_indexer.errors import ConfigError, ModelContractError
from mert_indexer.server import local_repo

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "model_repository" / "mert" / "config.pbtxt"
SERVING_DOC = ROOT / "docs" / "serving.md"
README = ROOT / "README.md"


def mc():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def parse(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, mc().ModelConfig())


def doc_blocks(path: Path) -> dict[str, str]:
    """``<!-- serving:NAME -->`` followed by a fenced block, by NAME."""
    text = path.read_text()
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"<!-- serving:([\w-]+) -->\s*```\w*\n(.*?)```", text, re.DOTALL)
    }


def fenced_instance_groups(path: Path) -> list[str]:
    """Every fenced block of ``path`` that sets ``instance_group``, in order."""
    blocks = re.findall(r"```\w*\n(.*?)```", path.read_text(), re.DOTALL)
    return [b for b in blocks if "instance_group" in b and "--" not in b]


CONTRACT_TEXT = "\n".join(
    [
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}'
        for k, v in {
            P_CONTRACT_VERSION: CONTRACT_VERSION,
            "indexer.model_id": "test/model",
            "indexer.weights_sha256": "ab" * 32,
            "indexer.layers": "0,1,2",
            "indexer.pooling": "mean_time_mean_layers",
            P_WINDOW_SAMPLES: "120000",
            "indexer.sample_rate": "24000",
            P_EMBEDDING_DIM: "32",
            "indexer.precision": "fp32",
        }.items()
    ]
)
assert CONTRACT_TEXT.count("parameters") == len(CONTRACT_PARAMS)

EXPORTER_BLOCK = f"""
input [ {{ name: "AUDIO" data_type: TYPE_INT16 dims: [ 120000 ] }} ]
output [ {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: [ 32 ] }} ]
model_warmup [ {{ name: "zeros" batch_size: 4 count: 2
  inputs {{ key: "AUDIO" value {{ data_type: TYPE_INT16 dims: [ 120000 ] zero_data: true }} }} }} ]
{CONTRACT_TEXT}
"""

USER_BLOCK = """
name: "mert"
platform: "onnxruntime_onnx"
max_batch_size: 48
dynamic_batching { max_queue_delay_microseconds: 1500 }
instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0 ] } ]
"""


def make_repo(root: Path, text: str) -> Path:
    """A repository with one model: ``text`` as its config, a placeholder model file."""
    (root / "mert" / "1").mkdir(parents=True)
    (root / "mert" / "config.pbtxt").write_text(text)
    (root / "mert" / "1" / "model.onnx").write_bytes(b"derive only needs the file to exist")
    return root


def derived(tmp_path: Path, text: str, provider: str = "cpu", cpu_count: int = 8):
    repo = make_repo(tmp_path / "src", text)
    models = local_repo.derive(repo, tmp_path / "out", provider=provider, cpu_count=cpu_count)
    return models, load_config(tmp_path / "out" / "mert" / "config.pbtxt")


def test_derived_cpu_config_keeps_batcher_instances_warmup_and_contract(tmp_path):
    source = parse(USER_BLOCK + EXPORTER_BLOCK)
    models, cfg = derived(tmp_path, USER_BLOCK + EXPORTER_BLOCK, cpu_count=8)

    assert (cfg.backend, cfg.platform) == ("python", "")
    (group,) = cfg.instance_group
    assert (group.count, group.kind, list(group.gpus)) == (2, mc().ModelInstanceGroup.KIND_CPU, [])
    assert cfg.max_batch_size == 48
    assert cfg.dynamic_batching == source.dynamic_batching
    assert cfg.model_warmup == source.model_warmup and len(cfg.model_warmup) == 1
    assert list(cfg.input) == list(source.input) and list(cfg.output) == list(source.output)
    assert ModelContract.from_config(cfg) == ModelContract.from_config(source)
    # ONNX Runtime threads split the cores between the instances.
    assert cfg.parameters[local_repo.P_INTRA_OP_THREADS].string_value == "4"
    assert cfg.parameters[local_repo.P_PROVIDER].string_value == "cpu"
    assert (
        Path(cfg.parameters[local_repo.P_ONNX_PATH].string_value)
        == (tmp_path / "src" / "mert" / "1" / "model.onnx").resolve()
    )
    assert (
        tmp_path / "out" / "mert" / "1" / "model.py"
    ).read_text() == local_repo.BACKEND_MODEL.read_text()
    assert [(m.name, m.instances) for m in models] == [("mert", 2)]


def test_derived_cuda_config_keeps_gpu_instances(tmp_path):
    text = USER_BLOCK.replace("gpus: [ 0 ]", "gpus: [ 0, 1, 2 ]") + EXPORTER_BLOCK
    models, cfg = derived(tmp_path, text, provider="cuda")
    (group,) = cfg.instance_group
    assert (group.count, group.kind, list(group.gpus)) == (
        2,
        mc().ModelInstanceGroup.KIND_GPU,
        [0, 1, 2],
    )
    assert models[0].instances == 6  # count is per GPU
    assert cfg.parameters[local_repo.P_PROVIDER].string_value == "cuda"


def test_derived_config_drops_accelerators_the_python_backend_cannot_use(tmp_path):
    blocks = doc_blocks(SERVING_DOC)
    text = USER_BLOCK + blocks["tensorrt-fp16"] + EXPORTER_BLOCK
    assert (
        parse(text).optimization.execution_accelerators.gpu_execution_accelerator[0].name
        == "tensorrt"
    )
    _, cfg = derived(tmp_path, text)
    assert not cfg.HasField("optimization")


def test_config_without_instance_group_gets_one_instance(tmp_path):
    text = USER_BLOCK.replace("instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0 ] } ]", "")
    models, cfg = derived(tmp_path, text + EXPORTER_BLOCK, cpu_count=2)
    assert [(g.count, g.kind) for g in cfg.instance_group] == [
        (1, mc().ModelInstanceGroup.KIND_CPU)
    ]
    assert cfg.parameters[local_repo.P_INTRA_OP_THREADS].string_value == "2"
    assert models[0].instances == 1


def test_derive_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="no model"):
        local_repo.derive(tmp_path, tmp_path / "out")
    repo = make_repo(tmp_path / "noonnx", USER_BLOCK + EXPORTER_BLOCK)
    (repo / "mert" / "1" / "model.onnx").unlink()
    with pytest.raises(ConfigError, match=r"to_onnx\.py"):
        local_repo.derive(repo, tmp_path / "out")
    bare = make_repo(tmp_path / "bare", USER_BLOCK + EXPORTER_BLOCK.replace(CONTRACT_TEXT, ""))
    with pytest.raises(ModelContractError, match="contract parameters"):
        local_repo.derive(bare, tmp_path / "out2")
    broken = make_repo(tmp_path / "broken", USER_BLOCK + "instance_group [ { count: two } ]")
    with pytest.raises(ConfigError, match="not a valid Triton model config"):
        local_repo.derive(broken, tmp_path / "out3")


@pytest.mark.parametrize(
    "edit, gpu_instances, cpu_instances",
    [
        ("n-gpus", 4, 1),
        ("two-per-gpu", 2, 2),
        ("two-per-gpu-n-gpus", 8, 2),
    ],
)
def test_documented_gpu_edits_parse_and_derive(tmp_path, edit, gpu_instances, cpu_instances):
    blocks = doc_blocks(SERVING_DOC)
    config = parse(blocks["committed"] + EXPORTER_BLOCK)
    config.ClearField("instance_group")
    config.MergeFrom(parse(blocks[edit]))
    text = dump_config(config)
    assert all(g.kind == mc().ModelInstanceGroup.KIND_GPU for g in parse(text).instance_group)
    models, _ = derived(tmp_path / "gpu", text, provider="cuda")
    assert models[0].instances == gpu_instances
    models, cfg = derived(tmp_path / "cpu", text, provider="cpu")
    assert models[0].instances == cpu_instances
    assert all(
        not g.gpus and g.kind == mc().ModelInstanceGroup.KIND_CPU for g in cfg.instance_group
    )


def test_readme_instance_groups_match_the_docs_and_derive(tmp_path):
    blocks = doc_blocks(SERVING_DOC)
    committed = parse(blocks["committed"])
    readme = fenced_instance_groups(README)
    assert readme, "README shows no instance_group block"
    assert list(parse(readme[0]).instance_group) == list(committed.instance_group)
    for i, snippet in enumerate(readme):
        config = parse(blocks["committed"] + EXPORTER_BLOCK)
        config.ClearField("instance_group")
        config.MergeFrom(parse(snippet))
        derived(tmp_path / str(i), dump_config(config), provider="cuda")


def test_committed_gpu_config_is_what_the_docs_say():
    assert COMMITTED.is_file(), f"{COMMITTED} is not committed (the exporter writes it)"
    config = load_config(COMMITTED)
    docs = parse(doc_blocks(SERVING_DOC)["committed"])
    ModelContract.from_config(config)  # the exporter's block carries the contract
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == docs.max_batch_size
    assert config.dynamic_batching == docs.dynamic_batching
    assert not config.dynamic_batching.preferred_batch_size  # Triton advises against, for ONNX
    assert list(config.instance_group) == list(docs.instance_group)
    (group,) = config.instance_group
    assert (group.count, group.kind, list(group.gpus)) == (1, mc().ModelInstanceGroup.KIND_GPU, [0])
    assert config.model_warmup, "the model must be warm before it reports ready"


def test_derived_config_carries_the_int8_recipe_from_the_model_metadata(tmp_path):
    """The backend needs the recipe before it opens the session: a TensorRT-recipe model runs
    on CPU with QDQ simulated in fp32, the same on every CPU class."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    for key, value in {"export.int8_method": "static_qdq_tensorrt", "indexer.x": "é"}.items():
        model.metadata_props.add(key=key, value=value)
    repo = make_repo(tmp_path / "src", USER_BLOCK + EXPORTER_BLOCK)
    onnx.save(model, str(repo / "mert" / "1" / "model.onnx"))
    assert local_repo.onnx_metadata(repo / "mert" / "1" / "model.onnx") == {
        "export.int8_method": "static_qdq_tensorrt",
        "indexer.x": "é",
    }
    local_repo.derive(repo, tmp_path / "out", provider="cpu", cpu_count=2)
    cfg = load_config(tmp_path / "out" / "mert" / "config.pbtxt")
    assert cfg.parameters[local_repo.P_INT8_METHOD].string_value == "static_qdq_tensorrt"
    # A file without the key (fp32, or not a model at all) gets no parameter.
    _, plain = derived(tmp_path / "plain", USER_BLOCK + EXPORTER_BLOCK)
    assert local_repo.P_INT8_METHOD not in plain.parameters
