"""PyTorch module to an ONNX file: the torch.export-based exporter, identity metadata, 2 GB rule.

The dynamo exporter is the one torch supports going forward (the TorchScript
path is deprecated since 2.9); both were measured at ~4e-7 relative L2 on MERT.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from mert_indexer.contract import INPUT_NAME, OUTPUT_NAME
from mert_indexer.errors import ExportError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 * 1024**3
# Leave headroom for the graph itself next to the weights.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 1024**2


def export_module(module: Any, example: Any) -> Any:
    """Trace ``module`` on ``example`` (``[B, samples]``) into an ``onnx.ModelProto``.

    The batch axis is dynamic.
    """
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter narrates every pass (and missing torchvision ops) at INFO/WARNING.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    if program is None:
        raise ExportError("torch.onnx.export returned no ONNX program")
    return program.model_proto


def set_metadata(model: Any, metadata: dict[str, str]) -> None:
    """Replace ``metadata_props`` keys with ``metadata`` (the contract travels with the file)."""
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    for prop in keep:
        model.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in sorted(metadata.items()):
        model.metadata_props.add(key=key, value=str(value))


def tensor_bytes(model: Any) -> int:
    """Bytes of initializer data, without serialising (which fails past 2 GB)."""
    import numpy as np
    from onnx import helper

    total = 0
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        total += count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def save(model: Any, path: Path) -> list[Path]:
    """Write ``model`` to ``path``; one file under 2 GB, else weights in ``<name>.data`` beside it.

    Returns the files written: they belong together and must be moved as a pair.
    """
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return [path]
    data_name = path.name + ".data"
    log.info("model is over 2 GB: weights go to %s beside %s", data_name, path.name)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    return [path, path.parent / data_name]
