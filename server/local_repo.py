"""Derive the local (Python-backend) model repository from the served one.

``model_repository/NAME/config.pbtxt`` is written for the NVIDIA Triton
container (ONNX Runtime backend, GPU instances). The bundled Triton has only
the Python backend, so each model is re-described for it here: same inputs,
outputs, batcher, instance count and warm-up, with ``backend: "python"`` and
``server/backend/model.py`` running the same ``model.onnx`` with ONNX Runtime.
One hand-kept config, never two.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mert_indexer.atomic import atomic_write_text
from mert_indexer.contract import ModelContract, dump_config, load_config
from mert_indexer.errors import ConfigError

BACKEND_MODEL = Path(__file__).parent / "backend" / "model.py"
ONNX_FILE = "model.onnx"

# Keep in step with server/backend/model.py (which cannot import this package).
P_ONNX_PATH = "local.onnx_path"
P_INTRA_OP_THREADS = "local.intra_op_threads"
P_PROVIDER = "local.provider"


@dataclass(frozen=True)
class LocalModel:
    name: str
    onnx_path: Path
    contract: ModelContract
    instances: int


def find_models(repository: Path) -> list[Path]:
    """Model folders (those holding a config.pbtxt) under ``repository``."""
    if not repository.is_dir():
        raise ConfigError(f"{repository}: model repository not found")
    models = sorted(p.parent for p in repository.glob("*/config.pbtxt"))
    if not models:
        raise ConfigError(f"{repository}: no model (no */config.pbtxt) in the repository")
    return models


def latest_version(model_dir: Path) -> Path:
    versions = sorted(
        (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    for version in reversed(versions):
        if (version / ONNX_FILE).is_file():
            return version / ONNX_FILE
    raise ConfigError(
        f"{model_dir}: no exported model ({model_dir}/<version>/{ONNX_FILE}); "
        "run `python export/to_onnx.py` first"
    )


def derive(
    repository: Path, dest: Path, *, provider: str = "cpu", cpu_count: int | None = None
) -> list[LocalModel]:
    """Write the Python-backend twin of every model in ``repository`` to ``dest``."""
    from tritonclient.grpc import model_config_pb2 as mc

    cpu_count = cpu_count or os.cpu_count() or 1
    models = []
    for model_dir in find_models(repository):
        config = load_config(model_dir / "config.pbtxt")
        config.name = config.name or model_dir.name
        contract = ModelContract.from_config(config)
        onnx_path = latest_version(model_dir).resolve()
        config.platform = ""
        config.backend = "python"
        config.default_model_filename = ""
        config.ClearField("optimization")  # TensorRT/ORT accelerator settings mean nothing here
        if not config.instance_group:
            config.instance_group.add(count=1)
        instances = 0
        for group in config.instance_group:
            group.count = group.count or 1
            if provider == "cuda":
                group.kind = mc.ModelInstanceGroup.KIND_GPU
                instances += group.count * max(1, len(group.gpus))
            else:
                group.kind = mc.ModelInstanceGroup.KIND_CPU
                del group.gpus[:]
                instances += group.count
        threads = max(1, cpu_count // instances) if provider == "cpu" else 1
        config.parameters[P_ONNX_PATH].string_value = str(onnx_path)
        config.parameters[P_INTRA_OP_THREADS].string_value = str(threads)
        config.parameters[P_PROVIDER].string_value = provider
        out = dest / config.name
        (out / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(BACKEND_MODEL, out / "1" / "model.py")
        atomic_write_text(out / "config.pbtxt", dump_config(config))
        models.append(LocalModel(config.name, onnx_path, contract, instances))
    return models
