"""Training material for the stand-in: the music folder, its split, and contrastive batches.

A batch holds ``pairs`` (anchor, positive) windows of ``WINDOW_SAMPLES``: the
anchor is clean audio at a random position (what the index stores), the
positive the same audio cut up to ``max_shift_s`` earlier or later, at any
sample (not whole 320-sample frames: that is what random-init MERT fails on),
then degraded (``augment.py``). Windows of one track appear in groups, at
least a window apart, so that telling two places of one track apart is part of
the task (the search needs the offset too). With mined confusers
(``standin_mining``) some windows of a group are the places of the track the
model confuses with the group's other windows, literal repeats excepted. Every
draw comes from ``np.random.default_rng([seed, step])`` (and its children): a
batch depends on nothing else but the confusers it is given.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from export import augment, standin_mining
from export.standin import (
    HELD_OUT_TRACKS,
    HOP_SAMPLES,
    SAMPLE_RATE,
    TRAIN_TRACKS,
    WINDOW_SAMPLES,
)
from mert_indexer.errors import ConfigError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = frozenset({".ogg", ".flac", ".wav", ".mp3", ".m4a", ".opus"})


@dataclass(frozen=True)
class Track:
    """One decoded file: 24 kHz mono float32 and what identifies the file."""

    name: str
    path: Path
    sha256: str
    audio: np.ndarray


@dataclass(frozen=True)
class Split:
    """Which files of a music folder are trained on and which are held apart."""

    train: tuple[Path, ...]
    held_out: tuple[Path, ...]


def audio_files(folder: Path) -> list[Path]:
    """The audio files directly in ``folder``, sorted by name (a stable order for the seed)."""
    if not folder.is_dir():
        raise ConfigError(f"--music {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ConfigError(f"--music {folder}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
    return files


def split(files: list[Path]) -> Split:
    """The freedroidrpg split (``export.standin``) when the folder has those tracks, else all-train.

    Held-apart tracks are never trained on, whatever else the folder holds.
    A folder without any of the named tracks (generated music, say) is all
    training material.
    """
    known = [p for p in files if p.stem in TRAIN_TRACKS or p.stem in HELD_OUT_TRACKS]
    if not known:
        return Split(train=tuple(files), held_out=())
    held = tuple(p for p in files if p.stem in HELD_OUT_TRACKS)
    train = tuple(p for p in files if p.stem not in HELD_OUT_TRACKS)
    return Split(train=train, held_out=held)


def load_tracks(paths: tuple[Path, ...]) -> list[Track]:
    """Decode each file (24 kHz mono); a file shorter than two windows is useless, so refused."""
    from mert_indexer.client.decode import decode

    tracks = []
    for path in paths:
        audio = decode(path, SAMPLE_RATE)
        if len(audio) < 2 * WINDOW_SAMPLES:
            raise ConfigError(
                f"{path}: shorter than two windows ({len(audio) / SAMPLE_RATE:.1f} s)"
            )
        tracks.append(Track(name=path.stem, path=path, sha256=file_sha256(path), audio=audio))
    return tracks


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (hex), streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class BatchSpec:
    """The shape of a contrastive batch."""

    pairs: int = 16
    per_track: int = 4  # windows of one track per batch: hard negatives
    max_shift_s: float = 0.6
    # Anchors that also get a clean twin cut 1-319 samples later: the same audio
    # at another phase of the 320-sample frame, for a phase-consistency loss.
    phase_twins: int = 0
    # Windows of each track group that are mined confusers of the group's others
    # (at most half the group; needs the confusers, see standin_mining).
    hard_negatives: int = 0
    degradations: augment.Degradations = field(default_factory=augment.Degradations)


class Batch(NamedTuple):
    """One contrastive batch: ``[pairs, WINDOW_SAMPLES]`` anchors and positives, and twins.

    ``twins[i]`` is anchor ``i`` cut a sub-frame shift later, clean
    (``[phase_twins, WINDOW_SAMPLES]``; empty without them).
    """

    anchors: np.ndarray
    positives: np.ndarray
    twins: np.ndarray


def batch(
    tracks: list[Track],
    spec: BatchSpec,
    seed: int,
    step: int,
    confusers: standin_mining.Confusers | None = None,
) -> Batch:
    """Anchors, positives and phase twins, float32, fixed by (seed, step) and ``confusers``.

    The twins' phases come from a generator of their own, so a batch's
    anchors and positives are the same with or without twins. Without
    ``confusers`` no window is a mined hard negative, whatever the spec says.
    """
    rng = np.random.default_rng([seed, step])
    twin_rng = np.random.default_rng([seed, step, 1])
    hard_rng = np.random.default_rng([seed, step, 2])
    lengths = np.array([len(t.audio) for t in tracks], dtype=np.float64)
    anchors = np.empty((spec.pairs, WINDOW_SAMPLES), np.float32)
    positives = np.empty_like(anchors)
    twins = np.empty((min(spec.phase_twins, spec.pairs), WINDOW_SAMPLES), np.float32)
    max_shift = round(spec.max_shift_s * SAMPLE_RATE)
    row = 0
    while row < spec.pairs:
        track = tracks[int(rng.choice(len(tracks), p=lengths / lengths.sum()))]
        count = min(spec.per_track, spec.pairs - row)
        hard = min(spec.hard_negatives, count // 2) if confusers is not None else 0
        starts = spread_starts(len(track.audio), count - hard, max_shift, rng)
        if confusers is not None and hard:
            starts += hard_starts(track, starts, hard, confusers, max_shift, hard_rng)
        for start in starts:
            shift = int(rng.integers(-max_shift, max_shift + 1))
            anchors[row] = track.audio[start : start + WINDOW_SAMPLES]
            positives[row] = positive(track.audio, start + shift, rng, spec.degradations)
            if row < len(twins):
                later = start + int(twin_rng.integers(1, HOP_SAMPLES))
                later = min(later, len(track.audio) - WINDOW_SAMPLES)
                twins[row] = track.audio[later : later + WINDOW_SAMPLES]
            row += 1
    return Batch(anchors, positives, twins)


def spread_starts(n: int, count: int, margin: int, rng: np.random.Generator) -> list[int]:
    """Up to ``count`` window starts in ``[margin, n - window - margin]``, at least a window apart.

    Slots of two windows each, a random start inside the first half of each:
    neighbours are then at least one window apart (no overlap, no false negatives
    except a piece's literal repeats).
    """
    usable = n - WINDOW_SAMPLES - 2 * margin
    slots = max(1, usable // (2 * WINDOW_SAMPLES))
    chosen = rng.choice(slots, size=min(count, slots), replace=False)
    starts = []
    for slot in sorted(int(s) for s in chosen):
        base = margin + slot * 2 * WINDOW_SAMPLES
        top = min(base + WINDOW_SAMPLES, margin + usable)
        starts.append(int(rng.integers(base, max(base, top) + 1)))
    return starts


def hard_starts(
    track: Track,
    seeds: list[int],
    count: int,
    confusers: standin_mining.Confusers,
    margin: int,
    rng: np.random.Generator,
) -> list[int]:
    """Up to ``count`` confusers of ``seeds`` (in turn), each a window from every chosen start.

    A candidate that is a literal repeat of its seed is skipped: no model can
    tell those apart, and the search counts either as right.
    """
    if not seeds:
        return []
    chosen = list(seeds)
    found: list[int] = []
    limit = len(track.audio) - WINDOW_SAMPLES - margin
    lag = confusers.grid // 2 + margin  # how far apart a mined place and a repeat may be
    for i in range(count):
        seed = seeds[i % len(seeds)]
        for cand in rng.permutation(confusers.candidates(track.name, seed)).tolist():
            if not margin <= cand <= limit:
                continue
            if any(abs(cand - c) < WINDOW_SAMPLES for c in chosen):
                continue
            if standin_mining.literal_repeat(track.audio, seed, cand, lag):
                continue
            chosen.append(cand)
            found.append(cand)
            break
    return found


def positive(
    audio: np.ndarray, start: int, rng: np.random.Generator, spec: augment.Degradations
) -> np.ndarray:
    """The window at ``start``, degraded with 0.25 s of context each side (codec, reverb)."""
    context = SAMPLE_RATE // 4
    lo = max(0, start - context)
    hi = min(len(audio), start + WINDOW_SAMPLES + context)
    degraded = augment.degrade(audio[lo:hi], SAMPLE_RATE, rng, spec)
    offset = start - lo
    return degraded[offset : offset + WINDOW_SAMPLES]
