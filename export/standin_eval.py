"""What the stand-in is for, measured: shift tolerance, window retrieval, clip identification.

All similarities are cosines *around the catalogue mean* (the catalogue:
every track's windows at a 5 s hop), as ``indexer.faiss_index`` compares
vectors. Three measurements, each reported per role (trained / held-apart):

- ``shift``: a window vs the same audio shifted by 0 .. 0.5 s (clean), next to
  windows of the same track elsewhere and windows of other tracks;
- ``retrieval``: a query window at a random sample offset, degraded, against
  all catalogue windows: is the nearest one of the right track, and is it the
  window it overlaps most;
- ``clips``: a 10 s degraded clip at a random offset, cut at a 0.5 s hop as the
  query command does; a track's score is the best cosine between a clip window
  and one of its windows. Identified when the right track scores highest;
  leave-one-out (the clip's own track removed from the catalogue) gives what
  un-indexed music scores. A simple stand-in for ``indexer.search``'s score.

Game music loops: a match at a literal repeat elsewhere in the track counts as
the wrong window here, so ``retrieval.window`` is a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export import augment
from export.standin import SAMPLE_RATE, WINDOW_SAMPLES
from export.standin_data import Track

SHIFTS_S = (0.0, 0.02, 0.05, 0.1, 0.25, 0.5)
CLIP_S = 10.0
QUERY_HOP_S = 0.5
EVAL_SEED = 20_250_101


@dataclass(frozen=True)
class EvalSpec:
    """How many draws each measurement makes (per track)."""

    shift_windows: int = 3
    queries: int = 8
    clips: int = 4
    batch_size: int = 16
    degradations: augment.Degradations = field(default_factory=augment.Degradations)


def embed(pooled: Any, windows: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """``PooledMert`` outputs for float32 windows, ``[n, hidden]`` float32, in eval mode."""
    import torch

    was_training = pooled.training
    pooled.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(windows), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(windows[lo : lo + batch_size]))
            out.append(pooled(chunk).numpy())
    pooled.train(was_training)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class Catalogue:
    """Every track's windows at a 5 s hop, centred and L2-normalised."""

    vectors: np.ndarray  # [n, D], unit norm around ``mean``
    mean: np.ndarray
    track: np.ndarray  # [n] track index
    start: np.ndarray  # [n] start sample

    def unit(self, embeddings: np.ndarray) -> np.ndarray:
        centred = embeddings - self.mean
        return centred / (np.linalg.norm(centred, axis=-1, keepdims=True) + 1e-12)


def catalogue(pooled: Any, tracks: list[Track], batch_size: int) -> Catalogue:
    starts, owners, windows = [], [], []
    for index, track in enumerate(tracks):
        for start in range(0, len(track.audio) - WINDOW_SAMPLES + 1, WINDOW_SAMPLES):
            starts.append(start)
            owners.append(index)
            windows.append(track.audio[start : start + WINDOW_SAMPLES])
    raw = embed(pooled, np.stack(windows), batch_size)
    mean = raw.mean(axis=0)
    centred = raw - mean
    unit = centred / (np.linalg.norm(centred, axis=-1, keepdims=True) + 1e-12)
    return Catalogue(unit, mean, np.array(owners), np.array(starts))


def evaluate(
    pooled: Any, tracks: list[Track], roles: dict[str, str], spec: EvalSpec = EvalSpec()
) -> dict[str, Any]:
    """Every measurement, grouped by role (``roles``: track name -> "train" | "held_out")."""
    cat = catalogue(pooled, tracks, spec.batch_size)
    rng = np.random.default_rng(EVAL_SEED)
    per_track = [
        {
            "shift": shift_tolerance(pooled, cat, tracks, i, spec, rng),
            "retrieval": retrieval(pooled, cat, tracks, i, spec, rng),
            "clips": clip_scores(pooled, cat, tracks, i, spec, rng),
        }
        for i in range(len(tracks))
    ]
    out: dict[str, Any] = {"catalogue_windows": len(cat.vectors), "roles": {}}
    for role in sorted(set(roles.values())):
        members = [r for t, r in zip(tracks, per_track, strict=True) if roles.get(t.name) == role]
        out["roles"][role] = summarise(members)
    return out


