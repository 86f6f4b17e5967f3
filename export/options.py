"""What one export run is asked to do: options as frozen dataclasses, plus the layer-spec grammar.

Argument parsing lives in ``to_onnx.py``; everything below it receives an
:class:`ExportOptions` and never looks at ``sys.argv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mert_indexer.contract import DEFAULT_WINDOW_SECONDS, MODEL_NAME
from mert_indexer.errors import ConfigError

DEFAULT_HUB_MODEL = "m-a-p/MERT-v1-95M"
HUB_MODELS = ("m-a-p/MERT-v1-95M", "m-a-p/MERT-v1-330M")
SIZES = ("95m", "330m", "tiny")
PRECISIONS = ("fp32", "fp16", "int8")
INT8_METHODS = ("auto", "static", "dynamic")
INT8_TARGETS = ("cpu", "gpu")
INPUT_DTYPES = ("int16", "float32")

# Default pooling: every hidden state (the projected features after the
# positional convolution, then each transformer layer) averaged over time, then
# averaged over layers. MERT's own examples average all layers; using all of
# them keeps both low-level timbre (early layers) and musical context (late
# layers), which is what "which track is this clip from" needs.
DEFAULT_LAYERS = "all"
POOLING = "mean_time_mean_layers"

DEFAULT_VALIDATION_WINDOWS = 256
DEFAULT_CALIBRATION_WINDOWS = 64  # 5 min of audio: with 32 the tiny model sat at the gate


@dataclass(frozen=True)
class ExportOptions:
    """One export: which weights, which graph, which precision, where to."""

    model: str | None = None  # hub id or local folder; None with random_init
    random_init: bool = False
    size: str = "95m"  # architecture for random_init
    layers: str = DEFAULT_LAYERS
    precision: str = "fp32"
    int8_method: str = "auto"  # static QDQ, falling back (CPU target) to dynamic MatMul-only
    int8_target: str = "cpu"  # cpu: fast on ONNX Runtime CPU; gpu: TensorRT explicit quantisation
    input_dtype: str = "int16"
    calibration_dir: Path | None = None
    calibration_windows: int = DEFAULT_CALIBRATION_WINDOWS
    output: Path = Path("model_repository")
    name: str = MODEL_NAME
    window_seconds: float = DEFAULT_WINDOW_SECONDS
    validation_windows: int = DEFAULT_VALIDATION_WINDOWS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.random_init and self.model is not None:
            raise ConfigError("--random-init builds an untrained model: do not also give --model")
        if self.size not in SIZES:
            raise ConfigError(f"unknown size {self.size!r}; choose one of {', '.join(SIZES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}")
        if self.int8_method not in INT8_METHODS:
            raise ConfigError(f"unknown INT8 method {self.int8_method!r}")
        if self.int8_target not in INT8_TARGETS:
            raise ConfigError(f"unknown INT8 target {self.int8_target!r}")
        if self.int8_target == "gpu" and self.int8_method == "dynamic":
            raise ConfigError(
                "dynamic INT8 runs on CPU only: use --int8-target cpu, or static for GPUs"
            )
        if self.input_dtype not in INPUT_DTYPES:
            raise ConfigError(f"unknown input dtype {self.input_dtype!r}")
        if self.window_seconds <= 0:
            raise ConfigError("--window-seconds must be positive")
        if self.validation_windows < 8:
            raise ConfigError("--validation-windows must be at least 8 for a meaningful check")
        if self.calibration_windows < 1:
            raise ConfigError("--calibration-windows must be at least 1")
        if self.calibration_dir is not None and self.precision != "int8":
            raise ConfigError("--calibration only applies to --precision int8")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"bad model name {self.name!r}")

    @property
    def model_source(self) -> str:
        """The hub id or folder to load, the hub default when none was given."""
        return self.model if self.model is not None else DEFAULT_HUB_MODEL


def parse_layer_spec(spec: str, num_layers: int) -> tuple[int, ...]:
    """Turn ``all``, ``6``, ``4-8``, ``1,6,12`` or ``0,4-6`` into sorted hidden-state indices.

    Index 0 is the encoder input (after the positional convolution), index
    ``i`` the output of transformer layer ``i``; ``num_layers`` is the deepest.
    """
    text = spec.strip().lower()
    if text == "all":
        return tuple(range(num_layers + 1))
    if text == "last":
        return (num_layers,)
    picked: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if lo > hi:
                    raise ValueError
                picked.update(range(lo, hi + 1))
            else:
                picked.add(int(part))
        except ValueError:
            raise ConfigError(
                f"bad layer spec {spec!r}: use 'all', 'last', '6', '4-8' or '1,6,12'"
            ) from None
    if not picked:
        raise ConfigError(f"bad layer spec {spec!r}: no layers selected")
    out_of_range = sorted(i for i in picked if not 0 <= i <= num_layers)
    if out_of_range:
        raise ConfigError(
            f"layer(s) {out_of_range} out of range: this model has hidden states 0..{num_layers}"
        )
    return tuple(sorted(picked))
