"""Identify real-music clips: top-1 hit rate by degradation and clip length.

The protocol of neural audio fingerprinting (Chang et al. 2021, "Neural Audio
Fingerprint for High-specific Audio Retrieval based on Contrastive Learning",
and its reproductions): seeded excerpts of catalogue tracks at arbitrary
sample offsets, degraded, plus clips of music that is not indexed; top-1 hit
rate by query length. Everything is the real system: the served model (the
bundled Triton), an index built by the real ``indexer-client`` in a temp dir,
the query library (:func:`mert_indexer.client.query.embed_audio`, its 0.5 s
hop unless ``--query-hop``) and :class:`mert_indexer.indexer.search.Searcher`.
``--index-hop`` indexes with overlapping windows (``indexer-client --hop-seconds``).

    python benchmarks/bench_retrieval.py --corpus DIR [--unindexed DIR | --split FILE]
        [--catalogue train|held_apart] [--model-repository R] [--queries N] [--seed S]
        [--index-hop S] [--query-hop S] [--out benchmarks/results/NAME]

Per (degradation, length): top-1 track; top-1 with offset within 0.5 s (an
answer at a *literal repeat* of the excerpt elsewhere in its track counts:
game music loops, see :func:`export.standin_mining.repeat_ncc`); offset error median/p95 over
right-track answers; at the index's default threshold: top-1, excerpts wrongly
rejected, and no-match recall/precision over the un-indexed clips; the same
ranking metrics with ``min_score=None``; the misses classified (below the
threshold / wrong offset / outranked / no evidence for the true track).
Clips shorter than one window (5 s) are refused by the query library
(:class:`QueryError`: padding changes MERT's embedding); they are tried once and
reported as not supported. Results: ``NAME.json``, ``NAME.md``, ``NAME.png``.

Not a test: run by hand (~10 minutes on 2 shared cores with a small model at
the default ``--queries``).
"""

from __future__ import annotations

import argparse
import datetime
import fractions
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, cpu_vector_extensions, free_port, machine

from export.standin_mining import REPEAT_NCC, repeat_ncc
from mert_indexer.atomic import atomic_write_text
from mert_indexer.client.query import DEFAULT_QUERY_HOP_SECONDS
from mert_indexer.errors import ConfigError, IndexerError, QueryError

LENGTHS = (1.0, 2.0, 3.0, 5.0, 10.0)
DEFAULT_QUERIES = 20  # per (degradation, length) cell, excerpts and as many un-indexed clips
OFFSET_TOLERANCE = 0.5  # seconds: "top-1 with offset"
# Offsets are drawn at any sample, but never this close to the query hop grid
# (which holds the index's 5 s grid) nor on MERT's 320-sample frame grid.
MIN_GRID_DISTANCE = 240  # samples (10 ms at 24 kHz)
FRAME_SAMPLES = 320
CODEC_MAX_DELAY = 4096  # samples searched to re-align a codec's output
SPEED_MARGIN_SECONDS = 0.25  # extra source fed to time-changing degradations
SPLIT_KEYS = ("held_apart", "held_out")


class BenchError(IndexerError):
    """The benchmark cannot run (its own failures; the library raises its own types)."""


# --------------------------------------------------------------------------- degradations


Apply = Callable[[np.ndarray, np.random.Generator, int], np.ndarray]


@dataclass(frozen=True)
class Degradation:
    """A seeded transformation of a clip. ``apply(x, rng, sr)`` returns
    ``round(len(x) / speed)`` samples (±1 for the resampler, a few ms for ``atempo``)."""

    name: str
    label: str
    apply: Apply
    speed: float = 1.0  # source seconds per clip second


def _exact(x: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
    return x.copy()


def codec_roundtrip(x: np.ndarray, sr: int, codec: str, container: str, bitrate: int) -> np.ndarray:
    """Encode ``x`` with PyAV at ``bitrate`` and decode it back, in memory, re-aligned.

    A codec may delay its output (priming samples the container does not
    trim); the delay is found by cross-correlation and removed, so the clip's
    true offset stays its start. Zeros after the clip let the encoder flush it.
    """
    import av

    buf = io.BytesIO()
    padded = np.concatenate([x, np.zeros(CODEC_MAX_DELAY * 2, np.float32)]).astype(np.float32)
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=sr)
        stream.bit_rate = bitrate
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(padded[None, :], format="flt", layout="mono")
        frame.sample_rate = sr
        frame.pts = 0
        for packet in stream.encode(frame):  # PyAV re-chunks to the codec's frame size
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    buf.seek(0)
    parts = []
    with av.open(buf, "r", metadata_errors="ignore") as inp:  # tags need not be UTF-8
        for f in inp.decode(audio=0):
            a = f.to_ndarray().astype(np.float32)
            parts.append(a.mean(axis=0) if a.shape[0] > 1 else a.reshape(-1))
    y = np.concatenate(parts)
    delay = best_lag(x[: min(len(x), 4 * sr)], y, CODEC_MAX_DELAY)
    y = y[delay : delay + len(x)]
    if len(y) < len(x):
        raise BenchError(f"{codec}: decoded {len(y)} samples for a {len(x)}-sample clip")
    return y


