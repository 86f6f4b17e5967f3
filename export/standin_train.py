"""Train the stand-in from scratch on CPU, contrastively, for identification.

The trained function is exactly what the export serves: ``export.graph.PooledMert``
(per-window normalisation, every hidden state mean-pooled over time, averaged
over layers) on 5 s windows, float input. No projection head: the loss sees
the served embedding, centred on the batch mean (the index compares vectors
around the catalogue mean) and L2-normalised. Loss: NT-Xent / InfoNCE over
the 2N views of N (clean, shifted + degraded) pairs, every other view in the
batch a negative (Chang et al. 2021, "Neural audio fingerprint").

Determinism: weights init, batches and augmentation are fixed by the seed
(``standin_data.batch``), so ``--steps N`` gives the same weights for a seed
on the same machine and thread count (CPU float reductions depend on the
thread split). With ``--steps`` the learning-rate schedule runs over the
steps; a ``--minutes`` cap then only stops early. Without ``--steps`` the
schedule runs over the wall time, so the step count (recorded in
``training.json``) depends on the machine and its load.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export import standin, standin_data, standin_eval, standin_mining
from mert_indexer.errors import ConfigError

log = logging.getLogger(__name__)


def default_threads() -> int:
    """The CPUs this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class TrainOptions:
    """One training run."""

    music: Path
    out: Path
    steps: int | None = None
    minutes: float | None = None
    seed: int = 0
    init: Path | None = None  # continue from a stand-in checkpoint instead of random init
    batch: standin_data.BatchSpec = field(default_factory=standin_data.BatchSpec)
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    temperature: float = 0.05
    phase_weight: float = 10.0  # of the phase-consistency term, when the batch has twins
    # With batch.hard_negatives: confusers re-mined with the current weights every so many steps.
    mine_every: int = 200
    mine_grid_s: float = 1.0
    # The weights so far are written to ``out`` every so many steps (0: only at the end), so a
    # run that dies (killed, out of memory, a bad file) can go on with ``--init out``.
    checkpoint_every: int = 200
    threads: int = field(default_factory=default_threads)
    validate: bool = True
    eval_spec: standin_eval.EvalSpec = field(default_factory=standin_eval.EvalSpec)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ConfigError("give --steps, --minutes or both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("--steps must be at least 1")
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError("--minutes must be positive")
        if self.batch.pairs < 2:
            raise ConfigError("a contrastive batch needs at least 2 pairs")
        if self.batch.per_track < 1:
            raise ConfigError("--per-track must be at least 1")
        if self.threads < 1:
            raise ConfigError("--threads must be at least 1")
        if not 0 < self.temperature <= 1:
            raise ConfigError("--temperature must be in (0, 1]")
        if self.batch.phase_twins < 0 or self.batch.phase_twins > self.batch.pairs:
            raise ConfigError(f"--phase-twins must be in 0..{self.batch.pairs} (the pairs)")
        if self.phase_weight < 0:
            raise ConfigError("--phase-weight must not be negative")
        if not 0 <= self.batch.hard_negatives <= self.batch.per_track // 2:
            raise ConfigError(
                f"--hard-negatives must be in 0..{self.batch.per_track // 2} (half of --per-track)"
            )
        if self.mine_every < 1:
            raise ConfigError("--mine-every must be at least 1")
        if self.mine_grid_s <= 0:
            raise ConfigError("--mine-grid must be positive")
        if self.checkpoint_every < 0:
            raise ConfigError("--checkpoint-every must not be negative")


@dataclass(frozen=True)
class TrainResult:
    """Where the checkpoint went and what ``training.json`` says."""

    folder: Path
    training: dict[str, Any]


def nt_xent(anchors: Any, positives: Any, temperature: float) -> Any:
    """InfoNCE over 2N views: each view's positive is its pair, the other 2N-2 are negatives."""
    import torch
    import torch.nn.functional as F

    views = torch.cat([anchors, positives], dim=0)
    views = F.normalize(views - views.mean(dim=0, keepdim=True), dim=-1)
    logits = views @ views.T / temperature
    n = anchors.shape[0]
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


def phase_consistency(views: Any, anchors: Any, twins: Any) -> Any:
    """Mean ``1 - cos`` between anchors and their sub-frame-shifted twins, around the views' mean.

    A window and the same audio a fraction of a 320-sample frame later should
    embed alike: the strided convolutions alias, and a query never shares the
    indexed window's frame phase.
    """
    import torch.nn.functional as F

    mean = views.mean(dim=0, keepdim=True)
    a = F.normalize(anchors[: len(twins)] - mean, dim=-1)
    b = F.normalize(twins - mean, dim=-1)
    return (1.0 - (a * b).sum(dim=-1)).mean()


def learning_rate(options: TrainOptions, step: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine decay to 5% over the steps (or, without --steps, the minutes)."""
    if step < options.warmup_steps:
        return options.learning_rate * (step + 1) / options.warmup_steps
    if options.steps is not None:
        progress = step / options.steps
    else:
        assert options.minutes is not None
        progress = elapsed_s / (options.minutes * 60)
    progress = min(1.0, max(0.0, progress))
    return options.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def torch_settings(threads: int) -> Iterator[None]:
    """``threads`` torch threads and deterministic algorithms for one run; restored afterwards."""
    import torch

    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn)


def train(options: TrainOptions) -> TrainResult:
    """Train, validate (held-apart tracks, when the folder has them), write the checkpoint."""
    with torch_settings(options.threads):
        return _train(options)


def _train(options: TrainOptions) -> TrainResult:
    import torch

    from export.graph import PooledMert

    files = standin_data.audio_files(options.music)
    split = standin_data.split(files)
    log.info(
        "training on %d files, %d held apart (never trained on)",
        len(split.train),
        len(split.held_out),
    )
    train_tracks = standin_data.load_tracks(split.train)
    hubert = standin.build_model(options.seed)
    init = None
    if options.init is not None:
        init = warm_start(hubert, options.init)
    layers = tuple(range(hubert.config.num_hidden_layers + 1))
    pooled = PooledMert(hubert, layers, "float32").train()
    params = sum(p.numel() for p in hubert.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(pooled.parameters(), lr=options.learning_rate, weight_decay=1e-4)

    data = {  # hashed once, not at every checkpoint
        "train": [
            {"file": p.name, "sha256": t.sha256}
            for p, t in zip(split.train, train_tracks, strict=True)
        ],
        "held_out": [
            {"file": p.name, "sha256": standin_data.file_sha256(p)} for p in split.held_out
        ],
    }
    record = functools.partial(training_record, options, init=init, params=params, data=data)

    def snapshot(steps_done: int, losses: list[float], seconds: float) -> None:
        standin.write_checkpoint(
            options.out, hubert, record(steps_done, losses, seconds, "checkpoint", None)
        )
        log.info("checkpoint after %d steps written to %s", steps_done, options.out)

    started = time.monotonic()
    losses, steps_done, stopped_by = run_steps(
        options, pooled, optimizer, train_tracks, started, snapshot
    )
    train_seconds = time.monotonic() - started

    validation = None
    if options.validate:
        held_tracks = standin_data.load_tracks(split.held_out)
        roles = {t.name: "train" for t in train_tracks} | {t.name: "held_out" for t in held_tracks}
        log.info("validating on %d tracks", len(roles))
        validation = standin_eval.evaluate(
            pooled, train_tracks + held_tracks, roles, options.eval_spec
        )
    training = record(steps_done, losses, train_seconds, stopped_by, validation)
    written = standin.write_checkpoint(options.out, hubert, training)
    return TrainResult(options.out, written)


def training_record(
    options: TrainOptions,
    steps_done: int,
    losses: list[float],
    seconds: float,
    stopped_by: str,
    validation: dict[str, Any] | None,
    *,
    init: dict[str, Any] | None,
    params: int,
    data: dict[str, list[dict[str, str]]],
) -> dict[str, Any]:
    """What ``training.json`` says of a run (``stopped_by`` "checkpoint": one still going)."""
    import torch

    tail = losses[-10:]
    return {
        "note": standin.README_NOTE,
        "seed": options.seed,
        "init": init,
        "steps_requested": options.steps,
        "minutes_cap": options.minutes,
        "steps_done": steps_done,
        "total_steps": steps_done + int((init or {}).get("total_steps") or 0),
        "stopped_by": stopped_by,
        "train_seconds": round(seconds, 1),
        "threads": options.threads,
        "torch": torch.__version__,
        "parameters": params,
        "weights_mb_fp32": round(params * 4 / 2**20, 2),
        "objective": {
            "loss": "NT-Xent over 2N views, served embedding centred on the batch mean"
            + (" + phase consistency (sub-frame twins)" if options.batch.phase_twins else ""),
            "temperature": options.temperature,
            "phase_weight": options.phase_weight if options.batch.phase_twins else None,
            "mining": (
                {"every_steps": options.mine_every, "grid_s": options.mine_grid_s}
                if options.batch.hard_negatives
                else None
            ),
            "learning_rate": options.learning_rate,
            "warmup_steps": options.warmup_steps,
            "batch": asdict(options.batch),
        },
        "data": data,
        "final_loss": round(float(np.mean(tail)), 4) if tail else None,
        "loss_every_10_steps": [
            round(float(np.mean(losses[i : i + 10])), 4) for i in range(0, len(losses), 10)
        ],
        "validation": validation,
    }


def warm_start(hubert: Any, folder: Path) -> dict[str, Any]:
    """Load a stand-in checkpoint's weights into ``hubert``; what training.json records of it."""
    from export.mert import load_local, load_state, read_weights

    loaded = load_local(folder)
    if loaded.model_id != standin.MODEL_ID:
        raise ConfigError(f"--init {folder}: {loaded.model_id!r} is not the stand-in")
    load_state(hubert, read_weights(folder), folder)
    previous = folder / "training.json"
    steps = None
    if previous.is_file():
        record = json.loads(previous.read_text())
        steps = record.get("total_steps") or record.get("steps_done")
    return {"weights_sha256": loaded.weights_sha256, "total_steps": steps}


def mine_confusers(
    pooled: Any, tracks: list[standin_data.Track], grid_s: float
) -> standin_mining.Confusers:
    """Each track's most confusable places under the current weights (eval mode, no grad)."""
    import torch

    def embed(windows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return pooled(torch.from_numpy(np.ascontiguousarray(windows))).numpy()

    started = time.monotonic()
    pooled.eval()
    try:
        confusers = standin_mining.mine([(t.name, t.audio) for t in tracks], embed, grid_s=grid_s)
    finally:
        pooled.train()
    log.info("mined confusers in %.1f s", time.monotonic() - started)
    return confusers


def run_steps(
    options: TrainOptions,
    pooled: Any,
    optimizer: Any,
    tracks: list[standin_data.Track],
    started: float,
    snapshot: Callable[[int, list[float], float], None] | None = None,
) -> tuple[list[float], int, str]:
    """The optimisation loop: (losses, steps done, what stopped it: "steps" or "minutes").

    ``snapshot(steps, losses, seconds)`` is called every ``options.checkpoint_every`` steps.
    """
    import torch
    from tqdm import tqdm

    deadline = started + options.minutes * 60 if options.minutes is not None else math.inf
    losses: list[float] = []
    bar = tqdm(total=options.steps, disable=not options.progress, unit="step", desc="stand-in")
    step = 0
    stopped_by = "steps"
    confusers = None
    try:
        while options.steps is None or step < options.steps:
            if time.monotonic() >= deadline:
                stopped_by = "minutes"
                break
            if options.batch.hard_negatives and step % options.mine_every == 0:
                confusers = mine_confusers(pooled, tracks, options.mine_grid_s)
            anchors, positives, twins = standin_data.batch(
                tracks, options.batch, options.seed, step, confusers
            )
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(options, step, time.monotonic() - started)
            n = len(anchors)
            views = pooled(torch.from_numpy(np.concatenate([anchors, positives, twins])))
            loss = nt_xent(views[:n], views[n : 2 * n], options.temperature)
            if len(twins):
                loss = loss + options.phase_weight * phase_consistency(
                    views[: 2 * n], views[:n], views[2 * n :]
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(pooled.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            due = options.checkpoint_every and step % options.checkpoint_every == 0
            if snapshot and due and step != options.steps:  # the final checkpoint follows anyway
                snapshot(step, losses, time.monotonic() - started)
    finally:
        bar.close()
    return losses, step, stopped_by
