"""The Triton model repository: ``config.pbtxt`` and the model files.

``config.pbtxt`` is an export-owned block plus a user-owned rest.

Ownership: the export owns the input/output signature, the contract
parameters, the warm-up request and (INT8 static) the TensorRT INT8
accelerator. It writes them between two marker comments and, on re-export,
rewrites only that block: instance groups, batching, other parameters,
accelerators and comments the user edited elsewhere survive. A fresh
repository gets the full template (GPU form). The composed text is parsed with
Triton's own protobuf and checked against the contract before anything is
written; files are replaced atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mert_indexer.atomic import atomic_write, fsync_dir
from mert_indexer.contract import (
    CONTRACT_PARAMS,
    INPUT_NAME,
    NUMPY_TO_TRITON,
    OUTPUT_NAME,
    ModelContract,
)
from mert_indexer.errors import ConfigError, ExportError, ModelContractError

log = logging.getLogger(__name__)

BEGIN_MARKER = "# --- begin: written by export/to_onnx.py ---"
END_MARKER = "# --- end: written by export/to_onnx.py ---"
CONFIG_NAME = "config.pbtxt"
MODEL_FILE = "model.onnx"
VERSION = "1"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_QUEUE_DELAY_US = 2000
TRT_WORKSPACE_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class BlockSpec:
    """Everything the export-owned block says."""

    input_dtype: str  # numpy name: "int16" or "float32"
    window_samples: int
    embedding_dim: int
    params: dict[str, str]  # must hold every contract key
    tensorrt_int8: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)  # comment lines (validation figures)


def render_block(spec: BlockSpec, with_optimization: bool) -> str:
    missing = [k for k in CONTRACT_PARAMS if k not in spec.params]
    if missing:
        raise ConfigError(f"export block lacks contract parameters {missing}")
    in_type = NUMPY_TO_TRITON[spec.input_dtype]
    lines = [
        BEGIN_MARKER,
        "# Owned by the export: every run of export/to_onnx.py rewrites this block,",
        "# and only this block. Edit anything outside it.",
        *[f"# {note}" for note in spec.notes],
        "input [",
        "  {",
        f'    name: "{INPUT_NAME}"',
        f"    data_type: {in_type}",
        f"    dims: [ {spec.window_samples} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{OUTPUT_NAME}"',
        "    data_type: TYPE_FP32",
        f"    dims: [ {spec.embedding_dim} ]",
        "  }",
        "]",
    ]
    for key in sorted(spec.params):
        lines.append(
            f'parameters {{ key: "{key}" '
            f'value: {{ string_value: "{_escape(spec.params[key])}" }} }}'
        )
    lines += [
        "model_warmup [",
        "  {",
        '    name: "one_random_window"',
        "    batch_size: 1",
        "    inputs {",
        f'      key: "{INPUT_NAME}"',
        "      value {",
        f"        data_type: {in_type}",
        f"        dims: [ {spec.window_samples} ]",
        # Random int16 is a valid (loud) window; random FP32 bits include NaN and Inf.
        "        random_data: true" if spec.input_dtype == "int16" else "        zero_data: true",
        "      }",
        "    }",
        "  }",
        "]",
    ]
    if spec.tensorrt_int8 and with_optimization:
        lines += [
            "# INT8 on NVIDIA GPUs: TensorRT reads the calibrated Q/DQ nodes of this model",
            "# (explicit quantisation). The first load builds an engine: minutes.",
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator : [",
            "      {",
            '        name : "tensorrt"',
            '        parameters { key: "precision_mode" value: "INT8" }',
            '        parameters { key: "max_workspace_size_bytes" '
            f'value: "{TRT_WORKSPACE_BYTES}" }}',
            '        parameters { key: "trt_engine_cache_enable" value: "true" }',
            "      }",
            "    ]",
            "  }",
            "}",
        ]
    lines.append(END_MARKER)
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def template(name: str) -> str:
    """The user-owned part of a fresh config: the GPU form, with the marker block appended."""
    return f"""\
# Triton model configuration for the MERT embedding model ("{name}").
#
# The block between the "written by export/to_onnx.py" markers belongs to the
# export and is rewritten by every re-export: the input/output signature, the
# model's identity (the contract parameters the client and the index read)
# and the warm-up request. Everything else is yours: edits to instance groups,
# batching, accelerators, other parameters and comments survive a re-export.
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {DEFAULT_MAX_BATCH_SIZE}

dynamic_batching {{
  max_queue_delay_microseconds: {DEFAULT_QUEUE_DELAY_US}
  # Two queues: interactive queries (indexer-search-serve) ask for level 1 and
  # are batched first; everything else (indexing) gets the default, level 2.
  priority_levels: 2
  default_priority_level: 2
}}

# One instance on GPU 0. More GPUs: list them (gpus: [ 0, 1 ]) or add groups;
# more instances per GPU: raise count. No GPU: kind: KIND_CPU without gpus.
instance_group [
  {{
    count: 1
    kind: KIND_GPU
    gpus: [ 0 ]
  }}
]

