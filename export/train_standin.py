#!/usr/bin/env python
"""Train the MERT-architecture stand-in: ``python export/train_standin.py --help``.

The script folder is not an installed package: this file puts the repository
root on ``sys.path`` so that ``export.*`` imports the same way from the CLI and
from the tests.
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

from export.standin import HELD_OUT_TRACKS, MODEL_ID  # noqa: E402
from export.standin_data import BatchSpec  # noqa: E402
from export.standin_train import TrainOptions, default_threads, train  # noqa: E402
from mert_indexer.errors import IndexerError  # noqa: E402

DESCRIPTION = f"""\
Train a small model of the MERT/HuBERT architecture ({MODEL_ID}: NOT MERT)
from scratch on CPU, contrastively for identification, and write a checkpoint
folder in MERT's format that export/to_onnx.py --model DIR exports unchanged."""

EPILOG = f"""\
data:
  --music DIR     audio files; with freedroidrpg-data (scripts/get_music.sh) the
                  tracks {", ".join(HELD_OUT_TRACKS)} are held apart (never trained
                  on) and validated on; any other folder is all training material

length (at least one):
  --steps N       deterministic for a seed on one machine and thread count
  --minutes M     a wall-time cap; alone, the step count depends on the machine
                  and its load (training.json records the steps done)

hard negatives:
  --hard-negatives K  of each track's --per-track windows in a batch, K are the
                  places the current weights confuse with the others (re-mined
                  every --mine-every steps on a --mine-grid grid; literal
                  repeats are never drawn)

examples:
  scripts/get_music.sh data/music
  python export/train_standin.py --music data/music --out export/standin --steps 600
  python export/train_standin.py --music data/music --out DIR --init export/standin \\
      --minutes 48 --per-track 8 --max-shift 0.3 --phase-twins 8 --hard-negatives 4
"""


def parse_args(argv: list[str] | None) -> TrainOptions:
    parser = argparse.ArgumentParser(
        prog="export/train_standin.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--music", type=Path, required=True, help="folder of audio files")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--steps", type=int, help="optimisation steps")
    parser.add_argument("--minutes", type=float, help="wall-time cap on the training loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init", type=Path, help="continue from a stand-in checkpoint (default: from scratch)"
    )
    parser.add_argument("--pairs", type=int, default=BatchSpec.pairs, help="pairs per batch")
    parser.add_argument(
        "--per-track", type=int, default=BatchSpec.per_track, help="windows of one track per batch"
    )
    parser.add_argument(
        "--max-shift",
        type=float,
        default=BatchSpec.max_shift_s,
        help="seconds a positive may be cut earlier or later than its anchor (any sample)",
    )
    parser.add_argument(
        "--phase-twins",
        type=int,
        default=BatchSpec.phase_twins,
        help="anchors per batch that also get a clean twin a sub-frame shift later",
    )
    parser.add_argument(
        "--phase-weight",
        type=float,
        default=TrainOptions.phase_weight,
        help="weight of the phase-consistency term",
    )
    parser.add_argument(
        "--hard-negatives",
        type=int,
        default=BatchSpec.hard_negatives,
        help="windows of each track group that are mined confusers of the others "
        "(at most half of --per-track; 0: none)",
    )
    parser.add_argument(
        "--mine-every",
        type=int,
        default=TrainOptions.mine_every,
        help="steps between re-mining the confusers with the current weights",
    )
    parser.add_argument(
        "--mine-grid",
        type=float,
        default=TrainOptions.mine_grid_s,
        help="seconds between the mined positions of a track",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=TrainOptions.checkpoint_every,
        help="steps between checkpoints written to --out (0: only at the end); a run that "
        "dies can go on with --init OUT",
    )
    parser.add_argument(
        "--lr", type=float, default=TrainOptions.learning_rate, help="peak learning rate"
    )
    parser.add_argument("--temperature", type=float, default=TrainOptions.temperature)
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch threads")
    parser.add_argument("--no-validate", action="store_true", help="skip the final validation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.steps is None and args.minutes is None:
        parser.error("give --steps, --minutes or both")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    return TrainOptions(
        music=args.music,
        out=args.out,
        steps=args.steps,
        minutes=args.minutes,
        seed=args.seed,
        init=args.init,
        batch=BatchSpec(
            pairs=args.pairs,
            per_track=args.per_track,
            max_shift_s=args.max_shift,
            phase_twins=args.phase_twins,
            hard_negatives=args.hard_negatives,
        ),
        phase_weight=args.phase_weight,
        mine_every=args.mine_every,
        mine_grid_s=args.mine_grid,
        checkpoint_every=args.checkpoint_every,
        learning_rate=args.lr,
        temperature=args.temperature,
        threads=args.threads,
        validate=not args.no_validate,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_args(argv)
        result = train(options)
    except IndexerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t = result.training
    print(
        f"wrote {result.folder} ({MODEL_ID}, {t['parameters']:,} parameters, "
        f"{t['weights_mb_fp32']} MB fp32): {t['steps_done']} steps in {t['train_seconds']} s, "
        f"final loss {t['final_loss']}"
    )
    if t["validation"] is not None:
        print(json.dumps(t["validation"]["roles"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
