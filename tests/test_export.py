"""export/to_onnx.py end to end on the tiny architecture: real torch, real ONNX Runtime, real gates.

Every gate is also shown to fail when it should: a corrupted weight, a
perturbed model, embeddings that keep cosine but lose neighbours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from export import mert, runner, synth, validate  # noqa: E402
from export.graph import PooledMert  # noqa: E402
from export.options import ExportOptions, parse_layer_spec  # noqa: E402
from mert_indexer.contract import (  # noqa: E402
    CONTRACT_PARAMS,
    INPUT_NAME,
    OUTPUT_NAME,
    P_LAYERS,
    P_PRECISION,
    P_WEIGHTS_SHA256,
    ModelContract,
    load_config,
)
from mert_indexer.errors import ConfigError, ValidationError, WeightsUnavailableError  # noqa: E402

WINDOW = 120_000
TINY = {"random_init": True, "size": "tiny"}


def export(repo: Path, **kwargs) -> runner.ExportResult:
    options = {**TINY, "output": repo, "validation_windows": 256, **kwargs}
    return runner.run_export(ExportOptions(**options))


def ort_embed(model_path: Path, audio: np.ndarray) -> np.ndarray:
    return validate.run(validate.session(model_path), audio)


def audio_windows(count: int, seed: int = 3) -> np.ndarray:
    return synth.to_int16(synth.windows(count, WINDOW, 24_000, seed), seed)


def tiny_preln() -> mert.LoadedModel:
    torch.manual_seed(1)
    from transformers import HubertModel

    fields = {**mert.ARCHITECTURES["tiny"], "do_stable_layer_norm": True}
    model = HubertModel(mert.hubert_config(fields)).eval()
    return mert.LoadedModel(
        model, "test/preln", 24_000, mert.state_dict_sha256(model.state_dict()), True
    )


def transformers_pooled(
    model, audio: np.ndarray, layers: tuple[int, ...], last_norm: bool
) -> np.ndarray:
    """Pooling computed straight from transformers' output_hidden_states (MERT's README recipe)."""
    from transformers import Wav2Vec2FeatureExtractor

    pcm = audio.astype(np.float32) / 32768.0
    inputs = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=24_000, do_normalize=True)(
        list(pcm), sampling_rate=24_000, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(inputs["input_values"], output_hidden_states=True)
        states = list(out.hidden_states)
        if last_norm:
            states[-1] = model.encoder.layer_norm(states[-1])
        return torch.stack([states[i].mean(dim=1) for i in layers]).mean(dim=0).numpy()


@pytest.fixture(scope="module")
def fp32_repo(tmp_path_factory) -> tuple[Path, runner.ExportResult]:
    repo = tmp_path_factory.mktemp("repo")
    return repo, export(repo)


# --- the exported model and its identity -------------------------------------------------


def test_fp32_export_round_trips_the_contract(fp32_repo) -> None:
    repo, result = fp32_repo
    model_path = repo / "mert" / "1" / "model.onnx"
    assert result.model_path == model_path and model_path.is_file()
    contract = ModelContract.from_config(load_config(repo / "mert" / "config.pbtxt"))
    assert contract.input_name == INPUT_NAME and contract.output_name == OUTPUT_NAME
    assert contract.input_dtype == "int16"
    assert (contract.window_samples, contract.sample_rate, contract.embedding_dim) == (
        WINDOW,
        24_000,
        32,
    )
    assert contract.layers == (0, 1, 2) and contract.pooling == "mean_time_mean_layers"
    assert contract.precision == "fp32"
    # The weights hash is the state dict's, in sorted key order, and the metadata says the same.
    expected_sha = mert.state_dict_sha256(mert.random_model("tiny", 0).model.state_dict())
    assert contract.weights_sha256 == expected_sha
    metadata = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
    config = load_config(repo / "mert" / "config.pbtxt")
    for key in CONTRACT_PARAMS:
        assert metadata[key] == config.parameters[key].string_value
    assert result.report.max_rel_l2 <= validate.FP32_MAX_REL_L2
    # Where the time went, stage by stage, in the order they ran.
    assert list(result.stages) == [
        "load",
        "trace",
        "reference",
        "fp32: build",
        "fp32: gates",
        "install",
    ]
    assert all(s >= 0 for s in result.stages.values())
    assert sum(result.stages.values()) <= result.seconds


def test_graph_has_dynamic_batch_and_matches_pytorch_at_other_batch_sizes(fp32_repo) -> None:
    repo, _ = fp32_repo
    session = validate.session(repo / "mert" / "1" / "model.onnx")
    assert session.get_inputs()[0].shape[1] == WINDOW and isinstance(
        session.get_inputs()[0].shape[0], str
    )
    audio = audio_windows(5)
    loaded = mert.random_model("tiny", 0)
    reference = transformers_pooled(loaded.model, audio, (0, 1, 2), last_norm=False)
    for batch in (1, 5):
        out = validate.run(session, audio[:batch], batch_size=batch)
        assert validate.rel_l2(out, reference[:batch]).max() < 1e-4


def test_float32_input_gives_the_same_embedding_as_int16(tmp_path: Path, fp32_repo) -> None:
    repo, _ = fp32_repo
    export(tmp_path, input_dtype="float32")
    contract = ModelContract.from_config(load_config(tmp_path / "mert" / "config.pbtxt"))
    assert contract.input_dtype == "float32"
    audio = audio_windows(4)
    as_int16 = ort_embed(repo / "mert" / "1" / "model.onnx", audio)
    as_float = ort_embed(tmp_path / "mert" / "1" / "model.onnx", audio.astype(np.float32) / 32768.0)
    assert validate.rel_l2(as_float, as_int16).max() < 1e-5


# --- pooling semantics against transformers ----------------------------------------------


def test_pooling_matches_transformers_post_ln() -> None:
    loaded = mert.random_model("tiny", 0)
    audio = audio_windows(3)
    for layers in ((0, 1, 2), (2,), (0,), (1, 2)):
        module = PooledMert(loaded.model, layers, "int16").eval()
        with torch.no_grad():
            ours = module(torch.from_numpy(audio)).numpy()
        expected = transformers_pooled(loaded.model, audio, layers, last_norm=False)
        assert validate.rel_l2(ours, expected).max() < 1e-5, layers


def test_pooling_matches_reference_mert_for_pre_ln_last_layer() -> None:
    """Pre-LN (330M-like): the last hidden state carries the encoder's final LayerNorm.

    As in MERT's code.
    """
    loaded = tiny_preln()
    audio = audio_windows(3)
    module = PooledMert(loaded.model, (0, 1, 2), "int16").eval()
    with torch.no_grad():
        ours = module(torch.from_numpy(audio)).numpy()
    expected = transformers_pooled(loaded.model, audio, (0, 1, 2), last_norm=True)
    as_transformers_5_reports_it = transformers_pooled(
        loaded.model, audio, (0, 1, 2), last_norm=False
    )
    assert validate.rel_l2(ours, expected).max() < 1e-5
    # The difference is real, so this test could fail: without the final norm the answer moves.
    assert validate.rel_l2(as_transformers_5_reports_it, expected).min() > 1e-2
    # Layers short of the last are not normed, in either convention.
    module = PooledMert(loaded.model, (1,), "int16").eval()
    with torch.no_grad():
        ours = module(torch.from_numpy(audio)).numpy()
    assert (
        validate.rel_l2(ours, transformers_pooled(loaded.model, audio, (1,), last_norm=False)).max()
        < 1e-5
    )


def test_layer_truncation_exports_only_what_is_used(tmp_path: Path) -> None:
    result = export(tmp_path, layers="1")
    model = onnx.load(str(result.model_path))
    assert result.params[P_LAYERS] == "1"
    names = {init.name for init in model.graph.initializer}
    assert not any(name.startswith("layers.1.") for name in names)  # layer 2 is not in the graph
    assert any(name.startswith("layers.0.") for name in names)
    loaded = mert.random_model("tiny", 0)
    audio = audio_windows(3)
    expected = transformers_pooled(loaded.model, audio, (1,), last_norm=False)
    assert validate.rel_l2(ort_embed(result.model_path, audio), expected).max() < 1e-4


def test_layer_specs() -> None:
    assert parse_layer_spec("all", 12) == tuple(range(13))
    assert parse_layer_spec("6", 12) == (6,)
    assert parse_layer_spec("4-8", 12) == (4, 5, 6, 7, 8)
    assert parse_layer_spec("12,1,6", 12) == (1, 6, 12)
    assert parse_layer_spec("last", 24) == (24,)
    for bad in ("13", "8-4", "x", ",", "-1"):
        with pytest.raises(ConfigError):
            parse_layer_spec(bad, 12)


# --- precisions ------------------------------------------------------------------------


def test_fp16_export_passes_the_gates(tmp_path: Path) -> None:
    result = export(tmp_path, precision="fp16")
    assert result.params[P_PRECISION] == "fp16"
    assert result.report.retrieval_agreement is not None
    assert result.report.retrieval_agreement >= validate.MIN_RETRIEVAL_AGREEMENT
    print(f"\nfp16 gate figures: {result.report.summary()}")
    types = {init.data_type for init in onnx.load(str(result.model_path)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types


def test_int8_export_with_calibration_folder_passes_the_gates(tmp_path: Path) -> None:
    import soundfile

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    music = synth.windows(4, 3 * 44_100, 44_100, seed=11)
    soundfile.write(calibration / "a.wav", np.stack([music[0], music[1]], axis=1), 44_100)  # stereo
    soundfile.write(calibration / "b.flac", music[2], 44_100)
    soundfile.write(calibration / "c.ogg", music[3] * 0.5, 44_100)
    (calibration / "broken.wav").write_bytes(rng.bytes(1000))  # skipped, not fatal

    result = export(
        tmp_path / "repo",
        precision="int8",
        int8_target="gpu",
        calibration_dir=calibration,
        calibration_windows=4,
        window_seconds=2.0,
    )
    assert result.params[P_PRECISION] == "int8"
    assert result.report.retrieval_agreement >= validate.MIN_RETRIEVAL_AGREEMENT
    print(f"\nint8 ({result.int8_method}) gate figures: {result.report.summary()}")
    config = load_config(tmp_path / "repo" / "mert" / "config.pbtxt")
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert result.int8_method == "static_qdq_tensorrt"  # no CPU-only fallback for the GPU target
    # Gated as TensorRT computes it (exact simulated quantisation), not with ORT's fused CPU
    # kernels, whose u8 x s8 arithmetic saturates on CPUs without VNNI.
    assert result.report.simulated_qdq and "QDQ simulated" in result.report.summary()
    assert (
        accelerators[0].name == "tensorrt"
        and accelerators[0].parameters["precision_mode"] == "INT8"
    )
    model = onnx.load(str(result.model_path))
    zero_points = [init for init in model.graph.initializer if init.name.endswith("_zero_point")]
    assert zero_points and all(init.data_type == onnx.TensorProto.INT8 for init in zero_points)
    from onnx import numpy_helper

    assert all(
        not numpy_helper.to_array(init).any() for init in zero_points
    )  # symmetric: TensorRT's rule


def test_int8_default_export_passes_the_gates(tmp_path: Path) -> None:
    result = export(tmp_path, precision="int8")
    assert result.int8_method in ("static_qdq_cpu", "dynamic_matmul")
    assert result.report.retrieval_agreement >= validate.MIN_RETRIEVAL_AGREEMENT
    print(f"\nint8 ({result.int8_method}) gate figures: {result.report.summary()}")
    config = load_config(tmp_path / "mert" / "config.pbtxt")
    assert (
        not config.optimization.execution_accelerators.gpu_execution_accelerator
    )  # not a TensorRT model
    metadata = {p.key: p.value for p in onnx.load(str(result.model_path)).metadata_props}
    assert metadata["export.int8_method"] == result.int8_method
    assert not result.report.simulated_qdq  # CPU recipes: gated on the kernels that serve them
    assert_7_bit_weights(onnx.load(str(result.model_path)))


def test_static_calibration_does_not_depend_on_the_batching(tmp_path: Path, fp32_repo) -> None:
    """One window per calibration run (less memory) gives the model a batch of 4 gives."""
    from onnx import numpy_helper

    from export.quantize import CALIBRATION_BATCH, STATIC_CPU, to_int8_static

    _, result = fp32_repo
    calibration = audio_windows(8, seed=5)

    def quantisation_parameters(batch_size: int) -> dict[str, np.ndarray]:
        path = to_int8_static(
            result.model_path,
            tmp_path / f"batch{batch_size}.onnx",
            calibration,
            STATIC_CPU,
            batch_size=batch_size,
        )
        return {
            init.name: numpy_helper.to_array(init)
            for init in onnx.load(str(path)).graph.initializer
            if init.name.endswith(("_scale", "_zero_point"))
        }

    one, four = quantisation_parameters(CALIBRATION_BATCH), quantisation_parameters(4)
    assert CALIBRATION_BATCH == 1 and one and one.keys() == four.keys()
    for name, value in one.items():
        np.testing.assert_array_equal(value, four[name], err_msg=name)


def test_per_frame_feature_convs_on_the_exported_graph(tmp_path: Path, fp32_repo) -> None:
    """conv1..conv6 as per-frame dynamic INT8 on the real exported graph: it runs, stays close
    to the static recipe, keeps 7-bit weights; a conv cannot be static and per-frame at once."""
    import dataclasses

    from export.quantize import STATIC_CPU, feature_extractor_convs, to_int8_static
    from mert_indexer.errors import ExportError

    _, result = fp32_repo
    calibration = audio_windows(8, seed=5)
    static = to_int8_static(result.model_path, tmp_path / "static.onnx", calibration, STATIC_CPU)
    recipe = dataclasses.replace(STATIC_CPU, per_frame_convs=(1, 2, 3, 4, 5, 6))
    path = to_int8_static(result.model_path, tmp_path / "per_frame.onnx", calibration, recipe)
    model = onnx.load(str(path))
    assert len(feature_extractor_convs(model)) == 1  # conv0 alone stays a Conv
    assert (
        sum(node.op_type == "MatMulInteger" for node in model.graph.node) == 4 * 3 + 2 * 2
    )  # a GEMM per tap
    assert_7_bit_weights(model)
    audio = audio_windows(8, seed=11)
    reference = ort_embed(result.model_path, audio)
    static_cosines = validate.cosines(ort_embed(static, audio), reference)
    per_frame_cosines = validate.cosines(ort_embed(path, audio), reference)
    assert per_frame_cosines.min() > 0.99 and static_cosines.min() > 0.99
    both = dataclasses.replace(recipe, feature_convs=(1,))
    with pytest.raises(ExportError, match="either static or per-frame"):
        to_int8_static(result.model_path, tmp_path / "both.onnx", calibration, both)


def assert_7_bit_weights(model) -> None:
    """The CPU recipes' int8 weights stay in [-64, 64]: no int16 saturation without VNNI."""
    from onnx import numpy_helper

    weights = [
        numpy_helper.to_array(init)
        for init in model.graph.initializer
        if init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2
    ]
    assert weights
    assert all(w.min() >= -64 and w.max() <= 64 for w in weights)


