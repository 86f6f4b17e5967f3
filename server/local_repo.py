"""Derive the local (Python-backend) model repository from the served one.

``model_repository/NAME/config.pbtxt`` is written for the NVIDIA Triton
container (ONNX Runtime backend, GPU instances). The bundled Triton has only
the Python backend, so each model is re-described for it here: same inputs,
outputs, batcher, instance count and warm-up, with ``backend: "python"`` and
``server/backend/model.py`` running the same ``model.onnx`` with ONNX Runtime.
One hand-kept config, never two.

The INT8 recipe the export recorded in the model file (``export.int8_method``)
travels as a parameter too: a model made for TensorRT is served on CPU with
ONNX Runtime's QDQ fusion off (exact simulated quantisation, see
``export/quantize.py``), not with ORT's fused int8 kernels.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mert_indexer.atomic import atomic_write_text
from mert_indexer.contract import ModelContract, dump_config, load_config
from mert_indexer.errors import ConfigError

BACKEND_MODEL = Path(__file__).parent / "backend" / "model.py"
ONNX_FILE = "model.onnx"

# Keep in step with server/backend/model.py (which cannot import this package).
P_ONNX_PATH = "local.onnx_path"
P_INTRA_OP_THREADS = "local.intra_op_threads"
P_PROVIDER = "local.provider"
P_INT8_METHOD = "local.int8_method"
M_INT8_METHOD = "export.int8_method"  # the ONNX metadata key export/runner.py writes


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
        int8_method = onnx_metadata(onnx_path).get(M_INT8_METHOD)
        if int8_method:
            config.parameters[P_INT8_METHOD].string_value = int8_method
        out = dest / config.name
        (out / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(BACKEND_MODEL, out / "1" / "model.py")
        atomic_write_text(out / "config.pbtxt", dump_config(config))
        models.append(LocalModel(config.name, onnx_path, contract, instances))
    return models


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props``, read without loading the graph or its weights.

    Walks the top-level protobuf fields of ``ModelProto`` and seeks past the
    rest, so a 400 MB model costs a few reads (and no ``onnx`` dependency).
    A file that is not a model gives ``{}``.
    """
    metadata: dict[str, str] = {}
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            while fh.tell() < size:
                field, wire = divmod(_varint(fh), 8)
                if wire == 0:
                    _varint(fh)
                elif wire == 1:
                    fh.seek(8, os.SEEK_CUR)
                elif wire == 5:
                    fh.seek(4, os.SEEK_CUR)
                elif wire == 2:
                    length = _varint(fh)
                    if field == _METADATA_PROPS:
                        key, value = _string_pair(fh.read(length))
                        metadata[key] = value
                    else:
                        fh.seek(length, os.SEEK_CUR)
                else:
                    return {}
            if fh.tell() != size:
                return {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return metadata


# ModelProto.metadata_props: repeated StringStringEntryProto {1: key, 2: value}
_METADATA_PROPS = 14


def _varint(fh: BinaryIO) -> int:
    shift = result = 0
    while True:
        byte = fh.read(1)
        if not byte or shift > 63:
            raise ValueError("truncated varint")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


def _string_pair(data: bytes) -> tuple[str, str]:
    import io

    fields = {1: "", 2: ""}
    buf = io.BytesIO(data)
    while buf.tell() < len(data):
        field, wire = divmod(_varint(buf), 8)
        if wire != 2:
            raise ValueError("unexpected field in a metadata entry")
        length = _varint(buf)
        fields[field] = buf.read(length).decode("utf-8")
    return fields[1], fields[2]
