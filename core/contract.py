"""The contract between the exported model, the server, the client and the index.

The served model's ``config.pbtxt`` is the single source of truth: the export
writes the identity of the model (weights, layers, window, sample rate, ...)
as ``parameters``; the client reads them back from the server with
``get_model_config`` and the index records them. Nothing here is re-typed
elsewhere: other modules import these names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mert_indexer.errors import ConfigError, ModelContractError

MODEL_NAME = "mert"
INPUT_NAME = "AUDIO"
OUTPUT_NAME = "EMBEDDING"
CONTRACT_VERSION = "1"

DEFAULT_SAMPLE_RATE = 24_000
DEFAULT_WINDOW_SECONDS = 5.0

# Keys of the contract parameters in config.pbtxt and in the ONNX metadata.
PARAM_PREFIX = "indexer."
P_CONTRACT_VERSION = PARAM_PREFIX + "contract_version"
P_MODEL_ID = PARAM_PREFIX + "model_id"
P_WEIGHTS_SHA256 = PARAM_PREFIX + "weights_sha256"
P_LAYERS = PARAM_PREFIX + "layers"
P_POOLING = PARAM_PREFIX + "pooling"
P_WINDOW_SAMPLES = PARAM_PREFIX + "window_samples"
P_SAMPLE_RATE = PARAM_PREFIX + "sample_rate"
P_EMBEDDING_DIM = PARAM_PREFIX + "embedding_dim"
P_PRECISION = PARAM_PREFIX + "precision"
CONTRACT_PARAMS = (
    P_CONTRACT_VERSION,
    P_MODEL_ID,
    P_WEIGHTS_SHA256,
    P_LAYERS,
    P_POOLING,
    P_WINDOW_SAMPLES,
    P_SAMPLE_RATE,
    P_EMBEDDING_DIM,
    P_PRECISION,
)

# Triton data type names <-> numpy dtype names, for the input and output.
TRITON_TO_NUMPY = {"TYPE_INT16": "int16", "TYPE_FP32": "float32", "TYPE_FP16": "float16"}
NUMPY_TO_TRITON = {v: k for k, v in TRITON_TO_NUMPY.items()}
# Wire names used by tritonclient's InferInput ("INT16", "FP32", ...).
NUMPY_TO_WIRE = {"int16": "INT16", "float32": "FP32", "float16": "FP16"}


@dataclass(frozen=True)
class ModelContract:
    """What a client needs to know about the served model, read from its config."""

    model_name: str
    input_name: str
    input_dtype: str  # numpy dtype name: "int16" or "float32"
    output_name: str
    window_samples: int
    sample_rate: int
    embedding_dim: int
    max_batch_size: int
    model_id: str
    weights_sha256: str
    layers: tuple[int, ...]
    pooling: str
    precision: str

    @property
    def window_seconds(self) -> float:
        return self.window_samples / self.sample_rate

    @property
    def wire_dtype(self) -> str:
        return NUMPY_TO_WIRE[self.input_dtype]

    def identity(self) -> dict[str, Any]:
        """What makes two embeddings comparable; recorded by every index.

        Precision is left out on purpose: an fp16 or INT8 export of the same
        weights passed the retrieval-agreement gate against fp32, so its
        embeddings may share an index with the fp32 model's.
        """
        return {
            "model_id": self.model_id,
            "weights_sha256": self.weights_sha256,
            "layers": list(self.layers),
            "pooling": self.pooling,
            "window_samples": self.window_samples,
            "sample_rate": self.sample_rate,
            "embedding_dim": self.embedding_dim,
        }

    def fingerprint(self) -> str:
        """A short stable hash of :meth:`identity`."""
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_config(cls, config: Any) -> ModelContract:
        """Build from a Triton ``ModelConfig`` protobuf message.

        Raises :class:`ModelContractError` naming what is missing or wrong.
        """
        name = config.name or MODEL_NAME
        params = {k: v.string_value for k, v in config.parameters.items()}
        missing = [p for p in CONTRACT_PARAMS if p not in params]
        if missing:
            raise ModelContractError(
                f"model {name!r} lacks contract parameters {', '.join(missing)}: "
                "was it exported by export/to_onnx.py?"
            )
        if params[P_CONTRACT_VERSION] != CONTRACT_VERSION:
            raise ModelContractError(
                f"model {name!r} speaks contract version {params[P_CONTRACT_VERSION]}, "
                f"this client speaks {CONTRACT_VERSION}"
            )
        if len(config.input) != 1 or len(config.output) != 1:
            raise ModelContractError(f"model {name!r} must have exactly one input and one output")
        inp, out = config.input[0], config.output[0]
        from tritonclient.grpc import model_config_pb2 as mc

        in_type = mc.DataType.Name(inp.data_type)
        if in_type not in TRITON_TO_NUMPY:
            raise ModelContractError(f"model {name!r}: unsupported input type {in_type}")
        try:
            contract = cls(
                model_name=name,
                input_name=inp.name,
                input_dtype=TRITON_TO_NUMPY[in_type],
                output_name=out.name,
                window_samples=int(params[P_WINDOW_SAMPLES]),
                sample_rate=int(params[P_SAMPLE_RATE]),
                embedding_dim=int(params[P_EMBEDDING_DIM]),
                max_batch_size=int(config.max_batch_size),
                model_id=params[P_MODEL_ID],
                weights_sha256=params[P_WEIGHTS_SHA256],
                layers=parse_layers(params[P_LAYERS]),
                pooling=params[P_POOLING],
                precision=params[P_PRECISION],
            )
        except ValueError as exc:
            raise ModelContractError(f"model {name!r}: bad contract parameter: {exc}") from exc
        if list(inp.dims) != [contract.window_samples]:
            raise ModelContractError(
                f"model {name!r}: input dims {list(inp.dims)} do not match "
                f"window_samples {contract.window_samples}"
            )
        if list(out.dims) != [contract.embedding_dim]:
            raise ModelContractError(
                f"model {name!r}: output dims {list(out.dims)} do not match "
                f"embedding_dim {contract.embedding_dim}"
            )
        return contract


def format_layers(layers: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(i) for i in layers)


def parse_layers(text: str) -> tuple[int, ...]:
    layers = tuple(int(p) for p in text.split(",") if p.strip())
    if not layers:
        raise ValueError(f"empty layer list {text!r}")
    return layers


def load_config(path: Path) -> Any:
    """Parse a ``config.pbtxt`` into Triton's own ``ModelConfig`` message."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read model config: {exc.strerror}") from exc
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: not a valid Triton model config: {exc}") from exc


def dump_config(config: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def config_from_json(config_json: dict[str, Any]) -> Any:
    """Turn ``get_model_config(as_json=True)['config']`` back into the protobuf."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as mc

    return json_format.ParseDict(config_json, mc.ModelConfig(), ignore_unknown_fields=True)