def test_cpu_class_is_named_in_reports_and_failures() -> None:
    flags = validate.cpu_flags()
    assert set(flags) <= set(validate.CPU_FLAGS)
    name = validate.cpu_class()
    print(f"\nINT8 gates run on: {name}")
    assert all(flag in name for flag in flags)
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((64, 32)).astype(np.float32)
    with pytest.raises(ValidationError, match=r"\(CPU .*\)"):
        validate.gate("int8", reference + rng.standard_normal(reference.shape), reference)
    assert f"CPU {name}" in validate.gate("int8", reference, reference).summary()


def test_backend_simulates_the_recipes_the_export_simulates() -> None:
    """server/backend/model.py cannot import export/: its list must match the recipes."""
    import ast

    from export.quantize import RECIPES

    tree = ast.parse((ROOT / "server" / "backend" / "model.py").read_text())
    listed = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") == "SIMULATE_ON_CPU" for t in node.targets)
    )
    assert set(listed) == {m for m, r in RECIPES.items() if r.simulate_on_cpu}


# --- gates fail when they should -----------------------------------------------------------


def perturb_projection(model_path: Path, relative_noise: float) -> None:
    """Add noise to the first MatMul weight (the feature projection every frame goes through)."""
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    first = next(n for n in model.graph.node if n.op_type == "MatMul")
    target = next(init for init in model.graph.initializer if init.name in first.input)
    array = numpy_helper.to_array(target)
    noise = np.random.default_rng(0).standard_normal(array.shape) * array.astype(np.float32).std()
    target.CopyFrom(
        numpy_helper.from_array((array + relative_noise * noise).astype(array.dtype), target.name)
    )
    onnx.save(model, str(model_path))