# Optional, fp32 export on NVIDIA GPUs: TensorRT FP16, roughly twice the speed.
# The first load builds an engine (minutes; the cache keeps it). Not together
# with the INT8 export, whose block below already selects TensorRT INT8.
# optimization {{
#   execution_accelerators {{
#     gpu_execution_accelerator : [
#       {{
#         name : "tensorrt"
#         parameters {{ key: "precision_mode" value: "FP16" }}
#         parameters {{ key: "max_workspace_size_bytes" value: "{TRT_WORKSPACE_BYTES}" }}
#         parameters {{ key: "trt_engine_cache_enable" value: "true" }}
#       }}
#     ]
#   }}
# }}

"""


def split_config(text: str, path: Path) -> tuple[str, str]:
    """``(before, after)`` the export block of an existing config; exactly one block required."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN_MARKER]
    ends = [i for i, line in enumerate(lines) if line.strip() == END_MARKER]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ConfigError(
            f"{path}: cannot tell the export's part from yours: expected one block between "
            f"'{BEGIN_MARKER}' and '{END_MARKER}'. Restore the markers around the input, output, "
            "contract parameters and model_warmup, or move the file away to get a fresh template"
        )
    return "".join(lines[: begins[0]]), "".join(lines[ends[0] + 1 :])


def check_existing(path: Path, name: str) -> None:
    """Refuse early an existing config that a re-export could not update."""
    if path.exists():
        _user_part(path, name)


def _user_part(path: Path, name: str) -> tuple[str, str, Any]:
    """``(before, after, parsed)``: the user-owned text around the export block.

    A new file gets the template.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    if path.exists():
        try:
            before, after = split_config(path.read_text(), path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    else:
        before, after = template(name), ""
    try:
        user_config = text_format.Parse(before + after, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(
            f"{path}: the part outside the export block does not parse: {exc}"
        ) from exc
    _check_user_part(user_config, path, name)
    return before, after, user_config


def compose_config(path: Path, name: str, spec: BlockSpec) -> str:
    """The new config text: the user's part kept verbatim, the export block rewritten.

    All of it is checked.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    before, after, user_config = _user_part(path, name)
    with_optimization = not user_config.HasField("optimization")
    if spec.tensorrt_int8 and not with_optimization:
        log.warning(
            "%s has its own optimization block: add the TensorRT INT8 accelerator there yourself "
            "(precision_mode INT8) to run this INT8 model with TensorRT",
            path,
        )
    if before and not before.endswith("\n"):
        before += "\n"
    text = before + render_block(spec, with_optimization) + after
    try:
        config = text_format.Parse(text, mc.ModelConfig())
        ModelContract.from_config(config)
    except (text_format.ParseError, ModelContractError) as exc:
        raise ConfigError(f"{path}: the composed config is not valid: {exc}") from exc
    return text


def _check_user_part(config: Any, path: Path, name: str) -> None:
    """The user's part must not also define what the export owns."""
    clashes = []
    if len(config.input) or len(config.output):
        clashes.append("input/output")
    if len(config.model_warmup):
        clashes.append("model_warmup")
    clashes += [key for key in CONTRACT_PARAMS if key in config.parameters]
    if clashes:
        raise ConfigError(
            f"{path}: {', '.join(clashes)} defined outside the export block; "
            "the export owns these: remove them there"
        )
    if config.name and config.name != name:
        raise ConfigError(f"{path}: name is {config.name!r} but the model folder is {name!r}")
    if config.max_batch_size < 1:
        raise ConfigError(f"{path}: max_batch_size must be >= 1 (the model has a batch axis)")


def install(model_files: list[Path], model_dir: Path, config_text: str) -> Path:
    """Put the validated model files in ``model_dir/1/`` and the config beside it, atomically.

    The version folder is staged next to its final place (same filesystem),
    then swapped in by rename, so Triton never sees a half-written model or a
    model without its external-data file. The config follows, written atomically.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = model_dir / f".staging-{token}"
    version_dir = model_dir / VERSION
    retired = model_dir / f".retired-{token}"
    try:
        staging.mkdir()
        for src in model_files:
            shutil.copyfile(src, staging / src.name)
            with open(staging / src.name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staging)
        if version_dir.exists():
            os.rename(version_dir, retired)
        os.rename(staging, version_dir)
        fsync_dir(model_dir)
    except OSError as exc:
        if retired.exists() and not version_dir.exists():
            os.rename(retired, version_dir)
        raise ExportError(f"{model_dir}: cannot install the model: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(retired)
    write_config(model_dir / CONFIG_NAME, config_text)
    return version_dir / model_files[0].name


def write_config(path: Path, text: str) -> None:
    """Atomic write, world-readable like the model files (Triton may run as another user)."""
    umask = os.umask(0)
    os.umask(umask)
    with atomic_write(path, "w") as fh:
        fh.write(text)
        os.fchmod(fh.fileno(), 0o666 & ~umask)