def best_lag(ref: np.ndarray, y: np.ndarray, max_lag: int) -> int:
    """The lag in [0, max_lag] at which ``y[lag:]`` best matches ``ref`` (cross-correlation)."""
    n = len(ref) + max_lag
    seg = y[:n]
    size = 1 << math.ceil(math.log2(len(seg) + len(ref)))
    corr = np.fft.irfft(np.fft.rfft(seg, size) * np.conj(np.fft.rfft(ref, size)), size)
    return int(np.argmax(corr[: max_lag + 1]))


def _codec(codec: str, container: str, bitrate: int) -> Apply:
    return lambda x, rng, sr: codec_roundtrip(x, sr, codec, container, bitrate)


def add_white_noise(x: np.ndarray, rng: np.random.Generator, snr_db: float) -> np.ndarray:
    """``x`` plus white Gaussian noise scaled to exactly ``snr_db`` over the clip."""
    noise = rng.standard_normal(len(x))
    p_signal = float(np.mean(np.square(x, dtype=np.float64)))
    p_noise = float(np.mean(np.square(noise)))
    scale = math.sqrt(p_signal / (p_noise * 10 ** (snr_db / 10))) if p_noise > 0 else 0.0
    return (x + scale * noise).astype(np.float32)


def _noise(snr_db: float) -> Apply:
    return lambda x, rng, sr: add_white_noise(x, rng, snr_db)


def _fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    size = 1 << math.ceil(math.log2(len(x) + len(h)))
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: len(x)]


def synthetic_ir(rng: np.random.Generator, sr: int, rt60: float) -> np.ndarray:
    """Exponentially decaying white noise (60 dB down at ``rt60``) behind a unit direct path;
    the tail carries as much energy as the direct path (direct-to-reverberant ratio 0 dB)."""
    t = np.arange(1, int(rt60 * 1.2 * sr)) / sr
    tail = rng.standard_normal(len(t)) * 10 ** (-3 * t / rt60)
    tail /= np.sqrt(np.sum(tail**2))
    return np.concatenate([[1.0], tail])


def _reverb(x: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
    ir = synthetic_ir(rng, sr, float(rng.uniform(0.3, 0.8)))
    y = _fft_convolve(x.astype(np.float64), ir)  # causal: the direct path keeps the timing
    rms_x, rms_y = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y**2))
    return (y * (rms_x / rms_y if rms_y > 0 else 1.0)).astype(np.float32)


def spectral_filter(x: np.ndarray, sr: int, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Zero-phase filter: the spectrum times ``gain(frequency in Hz)`` (linear)."""
    spec = np.fft.rfft(x.astype(np.float64))
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return np.fft.irfft(spec * gain(f), len(x)).astype(np.float32)


def butterworth_lowpass(f: np.ndarray, cutoff: float = 4000.0, order: int = 8) -> np.ndarray:
    return 1 / np.sqrt(1 + (f / cutoff) ** (2 * order))


def tilt_gain(f: np.ndarray, db_per_octave: float = -3.0, pivot: float = 1000.0) -> np.ndarray:
    """An EQ tilt: ``db_per_octave`` from ``pivot``, limited to +-12 dB."""
    octaves = np.log2(np.maximum(f, 1.0) / pivot)
    return 10 ** (np.clip(db_per_octave * octaves, -12, 12) / 20)


def apply_gain(x: np.ndarray, db: float) -> np.ndarray:
    """``x`` times ``db``, clipped to [-1, 1] (what a hot recording does)."""
    return np.clip(x * np.float32(10 ** (db / 20)), -1.0, 1.0).astype(np.float32)


def change_speed(x: np.ndarray, sr: int, ratio: float) -> np.ndarray:
    """Turntable: played ``ratio`` times faster, pitch and tempo together (resampling)."""
    import soxr

    return soxr.resample(x, sr * ratio, sr, quality="HQ").astype(np.float32)


def change_tempo(x: np.ndarray, sr: int, ratio: float) -> np.ndarray:
    """Time stretch by ``ratio`` with the pitch kept: FFmpeg's ``atempo`` through PyAV."""
    import av
    import av.filter

    graph = av.filter.Graph()
    tb = fractions.Fraction(1, sr)
    src = graph.add_abuffer(format="flt", sample_rate=sr, layout="mono", time_base=tb)
    tempo = graph.add("atempo", f"{ratio}")
    sink = graph.add("abuffersink")
    src.link_to(tempo)
    tempo.link_to(sink)
    graph.configure()
    out: list[np.ndarray] = []

    def drain() -> None:
        while True:
            try:
                out.append(graph.pull().to_ndarray().reshape(-1))
            except (av.BlockingIOError, av.EOFError):
                return

    block = 1 << 14
    for i in range(0, len(x), block):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(x[None, i : i + block], np.float32), format="flt", layout="mono"
        )
        frame.sample_rate, frame.pts, frame.time_base = sr, i, tb
        graph.push(frame)
        drain()
    graph.push(None)
    drain()
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def atempo_available() -> bool:
    try:
        import av.filter

        return "atempo" in av.filter.filters_available
    except (ImportError, AttributeError):
        return False


