"""The near-duplicate report at scale, and the track index's exact-vs-HNSW threshold.

``--part report`` (default): a seeded synthetic catalogue of about ``--windows``
windows (D = 768, untrained-like vectors, tracks of 2-5 min) with ``--copies``
planted relations of each kind (an encoding with noise, a 30 s excerpt inside
unrelated audio, a copy shifted by 2 s: a fraction of the 5 s hop), indexed as
the build does (``auto``: IVF-PQ above 30k windows). Reports the build time,
the report's time and peak memory, its precision and recall on the planted
pairs, and the best score of an unplanted pair (the threshold's margin,
measured like the query's no-match floor: unrelated content, high quantile).

``--part tracks``: one exact track query (a matrix-vector product) against
HNSW (M = 32, efSearch = 128) at D = 768: query time, build rate, recall@10.

    python benchmarks/bench_duplicates.py --windows 100000
    python benchmarks/bench_duplicates.py --part tracks
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from mert_indexer.indexer.duplicates import DuplicateOptions, find_duplicates
from mert_indexer.indexer.similarity import TrackFinder
from tests.planted import planted_catalogue, write_store

RESULTS = ROOT / "benchmarks" / "results"


def report_part(windows: int, copies: int, dim: int) -> dict:
    mean_seconds = 210.0
    n_tracks = max(3 * copies, round(windows / (mean_seconds / 5.0)))
    emb, planted = planted_catalogue(
        n_tracks, dim=dim, offset=8.0, shift=2.0, copies=copies, seconds=(120.0, 300.0)
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_store(Path(tmp), emb, planted)
        build_s = time.perf_counter() - t0
        with TrackFinder.open(tmp) as finder:
            loaded = finder.loaded
            t1 = time.perf_counter()
            loose = find_duplicates(loaded, DuplicateOptions(min_score=0.0), progress=True)
            report_s = time.perf_counter() - t1
            info = {"kind": loaded.kind, "n_vectors": loaded.ntotal, "tracks": len(loaded.runs)}
            floor = loaded.params.get("null_similarity")
    want = {(a, b) for a, b, *_ in planted.pairs}
    threshold = DuplicateOptions().min_score
    got = {(Path(p.track_a).name, Path(p.track_b).name): p.score for p in loose}
    reported = {k for k, s in got.items() if s >= threshold}
    tp = len(reported & want)
    unplanted = sorted((s for k, s in got.items() if k not in want), reverse=True)
    planted_scores = sorted(s for k, s in got.items() if k in want)
    by_kind = {
        kind: round(
            len({k for k in reported & want if k[1].startswith(kind)})
            / max(1, len({k for k in want if k[1].startswith(kind)})),
            4,
        )
        for kind in ("reencode", "excerpt", "shifted")
    }
    return {
        "part": "report",
        "recall_by_kind": by_kind,
        "windows": info["n_vectors"],
        "tracks": info["tracks"],
        "dim": dim,
        "index_kind": info["kind"],
        "no_match_floor": floor,
        "planted_pairs": len(want),
        "threshold": threshold,
        "precision": round(tp / max(1, len(reported)), 4),
        "recall": round(tp / len(want), 4),
        "planted_min_score": round(planted_scores[0], 4) if planted_scores else None,
        "unplanted_candidates": len(unplanted),
        "unplanted_max_score": round(unplanted[0], 4) if unplanted else None,
        "build_seconds": round(build_s, 1),
        "report_seconds": round(report_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cpus": os.cpu_count(),
    }


def tracks_part(sizes: list[int], dim: int) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        x = rng.standard_normal((n, 64)).astype(np.float32) @ rng.standard_normal((64, dim)).astype(
            np.float32
        )
        x += 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q = x[rng.choice(n, 50, replace=False)]
        t = time.perf_counter()
        for i in range(len(q)):
            s = x @ q[i]
            np.argpartition(-s, 11)[:11]
        row = {"tracks": n, "exact_query_ms": round((time.perf_counter() - t) / len(q) * 1e3, 2)}
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        t = time.perf_counter()
        index.add(x)
        row["hnsw_build_per_s"] = round(n / (time.perf_counter() - t))
        index.hnsw.efSearch = 128
        truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
        t = time.perf_counter()
        _, ids = index.search(q, 10)
        row["hnsw_query_ms"] = round((time.perf_counter() - t) / len(q) * 1e3, 2)
        row["hnsw_recall_at_10"] = round(
            float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])), 3
        )
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("report", "tracks"), default="report")
    p.add_argument("--windows", type=int, default=100_000)
    p.add_argument("--copies", type=int, default=20, help="planted relations of each kind")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    args = p.parse_args()
    if args.part == "report":
        result: dict | list = report_part(args.windows, args.copies, args.dim)
    else:
        result = tracks_part(args.sizes, args.dim)
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"duplicates_{args.part}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