def test_corrupted_weight_fails_the_fp32_gate_and_writes_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    real_build = runner.build_fp32

    def build_then_corrupt(*args, **kwargs):
        path = real_build(*args, **kwargs)
        perturb_projection(path, 0.01)
        return path

    monkeypatch.setattr(runner, "build_fp32", build_then_corrupt)
    with pytest.raises(ValidationError, match="relative L2"):
        export(tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_failed_reexport_leaves_the_previous_model_untouched(fp32_repo, monkeypatch) -> None:
    repo, _ = fp32_repo
    model_dir = repo / "mert"
    before = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    real_fp16 = runner.make_fp16

    def fp16_then_corrupt(*args, **kwargs):
        path = real_fp16(*args, **kwargs)
        perturb_projection(path, 0.5)  # a perturbed model
        return path

    monkeypatch.setattr(runner, "make_fp16", fp16_then_corrupt)
    with pytest.raises(ValidationError, match="fp16"):
        export(repo, precision="fp16", validation_windows=64)
    after = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    assert after == before


def test_cosine_gate_fails_on_a_perturbed_model() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((64, 32)).astype(np.float32)
    perturbed = reference + 0.2 * rng.standard_normal(reference.shape).astype(np.float32)
    with pytest.raises(ValidationError, match="cosine"):
        validate.gate("int8", perturbed, reference)
    validate.gate(
        "int8",
        reference + 1e-4 * rng.standard_normal(reference.shape).astype(np.float32),
        reference,
    )


def test_retrieval_gate_catches_what_cosine_misses() -> None:
    """Clips that all sit at cosine ~0.995 to each other.

    Tiny errors keep cosine >= 0.99 but lose neighbours.
    """
    rng = np.random.default_rng(1)
    common = rng.standard_normal(64)
    reference = (common + 0.1 * rng.standard_normal((200, 64))).astype(np.float32)
    noisy = (reference + 0.1 * rng.standard_normal(reference.shape)).astype(np.float32)
    assert validate.cosines(noisy, reference).min() > validate.MIN_COSINE
    assert validate.retrieval_agreement(noisy, reference) < validate.MIN_RETRIEVAL_AGREEMENT
    with pytest.raises(ValidationError, match="nearest neighbour"):
        validate.gate("fp16", noisy, reference)


def test_fp32_gate_threshold() -> None:
    rng = np.random.default_rng(2)
    reference = rng.standard_normal((16, 32)).astype(np.float32)
    direction = rng.standard_normal(reference.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    scale = np.linalg.norm(reference, axis=1, keepdims=True)
    validate.gate("fp32", (reference + 5e-5 * scale * direction).astype(np.float32), reference)
    with pytest.raises(ValidationError, match="relative L2"):
        validate.gate("fp32", (reference + 2e-4 * scale * direction).astype(np.float32), reference)


# --- weights: local folders, the hub, safety ---------------------------------------------


def save_checkpoint(
    folder: Path, loaded: mert.LoadedModel, fmt: str, drop: str | None = None
) -> None:
    """A MERT-style checkpoint folder.

    config.json (model_type mert_model), old weight-norm names.
    """
    folder.mkdir(parents=True)
    config = loaded.model.config.to_dict()
    config.update(
        model_type="mert_model",
        _name_or_path="m-a-p/test-mert",
        feature_extractor_cqt=False,
        attention_relax=32.0,
        sample_rate=24_000,
    )
    (folder / "config.json").write_text(json.dumps(config))
    state = {}
    for key, value in loaded.model.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        if drop is None or drop not in key:
            state[key] = value.clone()
    state["feature_extractor_cqt.kernel"] = torch.zeros(3)  # training-only extra: ignored
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, str(folder / "pytorch_model.bin"))


def test_local_pre_ln_checkpoint_exports_and_passes(tmp_path: Path) -> None:
    loaded = tiny_preln()
    save_checkpoint(tmp_path / "ckpt", loaded, "bin")
    result = runner.run_export(
        ExportOptions(model=str(tmp_path / "ckpt"), output=tmp_path / "repo")
    )
    contract = ModelContract.from_config(load_config(tmp_path / "repo" / "mert" / "config.pbtxt"))
    assert contract.model_id == "m-a-p/test-mert"
    assert result.params[P_WEIGHTS_SHA256] == loaded.weights_sha256
    audio = audio_windows(3)
    expected = transformers_pooled(loaded.model, audio, (0, 1, 2), last_norm=True)
    assert validate.rel_l2(ort_embed(result.model_path, audio), expected).max() < 1e-4


def test_local_safetensors_checkpoint_loads_the_same_weights(tmp_path: Path) -> None:
    loaded = mert.random_model("tiny", 5)
    save_checkpoint(tmp_path / "ckpt", loaded, "safetensors")
    again = mert.load_model(str(tmp_path / "ckpt"))
    assert again.weights_sha256 == loaded.weights_sha256
    assert not again.random_init


def test_checkpoint_missing_encoder_weights_is_refused(tmp_path: Path) -> None:
    save_checkpoint(
        tmp_path / "ckpt",
        mert.random_model("tiny", 0),
        "safetensors",
        drop="layers.1.attention.q_proj",
    )
    with pytest.raises(WeightsUnavailableError, match=r"layers\.1\.attention\.q_proj"):
        mert.load_model(str(tmp_path / "ckpt"))


class NotATensor:
    pass


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, mert.random_model("tiny", 0), "bin")
    torch.save({"payload": NotATensor()}, str(folder / "pytorch_model.bin"))
    with pytest.raises(WeightsUnavailableError, match="safely"):
        mert.load_model(str(folder))