def degradations() -> list[Degradation]:
    """The evaluated degradations, in table order (tempo only where FFmpeg has ``atempo``)."""
    out = [
        Degradation("exact", "exact", _exact),
        Degradation("mp3_64k", "mp3 64 kbps", _codec("libmp3lame", "mp3", 64_000)),
        Degradation("aac_64k", "AAC 64 kbps", _codec("aac", "mp4", 64_000)),
        *(
            Degradation(f"noise_{s}db", f"white noise {s} dB SNR", _noise(s))
            for s in (20, 10, 5, 0)
        ),
        Degradation("reverb", "reverb RT60 0.3-0.8 s", _reverb),
        Degradation(
            "lowpass_4k",
            "low-pass 4 kHz",
            lambda x, rng, sr: spectral_filter(x, sr, butterworth_lowpass),
        ),
        Degradation(
            "eq_tilt", "EQ tilt -3 dB/oct", lambda x, rng, sr: spectral_filter(x, sr, tilt_gain)
        ),
        Degradation("gain_-12db", "gain -12 dB", lambda x, rng, sr: apply_gain(x, -12.0)),
        Degradation("gain_+6db", "gain +6 dB, clipped", lambda x, rng, sr: apply_gain(x, 6.0)),
    ]
    for r in (1.02, 0.98):
        out.append(
            Degradation(
                f"pitch_{r - 1:+.0%}",
                f"pitch+speed {r - 1:+.0%}",
                lambda x, rng, sr, r=r: change_speed(x, sr, r),
                speed=r,
            )
        )
    if atempo_available():
        for r in (1.05, 0.95):
            out.append(
                Degradation(
                    f"tempo_{r - 1:+.0%}",
                    f"tempo {r - 1:+.0%}",
                    lambda x, rng, sr, r=r: change_tempo(x, sr, r),
                    speed=r,
                )
            )
    return out


def degrade(
    audio: np.ndarray, start: int, n_out: int, deg: Degradation, rng: np.random.Generator, sr: int
) -> np.ndarray:
    """The clip of ``n_out`` samples heard when ``audio`` from ``start`` goes through ``deg``."""
    margin = 0 if deg.speed == 1.0 else int(SPEED_MARGIN_SECONDS * sr * deg.speed)
    span = math.ceil(n_out * deg.speed) + margin
    y = deg.apply(audio[start : start + span], rng, sr)
    if len(y) < n_out:
        raise BenchError(f"{deg.name}: {len(y)} samples out for a {n_out}-sample clip")
    return y[:n_out]


def source_span(seconds: float, sr: int, speeds: Sequence[float]) -> int:
    """Samples of a track any degradation may read for one clip of ``seconds``."""
    fastest = max(speeds)
    return math.ceil(seconds * sr * fastest) + int(SPEED_MARGIN_SECONDS * sr * fastest) + 1


# --------------------------------------------------------------------------- offsets, repeats


def off_grid(offset: int, hop: int) -> bool:
    """True when ``offset`` (samples) is neither near the hop grid nor on the frame grid."""
    r = offset % hop
    return min(r, hop - r) >= MIN_GRID_DISTANCE and offset % FRAME_SAMPLES != 0


def draw_offset(rng: np.random.Generator, n_track: int, span: int, hop: int) -> int:
    """A uniformly drawn sample offset with ``span`` samples after it, off every grid."""
    if n_track < span:
        raise BenchError(f"a track of {n_track} samples is shorter than a clip span of {span}")
    while True:
        o = int(rng.integers(0, n_track - span + 1))
        if off_grid(o, hop):
            return o


# --------------------------------------------------------------------------- metrics


@dataclass
class Answer:
    """One top-1 answer, judged against the truth."""

    track: str
    offset: float
    score: float
    track_ok: bool
    offset_ok: bool = False  # within the tolerance, or at a literal repeat
    repeat: bool = False  # counted correct as a literal repeat
    error: float | None = None  # seconds to the true offset (or to the repeat answered)
    # Wrong offsets: waveform NCC of the answered place with the true one (lag <= 0.5 s)
    repeat_ncc: float | None = None


@dataclass
class Query:
    """One clip and what the search said about it."""

    kind: str  # "excerpt" | "unindexed"
    track: str
    offset: float  # true offset, seconds
    answer: Answer | None  # at the index's default threshold (None: no match)
    ranked: Answer | None  # min_score=None: best guess
    true_rank: int | None = None  # of the true track, min_score=None, 1-based
    true_score: float | None = None  # the true track's score with the floor, threshold 0
    top_score: float | None = None  # best score with the floor, threshold 0
    miss: str | None = None  # why the default-threshold answer is not right (excerpts)


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, float), q)) if len(values) else None


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def cell_metrics(queries: Sequence[Query]) -> dict[str, Any]:
    """Hit rates, offset errors, no-match precision/recall and miss causes of one cell.

    No-match recall: share of un-indexed clips answered "no match"; precision:
    share of "no match" answers that were un-indexed clips.
    """
    ex = [q for q in queries if q.kind == "excerpt"]
    un = [q for q in queries if q.kind == "unindexed"]
    out: dict[str, Any] = {"excerpts": len(ex), "unindexed": len(un)}
    for key, pick in (("ranked", lambda q: q.ranked), ("threshold", lambda q: q.answer)):
        answers = [pick(q) for q in ex]
        right = [a for a in answers if a is not None and a.track_ok]
        errors = [a.error for a in right if a.error is not None]
        out[key] = {
            "top1_track": _rate(len(right), len(ex)),
            "top1_offset": _rate(sum(a.offset_ok for a in right), len(ex)),
            "repeats_counted": sum(a.repeat for a in right),
            "offset_error_median": percentile(errors, 50),
            "offset_error_p95": percentile(errors, 95),
            # How alike the answered and the true place are where the offset is wrong.
            "wrong_offset_ncc": sorted(
                round(a.repeat_ncc, 3)
                for a in right
                if not a.offset_ok and a.repeat_ncc is not None
            ),
        }
    rejected_ex = sum(q.answer is None for q in ex)
    rejected_un = sum(q.answer is None for q in un)
    out["threshold"] |= {
        "wrongly_rejected": _rate(rejected_ex, len(ex)),
        "nomatch_recall": _rate(rejected_un, len(un)),
        "nomatch_precision": _rate(rejected_un, rejected_ex + rejected_un) if un else None,
        "unindexed_matched": _rate(len(un) - rejected_un, len(un)),
    }
    out["ranked"]["true_track_in_candidates"] = _rate(
        sum(q.true_rank is not None for q in ex), len(ex)
    )
    misses: dict[str, int] = {}
    for q in ex:
        if q.miss:
            misses[q.miss] = misses.get(q.miss, 0) + 1
    out["misses"] = misses
    ts = [q.true_score or 0.0 for q in ex]
    us = [q.top_score or 0.0 for q in un]
    out["scores"] = {
        "excerpt_true_median": percentile(ts, 50),
        "excerpt_true_p10": percentile(ts, 10),
        "unindexed_top_p90": percentile(us, 90),
        "unindexed_top_max": max(us) if us else None,
    }
    return out