def shift_tolerance(
    pooled: Any,
    cat: Catalogue,
    tracks: list[Track],
    index: int,
    spec: EvalSpec,
    rng: np.random.Generator,
) -> dict[str, list[float]]:
    """Cosines of windows vs themselves shifted, vs their track elsewhere, vs other tracks."""
    audio = tracks[index].audio
    top = len(audio) - WINDOW_SAMPLES - round(max(SHIFTS_S) * SAMPLE_RATE)
    cosines: dict[str, list[float]] = {f"{s:g}": [] for s in SHIFTS_S}
    for _ in range(spec.shift_windows):
        start = int(rng.integers(0, top + 1))
        windows = np.stack(
            [audio[start + round(s * SAMPLE_RATE) :][:WINDOW_SAMPLES] for s in SHIFTS_S]
        )
        unit = cat.unit(embed(pooled, windows, spec.batch_size))
        for s, value in zip(SHIFTS_S, unit @ unit[0], strict=True):
            cosines[f"{s:g}"].append(float(value))
        own = cat.vectors[cat.track == index]
        far = np.abs(cat.start[cat.track == index] - start) >= WINDOW_SAMPLES
        cosines.setdefault("same_track_elsewhere", []).append(
            float(np.mean(own[far] @ unit[0])) if far.any() else float("nan")
        )
        cosines.setdefault("other_tracks", []).append(
            float(np.mean(cat.vectors[cat.track != index] @ unit[0]))
        )
    return cosines


def retrieval(
    pooled: Any,
    cat: Catalogue,
    tracks: list[Track],
    index: int,
    spec: EvalSpec,
    rng: np.random.Generator,
) -> dict[str, list[float]]:
    """Nearest catalogue window of degraded query windows at random sample offsets."""
    audio = tracks[index].audio
    starts = rng.integers(0, len(audio) - WINDOW_SAMPLES + 1, size=spec.queries)
    windows = np.stack(
        [
            augment.degrade(audio[s : s + WINDOW_SAMPLES], SAMPLE_RATE, rng, spec.degradations)
            for s in starts
        ]
    )
    sims = cat.unit(embed(pooled, windows, spec.batch_size)) @ cat.vectors.T
    best = np.argmax(sims, axis=1)
    own = np.flatnonzero(cat.track == index)
    right_track = cat.track[best] == index
    nearest = own[np.argmin(np.abs(cat.start[own][None, :] - starts[:, None]), axis=1)]
    return {
        "track": right_track.astype(float).tolist(),
        "window": (best == nearest).astype(float).tolist(),
    }


def clip_scores(
    pooled: Any,
    cat: Catalogue,
    tracks: list[Track],
    index: int,
    spec: EvalSpec,
    rng: np.random.Generator,
) -> dict[str, list[float]]:
    """Degraded 10 s clips at a 0.5 s hop: identified?, own-track score, best other-track score."""
    audio = tracks[index].audio
    clip = round(CLIP_S * SAMPLE_RATE)
    hop = round(QUERY_HOP_S * SAMPLE_RATE)
    out: dict[str, list[float]] = {"identified": [], "score": [], "unindexed_score": []}
    for _ in range(spec.clips):
        start = int(rng.integers(0, len(audio) - clip + 1))
        degraded = augment.degrade(audio[start : start + clip], SAMPLE_RATE, rng, spec.degradations)
        windows = np.stack(
            [degraded[lo : lo + WINDOW_SAMPLES] for lo in range(0, clip - WINDOW_SAMPLES + 1, hop)]
        )
        best = (cat.unit(embed(pooled, windows, spec.batch_size)) @ cat.vectors.T).max(axis=0)
        scores = np.full(len(tracks), -1.0)
        np.maximum.at(scores, cat.track, best)
        out["identified"].append(float(int(np.argmax(scores)) == index))
        out["score"].append(float(scores[index]))
        out["unindexed_score"].append(float(np.delete(scores, index).max()))
    return out


def summarise(members: list[dict[str, dict[str, list[float]]]]) -> dict[str, Any]:
    """Means of each list over a role's tracks; clip scores also as min / max."""
    out: dict[str, Any] = {"tracks": len(members)}
    for group in ("shift", "retrieval", "clips"):
        keys = members[0][group].keys() if members else []
        out[group] = {
            key: round(float(np.nanmean([v for m in members for v in m[group][key]])), 4)
            for key in keys
        }
    clips = [m["clips"] for m in members]
    scores = [v for c in clips for v in c["score"]]
    unindexed = [v for c in clips for v in c["unindexed_score"]]
    if scores:
        out["clips"]["score_min"] = round(min(scores), 4)
        out["clips"]["unindexed_score_max"] = round(max(unindexed), 4)
    return out