@pytest.mark.parametrize(
    "offline_env",
    [
        {"HF_HUB_OFFLINE": "1"},
        {"HF_ENDPOINT": "https://hub.invalid"},
    ],  # offline mode; a hub that does not resolve
    ids=["HF_HUB_OFFLINE", "unresolvable-hub"],
)
def test_offline_hub_is_one_clear_error_and_writes_nothing(
    tmp_path: Path, offline_env: dict
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), **offline_env)
    done = subprocess.run(
        [sys.executable, str(ROOT / "export" / "to_onnx.py"), "--output", str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith("error: cannot fetch m-a-p/MERT-v1-95M")
    assert "--model DIR" in lines[0] and "--random-init" in lines[0]
    assert not (tmp_path / "repo").exists()


def test_cli_rejects_bad_combinations(tmp_path: Path) -> None:
    from export import to_onnx

    with pytest.raises(SystemExit) as exit_info:
        to_onnx.parse_args(["--size", "tiny"])  # --size without --random-init
    assert exit_info.value.code == 2
    assert (
        to_onnx.main(
            ["--random-init", "--size", "tiny", "--layers", "7", "--output", str(tmp_path)]
        )
        == 1
    )


@pytest.mark.slow
def test_330m_random_init_exports(tmp_path: Path) -> None:
    """The pre-LN 330M architecture end to end (~5 minutes on 2 cores)."""
    result = runner.run_export(
        ExportOptions(random_init=True, size="330m", output=tmp_path, validation_windows=8)
    )
    contract = ModelContract.from_config(load_config(tmp_path / "mert" / "config.pbtxt"))
    assert contract.embedding_dim == 1024 and contract.layers == tuple(range(25))
    assert result.report.max_rel_l2 <= validate.FP32_MAX_REL_L2


def test_reexport_keeps_user_edits_and_comments(tmp_path: Path, fp32_repo) -> None:
    import shutil

    source, _ = fp32_repo
    repo = tmp_path / "repo"
    shutil.copytree(source, repo)
    config_path = repo / "mert" / "config.pbtxt"
    edited = (
        "# Serving notes: this box has no GPU, so CPU instances (ops ticket 42).\n"
        + config_path.read_text()
        .replace("max_batch_size: 64", "max_batch_size: 8  # small batches: latency first")
        .replace("kind: KIND_GPU\n    gpus: [ 0 ]", "kind: KIND_CPU")
        .replace("max_queue_delay_microseconds: 2000", "max_queue_delay_microseconds: 500")
        + 'parameters { key: "team" value: { string_value: "search" } }\n'
    )
    config_path.write_text(edited)
    from export import repo as repo_module

    user_part = repo_module.split_config(edited, config_path)

    result = export(repo, layers="2")
    text = config_path.read_text()
    assert (
        repo_module.split_config(text, config_path) == user_part
    )  # byte-for-byte, comments included
    config = load_config(config_path)
    assert (
        config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 500
    )
    assert config.parameters["team"].string_value == "search"
    assert (
        ModelContract.from_config(config).layers
        == (2,)
        == tuple(int(x) for x in result.params[P_LAYERS].split(","))
    )

    # A config whose markers were lost is refused before any export work, and nothing changes.
    config_path.write_text(text.replace(repo_module.BEGIN_MARKER, "# begin"))
    model_before = result.model_path.read_bytes()
    with pytest.raises(ConfigError, match="markers"):
        export(repo)
    assert result.model_path.read_bytes() == model_before


def test_models_past_the_protobuf_limit_keep_their_external_data_beside_them(
    tmp_path: Path, fp32_repo, monkeypatch
) -> None:
    from export import convert
    from export import repo as repo_module

    source, _ = fp32_repo
    model = onnx.load(str(source / "mert" / "1" / "model.onnx"))
    monkeypatch.setattr(convert, "EXTERNAL_DATA_THRESHOLD", 1024)  # pretend 2 GB is 1 kB
    files = convert.save(model, tmp_path / "work" / "model.onnx")
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    text = repo_module.compose_config(
        tmp_path / "repo" / "mert" / "config.pbtxt", "mert", spec_from(source)
    )
    installed = repo_module.install(files, tmp_path / "repo" / "mert", text)
    assert sorted(p.name for p in installed.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    audio = audio_windows(2)
    expected = ort_embed(source / "mert" / "1" / "model.onnx", audio)
    assert np.array_equal(ort_embed(installed, audio), expected)


def spec_from(repo: Path):
    from export import repo as repo_module

    config = load_config(repo / "mert" / "config.pbtxt")
    return repo_module.BlockSpec(
        input_dtype="int16",
        window_samples=WINDOW,
        embedding_dim=32,
        params={key: config.parameters[key].string_value for key in CONTRACT_PARAMS},
    )


def test_gate_reference_proves_the_fp32_onnx_then_reuses_it(
    tmp_path: Path, fp32_repo, monkeypatch
) -> None:
    """fp16/int8 are gated against the fp32 ONNX in ONNX Runtime, proven against PyTorch first."""
    from export import reference

    monkeypatch.setenv(reference.CACHE_ENV, str(tmp_path / "cache"))
    repo, _ = fp32_repo
    fp32 = repo / "mert" / "1" / "model.onnx"
    loaded = mert.random_model("tiny", 0)
    audio = audio_windows(12)
    first = reference.gate_reference(
        loaded.model, loaded.weights_sha256, fp32, audio, (0, 1, 2), parity_windows=4
    )
    pytorch = transformers_pooled(loaded.model, audio, (0, 1, 2), last_norm=False)
    assert not first.cached and first.parity_max_rel_l2 < validate.FP32_MAX_REL_L2
    assert validate.rel_l2(first.embeddings, pytorch).max() < validate.FP32_MAX_REL_L2
    again = reference.gate_reference(
        loaded.model, loaded.weights_sha256, fp32, audio, (0, 1, 2), parity_windows=4
    )
    assert again.cached and np.array_equal(again.embeddings, first.embeddings)
    # A fp32 file that does not reproduce PyTorch is never used as the reference, cached or not.
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(fp32.read_bytes())
    perturb_projection(broken, 0.01)
    with pytest.raises(ValidationError, match="relative L2"):
        reference.gate_reference(
            loaded.model, loaded.weights_sha256, broken, audio, (0, 1, 2), parity_windows=4
        )