def classify_miss(
    answer: Answer | None, floor_list: Sequence[Answer], threshold: float
) -> str | None:
    """Why an excerpt's default answer is wrong, from the search with the floor and threshold 0.

    ``below threshold``: the right track and offset came first but scored under
    it; ``wrong offset``: the right track first, elsewhere in it; ``outranked``:
    another track first; ``no evidence``: the true track not among the
    candidates at all (no neighbour stood above the background).
    """
    if answer is not None and answer.offset_ok:
        return None
    if not floor_list:
        return "no evidence"
    first = floor_list[0]
    if first.track_ok and first.offset_ok:
        return "below threshold" if first.score < threshold else "other"
    if first.track_ok:
        return "wrong offset"
    if any(a.track_ok for a in floor_list):
        return "outranked"
    return "no evidence"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Sets:
    catalogue: list[Path]
    unindexed: list[Path]
    how: str


def audio_files(folder: Path, flag: str) -> list[Path]:
    from mert_indexer.client.decode import AUDIO_SUFFIXES

    if not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: not a folder")
    # Absolute, as the store records paths (os.path.abspath: links not resolved).
    files = sorted(
        Path(os.path.abspath(p))
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
    )
    if not files:
        raise ConfigError(f"{flag} {folder}: no audio files in it")
    return files


def _names(entries: Any, key: str, path: Path) -> list[str]:
    if not isinstance(entries, list):
        raise ConfigError(f"--split {path}: {key!r} is not a list")
    out = []
    for e in entries:
        name = e.get("file") if isinstance(e, dict) else e
        if not isinstance(name, str):
            raise ConfigError(f"--split {path}: {key!r} holds {e!r}, not a file name")
        out.append(Path(name).name)
    return out


