#!/usr/bin/env python
"""Measure a checkpoint's shift tolerance and retrieval: ``python export/eval_standin.py --help``.

Works on any MERT-format folder (the stand-in, or a local MERT copy) and, with
``--random-init SIZE``, on the untrained architecture, so the numbers of
``export/standin/training.json`` can be compared with a baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from export.standin import COMMITTED  # noqa: E402
from export.standin_eval import EvalSpec  # noqa: E402
from mert_indexer.errors import IndexerError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="export/eval_standin.py",
        description="Shift tolerance, window retrieval and clip identification on a music folder "
        "(freedroidrpg-data: train and held-apart tracks reported separately).",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=COMMITTED, help="checkpoint folder")
    source.add_argument("--random-init", choices=("95m", "330m", "tiny"), help="untrained model")
    parser.add_argument("--music", type=Path, required=True, help="folder of audio files")
    parser.add_argument("--queries", type=int, default=EvalSpec.queries, help="per track")
    parser.add_argument("--clips", type=int, default=EvalSpec.clips, help="per track")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import torch

    from export import mert, standin_data, standin_eval
    from export.graph import PooledMert

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.random_init:
            loaded = mert.random_model(args.random_init, seed=0)
        else:
            loaded = mert.load_local(args.model)
        split = standin_data.split(standin_data.audio_files(args.music))
        tracks = standin_data.load_tracks(split.train + split.held_out)
    except IndexerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    roles = {p.stem: "train" for p in split.train} | {p.stem: "held_out" for p in split.held_out}
    pooled = PooledMert(loaded.model, tuple(range(loaded.num_layers + 1)), "float32").eval()
    spec = EvalSpec(queries=args.queries, clips=args.clips)
    result = standin_eval.evaluate(pooled, tracks, roles, spec)
    print(json.dumps({"model_id": loaded.model_id, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
