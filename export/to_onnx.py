#!/usr/bin/env python
"""Export MERT to a validated ONNX model and its Triton config: ``python export/to_onnx.py --help``.

The script folder is not an installed package: this file puts the repository
root on ``sys.path`` so that ``export.*`` (and the installed ``client`` and
``indexer``) import the same way from the CLI and from the tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from export.options import (  # noqa: E402
    DEFAULT_CALIBRATION_WINDOWS,
    DEFAULT_HUB_MODEL,
    DEFAULT_LAYERS,
    DEFAULT_VALIDATION_WINDOWS,
    INPUT_DTYPES,
    INT8_METHODS,
    INT8_TARGETS,
    PRECISIONS,
    SIZES,
    ExportOptions,
)
from mert_indexer.contract import DEFAULT_WINDOW_SECONDS, MODEL_NAME  # noqa: E402
from mert_indexer.errors import IndexerError  # noqa: E402

DESCRIPTION = """\
Export MERT (a HuBERT-architecture music model) to ONNX with per-window
normalisation and layer pooling inside the graph, validate it against PyTorch,
and write REPO/NAME/1/model.onnx and REPO/NAME/config.pbtxt for Triton.
Nothing is written unless every validation gate passes."""

EPILOG = f"""\
weights:
  default               {DEFAULT_HUB_MODEL} from the Hugging Face hub (CC-BY-NC-4.0)
  --model DIR           a local checkpoint folder (config.json with model_type
                        mert_model, plus model.safetensors or pytorch_model.bin)
  --random-init         untrained weights of the exact architecture (loud:
                        embeddings are meaningless); --size tiny is for tests

layers (hidden-state indices; 0 = encoder input, L = last layer):
  all (default)         0..L, each averaged over time, then averaged together:
                        early layers keep timbre, late ones musical context
  6 | 4-8 | 1,6,12      a subset; the graph stops at the deepest layer used
                        (95M, layer 6 only: ~75 instead of 109 GFLOP a window)

gates (before anything is written):
  fp32                  relative L2 <= 1e-4 against PyTorch
  fp16, int8            cosine >= 0.99 for >= 99% of the validation windows, and
                        the same nearest neighbour as fp32 PyTorch for >= 95%

int8:
  --int8-target cpu     uint8 activations, per-tensor weights: fast on ONNX
                        Runtime CPU; falls back to dynamic MatMul-only INT8
  --int8-target gpu     symmetric int8, per-channel weights for TensorRT; the
                        config gets the TensorRT INT8 accelerator
                        (the conv feature extractor stays fp32 in both)

examples:
  python export/to_onnx.py --random-init --size tiny --output /tmp/repo
  python export/to_onnx.py --model ~/ckpt/MERT-v1-95M --precision int8 --calibration data/originals
"""


def parse_args(argv: list[str] | None) -> ExportOptions:
    parser = argparse.ArgumentParser(
        prog="export/to_onnx.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help=f"hub id or local folder (default {DEFAULT_HUB_MODEL})")
    source.add_argument("--random-init", action="store_true", help="untrained weights (see --size)")
    parser.add_argument(
        "--size", choices=SIZES, default="95m", help="architecture for --random-init"
    )
    parser.add_argument(
        "--layers", default=DEFAULT_LAYERS, help="hidden states to pool (default: all)"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument(
        "--int8-method",
        choices=INT8_METHODS,
        default="auto",
        help=(
            "auto: static QDQ; for the cpu target falling back to dynamic MatMul-only "
            "if it fails validation"
        ),
    )
    parser.add_argument(
        "--int8-target",
        choices=INT8_TARGETS,
        default="cpu",
        help="cpu: fast on ONNX Runtime CPU (uint8 activations); gpu: TensorRT INT8 "
        "(symmetric int8, per-channel) plus the TensorRT accelerator in the config",
    )
    parser.add_argument(
        "--input-dtype", choices=INPUT_DTYPES, default="int16", help="PCM type clients send"
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="audio files for static INT8 calibration (default: synthetic music-like windows)",
    )
    parser.add_argument(
        "--calibration-windows",
        type=int,
        default=DEFAULT_CALIBRATION_WINDOWS,
        help="windows used for static INT8 calibration (default %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("model_repository"),
        metavar="REPO",
        help="model repository root (default %(default)s)",
    )
    parser.add_argument("--name", default=MODEL_NAME, help="model folder and Triton model name")
    parser.add_argument(
        "--window-seconds",
        type=float,
        default=DEFAULT_WINDOW_SECONDS,
        help="window length the graph takes (default %(default)s)",
    )
    parser.add_argument(
        "--validation-windows",
        type=int,
        default=DEFAULT_VALIDATION_WINDOWS,
        help="windows for the fp16/int8 gates (fp32 uses at most 32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random-init weights")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    args = parser.parse_args(argv)
    if args.size != "95m" and not args.random_init:
        parser.error("--size applies to --random-init only")
    if args.calibration is not None and args.precision != "int8":
        parser.error("--calibration applies to --precision int8 only")
    if args.int8_target == "gpu" and args.int8_method == "dynamic":
        parser.error(
            "dynamic INT8 runs on CPU only: --int8-target gpu needs --int8-method static or auto"
        )
    configure_logging(args.quiet)
    return ExportOptions(
        model=args.model,
        random_init=args.random_init,
        size=args.size,
        layers=args.layers,
        precision=args.precision,
        int8_method=args.int8_method,
        int8_target=args.int8_target,
        input_dtype=args.input_dtype,
        calibration_dir=args.calibration,
        calibration_windows=args.calibration_windows,
        output=args.output,
        name=args.name,
        window_seconds=args.window_seconds,
        validation_windows=args.validation_windows,
        seed=args.seed,
    )


class _ThirdPartyNoise(logging.Filter):
    """Drop what the exporter's optimiser and ONNX Runtime's quantiser narrate.

    Both log on the root logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        path = record.pathname.replace("\\", "/")
        return not any(part in path for part in ("/onnxruntime/", "/onnxscript/", "/onnx_ir/"))


class _Formatter(logging.Formatter):
    """Plain progress lines; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname}: {message}" if record.levelno >= logging.WARNING else message


def configure_logging(quiet: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    if any(isinstance(f, _ThirdPartyNoise) for h in root.handlers for f in h.filters):
        return  # main() called again in the same process
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    handler.addFilter(_ThirdPartyNoise())
    root.addHandler(handler)
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_args(argv)
        from export.runner import run_export

        result = run_export(options)
    except IndexerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"{result.model_path} ({result.report.summary()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