def read_split(path: Path) -> tuple[list[str], list[str]]:
    """(train, held apart) file names of a split JSON (``train`` and ``held_apart``/``held_out``
    lists of names or of ``{"file": name}``; also under ``data``, as in a stand-in checkpoint's
    ``training.json``)."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--split {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--split {path}: not JSON ({exc})") from None
    if isinstance(data, dict) and "train" not in data and isinstance(data.get("data"), dict):
        data = data["data"]  # a stand-in checkpoint's training.json
    key = next((k for k in SPLIT_KEYS if isinstance(data, dict) and k in data), None)
    if not isinstance(data, dict) or "train" not in data or key is None:
        raise ConfigError(f"--split {path}: needs 'train' and 'held_apart' (or 'held_out') lists")
    return _names(data["train"], "train", path), _names(data[key], key, path)


def choose_sets(args: argparse.Namespace) -> Sets:
    files = audio_files(args.corpus, "--corpus")
    if args.split is not None:
        train, held = read_split(args.split)
        by_name = {p.name: p for p in files}
        missing = [n for n in train + held if n not in by_name]
        if missing:
            raise ConfigError(f"--split {args.split}: not in --corpus {args.corpus}: {missing}")
        cat, other = [by_name[n] for n in train], [by_name[n] for n in held]
        if args.catalogue == "held_apart":
            cat, other = other, cat
        return Sets(cat, other, f"split {args.split.name}: catalogue = {args.catalogue}")
    unindexed = audio_files(args.unindexed, "--unindexed") if args.unindexed else []
    return Sets(files, unindexed, "un-indexed = --unindexed" if unindexed else "no un-indexed set")


def reference_tracks(index: Path) -> list[Path]:
    """The files a prebuilt reference index holds (to check them against the un-indexed set)."""
    from mert_indexer.indexer.catalog import CATALOG_FILE, Catalog

    if not (index / CATALOG_FILE).is_file():
        raise ConfigError(f"--reference-index {index}: no index store here ({CATALOG_FILE})")
    catalog = Catalog(index / CATALOG_FILE, read_only=True)
    try:
        paths = [Path(t.path) for t in catalog.tracks()]
    finally:
        catalog.close()
    gone = [p for p in paths if not p.is_file()]
    if gone:
        raise ConfigError(
            f"--reference-index {index}: {len(gone)} of its files are gone (e.g. {gone[0]}): "
            "their audio cannot be checked against the un-indexed set"
        )
    return paths


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_repository(repo: Path) -> None:
    if not (repo / "mert" / "config.pbtxt").is_file():
        raise ConfigError(
            f"--model-repository {repo}: no mert/config.pbtxt (export a model first: "
            "python export/to_onnx.py --output DIR)"
        )
    if not any((repo / "mert").glob("*/model.onnx")):
        raise ConfigError(f"--model-repository {repo}: no mert/<version>/model.onnx")


# --------------------------------------------------------------------------- the run


def serve(repo: Path) -> Any:
    from mert_indexer.server.launcher import LocalTriton, ServeOptions

    return LocalTriton(
        ServeOptions(
            model_repository=repo,
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            device="cpu",
            ready_timeout=600,
        )
    )


def build_index(
    url: str,
    files: list[Path],
    index: Path,
    hop_seconds: float | None,
    calibrate_with: Path | None = None,
) -> dict[str, Any]:
    """The real ``indexer-client`` over the catalogue: the evaluated index is the users' one."""
    exe = Path(sys.executable).parent / "indexer-client"
    if not exe.exists():
        raise ConfigError(f"{exe} not found: install the project (pip install -e '.[cpu,server]')")
    cmd = [str(exe), "--server", url, "--index", str(index), "--no-progress"]
    if hop_seconds is not None:
        cmd += ["--hop-seconds", f"{hop_seconds:g}"]
    if calibrate_with is not None:
        cmd += ["--calibrate-with", str(calibrate_with)]
    for f in files:
        cmd += ["--input", str(f)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BenchError(f"indexer-client exited {proc.returncode}: {' | '.join(tail)}")
    return {"seconds": round(time.perf_counter() - t0, 1), "output": proc.stdout.strip()[-400:]}


@dataclass
class Track:
    path: Path
    audio: np.ndarray


@dataclass
class Judge:
    """Turns a search's matches into judged :class:`Answer` s for one excerpt."""

    track: Track | None
    true_offset: float
    span: int
    sr: int
    repeats: dict[str, int] = field(default_factory=dict)

    def __call__(self, m: Any) -> Answer:
        if self.track is None:  # un-indexed clip: every answer is wrong
            return Answer(m.track, float(m.offset_seconds), float(m.score), False)
        ok = Path(m.track) == self.track.path
        a = Answer(m.track, float(m.offset_seconds), float(m.score), ok)
        if not ok:
            return a
        err = abs(a.offset - self.true_offset)
        a.error, a.offset_ok = err, bool(err <= OFFSET_TOLERANCE)
        if not a.offset_ok:
            t = round(self.true_offset * self.sr)
            u = round(m.offset_seconds * self.sr)
            ncc, lag = repeat_ncc(
                self.track.audio, t, u, self.span, round(OFFSET_TOLERANCE * self.sr)
            )
            a.repeat_ncc = ncc
            if ncc >= REPEAT_NCC:
                a.offset_ok, a.repeat, a.error = True, True, abs(lag) / self.sr
        return a


def run_queries(
    searcher: Any,
    contract: Any,
    infer: Callable[[np.ndarray], np.ndarray],
    catalogue: list[Track],
    unindexed: list[Track],
    degs: list[Degradation],
    lengths: Sequence[float],
    n_queries: int,
    seed: int,
    query_hop_seconds: float,
    progress: bool,
) -> tuple[dict[tuple[str, float], list[Query]], dict[float, str]]:
    from tqdm import tqdm

    from mert_indexer.client.query import embed_audio
    from mert_indexer.indexer.search import SearchOptions

    sr = contract.sample_rate
    hop = round(query_hop_seconds * sr)
    threshold = searcher.options.min_score
    floor_opts = SearchOptions(min_score=0.0)
    rank_opts = SearchOptions(min_score=None)
    speeds = [d.speed for d in degs]
    unsupported: dict[float, str] = {}
    supported = []
    for length in lengths:  # what the library does with a short clip: asked once, said in the table
        if length * sr < contract.window_samples:
            try:
                embed_audio(catalogue[0].audio[: round(length * sr)], contract, infer)
                supported.append(length)
            except QueryError as exc:
                unsupported[length] = f"QueryError: {exc}"
        else:
            supported.append(length)
    cells: dict[tuple[str, float], list[Query]] = {}
    total = len(degs) * len(supported) * n_queries * (2 if unindexed else 1)
    bar = tqdm(total=total, unit="clip", disable=not progress, dynamic_ncols=True)
    try:
        for li, length in enumerate(supported):
            n_out = round(length * sr)
            span = source_span(length, sr, speeds)
            pos_rng = np.random.default_rng([seed, li])
            plan: list[tuple[str, Track]] = [
                ("excerpt", catalogue[int(pos_rng.integers(len(catalogue)))])
                for _ in range(n_queries)
            ]
            if unindexed:
                plan += [
                    ("unindexed", unindexed[int(pos_rng.integers(len(unindexed)))])
                    for _ in range(n_queries)
                ]
            starts = [draw_offset(pos_rng, len(tr.audio), span, hop) for _, tr in plan]
            for di, deg in enumerate(degs):
                bar.set_description(f"{deg.name} {length:g}s")
                out: list[Query] = []
                for qi, ((kind, tr), start) in enumerate(zip(plan, starts, strict=True)):
                    rng = np.random.default_rng([seed, li, di, qi])
                    clip = degrade(tr.audio, start, n_out, deg, rng, sr)
                    emb, cs = embed_audio(clip, contract, infer, hop_seconds=query_hop_seconds)
                    judge = Judge(
                        tr if kind == "excerpt" else None,
                        start / sr,
                        math.ceil(n_out * deg.speed),
                        sr,
                    )
                    default = searcher.search(emb, cs, top=1)
                    floor = [judge(m) for m in searcher.search(emb, cs, top=10, options=floor_opts)]
                    ranked = [judge(m) for m in searcher.search(emb, cs, top=10, options=rank_opts)]
                    q = Query(
                        kind,
                        tr.path.name,
                        start / sr,
                        judge(default[0]) if default else None,
                        ranked[0] if ranked else None,
                        next((i + 1 for i, a in enumerate(ranked) if a.track_ok), None),
                        next((a.score for a in floor if a.track_ok), None),
                        floor[0].score if floor else None,
                    )
                    if kind == "excerpt":
                        q.miss = classify_miss(q.answer, floor, threshold or 0.0)
                    out.append(q)
                    bar.update()
                cells[(deg.name, length)] = out
    finally:
        bar.close()
    return cells, unsupported


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from mert_indexer.client.decode import decode
    from mert_indexer.client.triton_io import ConnectOptions, TritonPool
    from mert_indexer.indexer.search import Searcher

    check_repository(args.model_repository)
    sets = choose_sets(args)
    reference = audio_files(args.reference, "--reference") if args.reference else []
    if args.reference_index is not None:
        reference = reference_tracks(args.reference_index)
    hashes = {p: sha256(p) for p in sets.catalogue + sets.unindexed + reference}
    shared = {hashes[p] for p in sets.catalogue} & {hashes[p] for p in sets.unindexed}
    if shared:
        raise ConfigError("the same audio file is both in the catalogue and un-indexed")
    if {hashes[p] for p in reference} & {hashes[p] for p in sets.unindexed}:
        # The un-indexed clips would be the calibration's own sample: no test of it.
        raise ConfigError("the same audio file is both in --reference and un-indexed")
    known = degradations()
    unknown = sorted(set(args.only or ()) - {d.name for d in known})
    if unknown:
        raise ConfigError(
            f"--only: no degradation named {', '.join(unknown)} "
            f"(there are: {', '.join(d.name for d in known)})"
        )
    degs = [d for d in known if not args.only or d.name in args.only]
    t0 = time.perf_counter()
    with serve(args.model_repository) as server, tempfile.TemporaryDirectory() as tmp:
        pool = TritonPool(ConnectOptions(servers=(server.grpc_url,)))
        try:
            contract = pool.connect()
            if contract.model_id.startswith("random-init/"):
                print(random_init_banner(contract.model_id), file=sys.stderr, flush=True)
            index, reference_index = Path(tmp) / "index", args.reference_index
            if args.reference is not None:
                reference_index = Path(tmp) / "reference"
                build_index(server.grpc_url, reference, reference_index, args.index_hop)
            built = build_index(
                server.grpc_url, sets.catalogue, index, args.index_hop, reference_index
            )
            sr = contract.sample_rate
            catalogue = [Track(p, decode(p, sr)) for p in sets.catalogue]
            unindexed = [Track(p, decode(p, sr)) for p in sets.unindexed]
            t_q = time.perf_counter()
            with Searcher(index) as searcher:
                cells, unsupported = run_queries(
                    searcher,
                    contract,
                    pool.infer,
                    catalogue,
                    unindexed,
                    degs,
                    args.lengths,
                    args.queries,
                    args.seed,
                    args.query_hop,
                    not args.no_progress,
                )
                threshold = searcher.options.min_score
                info = searcher.info
            query_seconds = time.perf_counter() - t_q
        finally:
            pool.close()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine() | {"vector_extensions": cpu_vector_extensions()},
        "model": {
            "model_id": contract.model_id,
            "precision": contract.precision,
            "weights_sha256": contract.weights_sha256,
            "embedding_dim": contract.embedding_dim,
            "random_init": contract.model_id.startswith("random-init/"),
            "repository": str(args.model_repository),
        },
        "sets": sets.how,
        "catalogue": [{"file": p.name, "sha256": hashes[p][:12]} for p in sets.catalogue],
        "unindexed": [{"file": p.name, "sha256": hashes[p][:12]} for p in sets.unindexed],
        "reference": [{"file": p.name, "sha256": hashes[p][:12]} for p in reference],
        "index": {
            "build": built,
            "kind": info.get("kind"),
            "windows": info.get("n_vectors"),
            "null_similarity": info.get("params", {}).get("null_similarity"),
            "default_min_score": threshold,
            "min_score_by_pairs": info.get("params", {}).get("min_score_by_pairs"),
            "calibrated_against": info.get("params", {}).get("calibrated_against"),
            "hop_seconds": args.index_hop,  # None: indexer-client's default (the window)
        },
        "query_hop_seconds": args.query_hop,
        "seed": args.seed,
        "queries_per_cell": args.queries,
        "degradations": [{"name": d.name, "label": d.label, "speed": d.speed} for d in degs],
        "tempo": "atempo" if atempo_available() else "skipped: FFmpeg has no atempo filter here",
        "unsupported_lengths": {f"{k:g}": v for k, v in unsupported.items()},
        "cells": [
            {"degradation": d, "length": L, **cell_metrics(qs)} for (d, L), qs in cells.items()
        ],
        "queries": [
            {"degradation": d, "length": L, **asdict(q)} for (d, L), qs in cells.items() for q in qs
        ],
        "repeat_ncc_threshold": REPEAT_NCC,
        "query_seconds": round(query_seconds, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------- report


def random_init_banner(model_id: str) -> str:
    bar = "!" * 78
    return (
        f"{bar}\n!! RANDOM-INIT MODEL ({model_id}): its embeddings carry no musical meaning.\n"
        "!! Only the track ranking is meaningful; offsets and the no-match threshold are noise.\n"
        f"{bar}"
    )


def _by_pairs(thresholds: list[float] | None) -> str:
    """The index's thresholds by aligned pairs, for the report's index line."""
    if not thresholds:
        return ""
    shown = " / ".join(f"{t:g}" for t in thresholds)
    return f" (by aligned pairs 1-{len(thresholds)}: {shown})"


def _against(reference: dict[str, Any] | None) -> str:
    if not reference:
        return ""
    return (
        f", calibrated also against a reference of {reference['tracks']} other tracks "
        f"({reference['windows']} windows, never searched)"
    )


def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    m, mach = r["model"], r["machine"]
    lines = [f"# Retrieval on real music: {m['model_id']} ({m['precision']})", ""]
    if m["random_init"]:
        lines += [
            "**RANDOM-INIT MODEL: its embeddings carry no musical meaning; only the track "
            "ranking is meaningful (offsets and the no-match threshold are noise).**",
            "",
        ]
    ext = ", ".join(mach["vector_extensions"]) or "none of avx2/avx512f/avx512_vnni/avx_vnni"
    idx = r["index"]
    index_hop = idx.get("hop_seconds")
    query_hop = r.get("query_hop_seconds", DEFAULT_QUERY_HOP_SECONDS)
    lines += [
        f"{r['date']}; {mach['cpu']} ({ext}), {mach['cores']} cores (shared, load "
        f"{mach['load_avg_at_start']:.1f}); model {m['model_id']}, weights "
        f"{m['weights_sha256'][:12]}, D = {m['embedding_dim']}; {r['sets']}.",
        "",
        f"Index: {idx['windows']} windows ({idx['kind']}, hop "
        f"{'= window' if index_hop is None else f'{index_hop:g} s'}), null similarity "
        f"{_f(idx['null_similarity'], 3)}, default threshold {idx['default_min_score']}"
        f"{_by_pairs(idx.get('min_score_by_pairs'))}"
        f"{_against(idx.get('calibrated_against'))}; "
        f"built by indexer-client in {idx['build']['seconds']} s. {r['queries_per_cell']} "
        f"excerpts (+ as many un-indexed clips where there are some) per cell, seed {r['seed']}, "
        f"offsets at arbitrary samples (never within {MIN_GRID_DISTANCE} samples of the "
        f"{query_hop:g} s query hop's grid, never on the 320-sample frame grid); queries "
        f"{r['query_seconds']} s, run "
        f"{r['wall_seconds']} s.",
        "",
        "Catalogue: " + ", ".join(f"{c['file']} ({c['sha256']})" for c in r["catalogue"]) + ".",
        "",
        "Un-indexed: "
        + (", ".join(f"{c['file']} ({c['sha256']})" for c in r["unindexed"]) or "none")
        + ".",
        "",
        *(
            [
                "Calibration reference (indexed apart, never searched): "
                + ", ".join(f"{c['file']} ({c['sha256']})" for c in r["reference"])
                + ".",
                "",
            ]
            if r.get("reference")
            else []
        ),
        (
            "Columns: *rank* = `min_score=None` (best guess, no floor/threshold); *thr* = the "
            "index's default threshold (no match = miss). top-1 ±0.5 s counts answers at a "
            f"literal repeat (waveform NCC >= {REPEAT_NCC} over the clip's span, lag <= 0.5 s; "
            "game music loops), their number in (). Offset error: over right-track answers "
            "(to the repeat for those), median/p95 s. No-match recall = un-indexed clips "
            "answered no match; precision = share of no-match answers that were un-indexed. "
            "Misses (thr): B below threshold / O wrong offset / R outranked / N no evidence "
            "for the true track. Scores (threshold 0, with the floor): true track's median "
            "for excerpts; best p90/max for un-indexed clips. Wrong-offset NCC (rank): "
            "median waveform NCC of the answered place with the true one where the offset "
            "is wrong (1 = a literal repeat; music's near-repeats reach 0.8-0.95)."
        ),
        "",
        "| degradation | length | rank top-1 track | rank top-1 ±0.5 s | offset err med/p95 "
        "| thr top-1 ±0.5 s | wrongly rejected | no-match recall | no-match precision "
        "| misses B/O/R/N | score excerpt med | score un-indexed p90/max "
        "| wrong-offset NCC med |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for length, why in r["unsupported_lengths"].items():
        lines.append(
            f"| all | {length} s | not supported (shorter than one window) | {why} "
            + "| " * 10
            + "|"
        )
    labels = {d["name"]: d["label"] for d in r["degradations"]}
    for c in r["cells"]:
        rk, th, sc, mi = c["ranked"], c["threshold"], c["scores"], c["misses"]
        miss = "/".join(
            str(mi.get(k, 0))
            for k in ("below threshold", "wrong offset", "outranked", "no evidence")
        )
        lines.append(
            f"| {labels[c['degradation']]} | {c['length']:g} s | {_f(rk['top1_track'])} | "
            f"{_f(rk['top1_offset'])} ({rk['repeats_counted']}) | "
            f"{_f(rk['offset_error_median'])}/{_f(rk['offset_error_p95'])} | "
            f"{_f(th['top1_offset'])} ({th['repeats_counted']}) | {_f(th['wrongly_rejected'])} | "
            f"{_f(th['nomatch_recall'])} | {_f(th['nomatch_precision'])} | {miss} | "
            f"{_f(sc['excerpt_true_median'])} | "
            f"{_f(sc['unindexed_top_p90'])}/{_f(sc['unindexed_top_max'])} | "
            f"{_f(percentile(rk['wrong_offset_ncc'], 50))} |"
        )
    lines += [
        "",
        (
            "Degradations (each seeded per clip): mp3/AAC through PyAV (libmp3lame, FFmpeg aac "
            "in mp4) in memory, codec delay removed by cross-correlation; **white** Gaussian "
            "noise at an exact SNR over the clip; reverb: exponentially decaying noise IR, "
            "RT60 uniform 0.3-0.8 s, direct-to-reverberant 0 dB; low-pass: zero-phase 8th-order "
            "Butterworth magnitude at 4 kHz; EQ tilt -3 dB/octave around 1 kHz (+-12 dB); "
            "gain +6 dB clipped to [-1, 1]; pitch: resampling (speed and pitch together, the "
            "clip covers length x speed of the track); tempo: FFmpeg atempo (pitch kept) -- "
            f"{r['tempo']}. The true offset is the clip's start in the track."
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], out: Path) -> None:
    """Top-1 with offset by degradation, one bar per length, ranked and at the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [d["name"] for d in r["degradations"]]
    labels = [d["label"] for d in r["degradations"]]
    lengths = sorted({c["length"] for c in r["cells"]})
    by = {(c["degradation"], c["length"]): c for c in r["cells"]}
    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    width = 0.8 / max(1, len(lengths))
    x = np.arange(len(names))
    for ax, key, title in zip(
        axes,
        ("ranked", "threshold"),
        ("best guess (min_score=None)", "default threshold"),
        strict=True,
    ):
        for i, length in enumerate(lengths):
            vals = [(by.get((n, length)) or {}).get(key, {}).get("top1_offset") or 0 for n in names]
            ax.bar(x + (i - (len(lengths) - 1) / 2) * width, vals, width, label=f"{length:g} s")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("top-1 within 0.5 s")
        ax.set_title(title)
        ax.legend(loc="upper right", fontsize=8)
    unsupported = ", ".join(f"{k} s" for k in r["unsupported_lengths"])
    note = f"; {unsupported}: not supported (shorter than one window)" if unsupported else ""
    flag = " -- RANDOM-INIT, offsets meaningless" if r["model"]["random_init"] else ""
    fig.suptitle(f"{r['model']['model_id']} ({r['model']['precision']}){flag}{note}", fontsize=10)
    axes[-1].set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def result_path(out: Path, suffix: str) -> Path:
    """``out`` + ``suffix``: results names carry dots (``..._hop2.5_...``), not suffixes."""
    return out.with_name(out.name + suffix)


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result_path(out, ".json"), json.dumps(report, indent=1) + "\n")
    atomic_write_text(result_path(out, ".md"), markdown(report))
    plot(report, result_path(out, ".png"))


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, help="folder of catalogue tracks (with --split: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--unindexed", type=Path, help="folder of music that is not indexed")
    g.add_argument(
        "--split",
        type=Path,
        help="JSON with 'train' and 'held_apart' (or 'held_out') file names within --corpus",
    )
    p.add_argument(
        "--catalogue",
        choices=("train", "held_apart"),
        default="train",
        help="with --split: which half is indexed; the other is the un-indexed set",
    )
    p.add_argument(
        "--reference",
        type=Path,
        help="folder of other music, disjoint from the un-indexed set: indexed apart and "
        "given to the catalogue's build as indexer-client --calibrate-with",
    )
    p.add_argument(
        "--reference-index",
        type=Path,
        help="instead of --reference: an index of other music already built with the same "
        "model and --index-hop, used as it is",
    )
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="excerpts per cell")
    p.add_argument("--lengths", type=float, nargs="+", default=list(LENGTHS))
    p.add_argument("--only", nargs="+", help="degradation names to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--index-hop",
        type=float,
        help="seconds between indexed windows (indexer-client --hop-seconds; default: its own)",
    )
    p.add_argument(
        "--query-hop",
        type=float,
        default=DEFAULT_QUERY_HOP_SECONDS,
        help="seconds between a clip's windows (default: the query library's)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "retrieval",
        help="results path without suffix (.json, .md, .png)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render", action="store_true", help="rewrite .md and .png from --out's JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.queries < 1:
        parser.error("--queries must be at least 1")
    if args.corpus is None and not args.render:
        parser.error("--corpus is required")
    if args.catalogue != "train" and args.split is None:
        parser.error("--catalogue needs --split")
    if args.reference is not None and args.reference_index is not None:
        parser.error("--reference and --reference-index exclude each other")
    out = args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out
    try:
        if args.render:
            report = json.loads(result_path(out, ".json").read_text())
        else:
            report = measure(args)
        write(report, out)
    except IndexerError as exc:
        print(f"bench_retrieval: error: {exc}", file=sys.stderr)
        return 1
    if report["model"]["random_init"]:
        print(random_init_banner(report["model"]["model_id"]), file=sys.stderr)
    print(markdown(report))
    print(f"wrote {out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
