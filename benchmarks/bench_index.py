"""Benchmark the index on seeded synthetic vectors shaped like MERT's (D = 768).

Measures, per catalogue size: ingest through the store; build time, index bytes
and peak build memory per window for the exact and the compressed kind (each
built in a fresh process, so its peak RSS is its own); query latency p50/p95 of
a whole 10 s clip (11 windows at 0.5 s hop: k-NN + vote + verification) and
its top-1 accuracy; recall@10 of the compressed index against exact on the
clip windows; float16 storage against float32 (smallest size); and the no-match
calibration -- scores of excerpts and of un-indexed clips -- behind
``mert_indexer.indexer.search``'s threshold. 1M and 10M windows are extrapolated on paper
from the two largest measured sizes (1M takes too long on 2 shared cores:
~8 minutes for its IVF-PQ build and exact reference alone). Results go to
``benchmarks/results/index_bench.{json,md}``,
written atomically.

    python benchmarks/bench_index.py                      # 100k and 300k windows
    python benchmarks/bench_index.py --sizes 20000 --threads 1 --out /tmp/b   # a quick look

Not a test: run by hand; ~6 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Before FAISS's OpenMP starts: on a shared, oversubscribed machine spinning
# threads cost 10x (PQ128x4 training, 8k x 768: 18 s spinning, 1.8 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mert_indexer.atomic import atomic_write_text
from mert_indexer.indexer.faiss_index import (
    INDEX_DIR,
    IndexOptions,
    LoadedIndex,
    prepare,
    resolve_params,
)
from mert_indexer.indexer.search import DEFAULT_MIN_SCORE, Searcher, SearchOptions
from mert_indexer.indexer.store import SEGMENTS_DIR, IndexStore, PendingFile
from mert_indexer.indexer.synthetic import (
    SyntheticEmbedder,
    clip_starts,
    indexed_track,
    synthetic_identity,
)

SR = 24_000
DIM = 768
CLIP_SECONDS = 10.0
HOP = 0.5
NOISE = 0.1  # a re-encoded excerpt: cosine ~0.995 to the original content part


def track_seconds(t: int, seed: int) -> float:
    return float(np.random.default_rng([seed, t]).uniform(120.0, 300.0))


def ingest(root: Path, emb: SyntheticEmbedder, n_windows: int, seed: int) -> dict[str, Any]:
    """Fill a store with synthetic tracks until ``n_windows``; one commit per 200 tracks."""
    t0 = time.perf_counter()
    t = windows = 0
    with IndexStore.open(root, synthetic_identity(emb.dim, SR), create=True) as store:
        while windows < n_windows:
            n, starts, x = indexed_track(emb, t, track_seconds(t, seed), SR)
            take = min(len(starts), n_windows - windows)
            if take < len(starts):  # the last track is cut to hit n_windows exactly
                n, starts, x = int(starts[take - 1]) + 5 * SR, starts[:take], x[:take]
            store.add_track(
                PendingFile(f"track{t:07d}.mp3", f"h{t}", 1, 1),
                n_samples=n,
                sample_rate=SR,
                starts=starts,
                embeddings=x,
            )
            windows += take
            t += 1
            if t % 200 == 0:
                store.commit()
        store.commit()
        stats = store.stats()
    seconds = time.perf_counter() - t0
    return {
        "n_tracks": t,
        "n_windows": windows,
        "ingest_seconds": round(seconds, 1),
        "store_bytes_per_window": round(stats["segment_bytes"] / windows, 1),
    }


def _status_kib(field: str) -> int:
    """A field of /proc/self/status; VmHWM (peak RSS) starts afresh at exec, unlike ru_maxrss."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _build_child(root: str, kind: str, threads: int, options: dict[str, Any], out: Any) -> None:
    import faiss

    faiss.omp_set_num_threads(threads)
    before = _status_kib("VmRSS")
    with IndexStore.open(root, None, create=False, read_only=False) as store:
        info = store.build_index(kind=kind, options=IndexOptions(**options))
    peak = _status_kib("VmHWM")
    out.put({**info, "peak_rss_delta_bytes": (peak - before) * 1024})


def build(root: Path, kind: str, threads: int, **options: Any) -> dict[str, Any]:
    """Build in a fresh process: its peak RSS is the build's alone."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_build_child, args=(str(root), kind, threads, options, q))
    p.start()
    info = q.get()
    p.join()
    return info


def clips(
    emb: SyntheticEmbedder, n: int, n_tracks: int, seed: int, *, noise: float, indexed: bool = True
) -> list[tuple[int, float, np.ndarray]]:
    """(track, offset, [11, D] embeddings) of 10 s clips, as the client windows them."""
    rng = np.random.default_rng(seed)
    cs = clip_starts(CLIP_SECONDS, HOP)
    out = []
    for i in range(n):
        t = (
            int(rng.integers(n_tracks - 1)) if indexed else 10**8 + i
        )  # the last track may be cut short
        length = track_seconds(t, seed) if indexed else 200.0
        at = float(rng.uniform(0, 100.0))  # every track is at least 120 s, cut ones included
        out.append(
            (t, at, emb.windows(t, at + cs, track_seconds=length, noise=noise, noise_seed=i))
        )
    return out


def query(root: Path, queries: list[tuple[int, float, np.ndarray]]) -> dict[str, Any]:
    """Latency of whole-clip searches; how often the top match is right (offset within a hop)."""
    cs = clip_starts(CLIP_SECONDS, HOP)
    with Searcher(root) as searcher:
        searcher.search(queries[0][2], cs)  # warm the maps
        times, right = [], 0
        for t, at, x in queries:
            t0 = time.perf_counter()
            m = searcher.search(x, cs, top=5)
            times.append(time.perf_counter() - t0)
            right += (
                bool(m)
                and m[0].track == f"track{t:07d}.mp3"
                and abs(m[0].offset_seconds - at) <= HOP
            )
    ms = np.array(times) * 1000
    return {
        "clips": len(queries),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "top1_accuracy": round(right / len(queries), 3),
    }


def knn(root: Path, x: np.ndarray, k: int = 10, rerank: int | None = None) -> np.ndarray:
    index = LoadedIndex(root / INDEX_DIR, root / SEGMENTS_DIR)
    if rerank is not None:
        index.params["rerank"] = rerank
    return index.knn(x, k)[1]


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return round(
        float(np.mean([len(set(g) & set(w)) / w.size for g, w in zip(got, want, strict=True)])), 4
    )


def float16_agreement(
    emb: SyntheticEmbedder, n_windows: int, seed: int, root: Path, queries: np.ndarray
) -> float:
    """Exact top-10 from the float16 store against exact top-10 from float32 originals."""
    xs, t, windows = [], 0, 0
    while windows < n_windows:
        x = indexed_track(emb, t, track_seconds(t, seed), SR)[2][: n_windows - windows]
        xs.append(x)
        windows += len(x)
        t += 1
    x32 = np.vstack(xs)
    mean = x32.mean(axis=0)
    import faiss

    flat = faiss.IndexFlatIP(x32.shape[1])
    flat.add(prepare(x32, mean))
    want = flat.search(prepare(queries, mean), 10)[1]
    return recall(knn(root, queries), want)


def calibration(
    threads: int, seed: int, big_root: Path, big_emb: SyntheticEmbedder, n_tracks: int
) -> list[dict[str, Any]]:
    """Scores of excerpts (by noise) and of un-indexed clips per catalogue: the threshold's basis."""
    rows = []
    cs = clip_starts(CLIP_SECONDS, HOP)
    worlds = [
        ("D=32, 6 tracks of 16-30 s (the end-to-end tests' size)", 32, 16, 6, (16.0, 30.0)),
        ("D=32, 200 tracks", 32, 16, 200, (20.0, 240.0)),
        ("D=768, 200 tracks", 768, 64, 200, (20.0, 240.0)),
    ]
    for name, dim, latent, n, (lo, hi) in worlds:
        emb = SyntheticEmbedder(dim=dim, latent_dim=latent, seed=seed, offset=8.0)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            rng = np.random.default_rng(seed)
            lengths = rng.uniform(lo, hi, n)
            with IndexStore.open(root, synthetic_identity(dim, SR), create=True) as store:
                for t in range(n):
                    k, starts, x = indexed_track(emb, t, lengths[t], SR)
                    store.add_track(
                        PendingFile(f"t{t}", f"h{t}", 1, 1),
                        n_samples=k,
                        sample_rate=SR,
                        starts=starts,
                        embeddings=x,
                    )
                store.commit()
                info = store.build_index()
            rows.append(_score_world(name, root, emb, lengths, info, cs, seed))
    rows.append(
        _score_world(
            f"D=768, {n_tracks - 1} tracks (the 1st benchmark size)",
            big_root,
            big_emb,
            np.array([track_seconds(t, seed) for t in range(n_tracks - 1)]),  # last is cut
            Searcher(big_root).info,
            cs,
            seed,
        )
    )
    return rows


def _score_world(
    name: str,
    root: Path,
    emb: SyntheticEmbedder,
    lengths: np.ndarray,
    info: dict[str, Any],
    cs: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed + 5)
    row: dict[str, Any] = {"catalogue": name, "null_similarity": info["params"]["null_similarity"]}
    n_clips = 100
    with Searcher(root, options=SearchOptions(min_score=0.0)) as s:
        for noise in (0.0, 0.1, 0.2):
            scores = []
            for i in range(n_clips):
                t = int(rng.integers(len(lengths)))
                at = float(rng.uniform(0, max(0.0, lengths[t] - CLIP_SECONDS)))
                x = emb.windows(
                    t, at + cs, track_seconds=float(lengths[t]), noise=noise, noise_seed=i
                )
                m = [a for a in s.search(x, cs, top=5) if a.track in (f"t{t}", f"track{t:07d}.mp3")]
                scores.append(m[0].score if m else 0.0)
            sc = np.array(scores)
            row[f"excerpt_noise{noise}"] = {
                "min": round(float(sc.min()), 3),
                "p10": round(float(np.percentile(sc, 10)), 3),
                "found_rate": round(float(np.mean(sc >= DEFAULT_MIN_SCORE)), 3),
            }
        scores = []
        for i in range(n_clips):
            x = emb.windows(10**8 + i, 50.0 + cs, track_seconds=100.0, noise=NOISE, noise_seed=i)
            m = s.search(x, cs, top=1)
            scores.append(m[0].score if m else 0.0)
        sc = np.array(scores)
        row["unindexed"] = {
            "max": round(float(sc.max()), 3),
            "p90": round(float(np.percentile(sc, 90)), 3),
            "false_match_rate": round(float(np.mean(sc >= DEFAULT_MIN_SCORE)), 3),
        }
    return row


def run_size(
    n: int, args: argparse.Namespace, emb: SyntheticEmbedder, first: bool
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"bench{n}-", dir=args.work))
    try:
        res: dict[str, Any] = {"n_windows": n}
        res.update(ingest(root, emb, n, args.seed))
        print(f"[{n}] ingest {res['ingest_seconds']} s", flush=True)
        positives = clips(emb, args.clips, res["n_tracks"], args.seed, noise=NOISE)
        exact_clips = positives[: max(20, args.clips * 100_000 // n // 2)]
        recall_q = np.vstack([x for _, _, x in exact_clips])

        info = build(root, "exact", args.threads, exact_max=n)
        res["exact"] = _summary(info) | query(root, exact_clips)
        want = knn(root, recall_q)
        if first:
            res["float16_vs_float32_recall@10"] = float16_agreement(
                emb, n, args.seed, root, recall_q
            )
        print(f"[{n}] exact {res['exact']}", flush=True)

        info = build(root, "ivfpq", args.threads)
        res["ivfpq"] = _summary(info) | query(root, positives)
        res["ivfpq"]["recall@10_vs_exact"] = recall(knn(root, recall_q), want)
        res["ivfpq"]["recall@10_vs_exact_without_rerank"] = recall(
            knn(root, recall_q, rerank=0), want
        )
        res["recall_queries"] = len(recall_q)
        negatives = clips(emb, 100, res["n_tracks"], args.seed + 1, noise=NOISE, indexed=False)
        with Searcher(root) as s:
            res["ivfpq"]["unindexed_clips_matched"] = sum(
                bool(s.search(x, clip_starts(CLIP_SECONDS, HOP))) for _, _, x in negatives
            )
        print(f"[{n}] ivfpq {res['ivfpq']}", flush=True)
        if first:
            res["calibration"] = calibration(args.threads, args.seed, root, emb, res["n_tracks"])
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    p = info["params"]
    keep = {
        k: p[k] for k in ("factory", "nlist", "pq_m", "nprobe", "rerank", "train_size") if k in p
    }
    return {
        "build_seconds": p["build_seconds"],
        "index_bytes": info["bytes"],
        "bytes_per_window": info["bytes_per_vector"],
        "peak_build_rss_mib": round(info["peak_rss_delta_bytes"] / 2**20, 1),
        "params": keep,
        "null_similarity": p["null_similarity"],
    }


def extrapolate(
    results: list[dict[str, Any]], targets: tuple[int, ...] = (1_000_000, 10_000_000)
) -> dict[str, Any]:
    """1M and 10M on paper from the measured sizes.

    Index bytes and build time: a straight line through the two largest sizes.
    Query latency: bounds, because on a shared machine two noisy points do not
    give a slope. Lower bound, the largest size's measurement; upper bound, all
    of it scaling with the work per query -- the codes one query window scans,
    ``n * nprobe / nlist`` under the default parameters, for IVF-PQ; n for exact.
    """
    a, b = results[-2:] if len(results) > 1 else (results[-1], results[-1])

    def line(y0: float, y1: float, x: float) -> float:
        x0, x1 = a["n_windows"], b["n_windows"]
        return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    def work(kind: str, n: int) -> float:
        if kind == "exact":
            return float(n)
        p = resolve_params(n, DIM, IndexOptions(kind="ivfpq"))
        return n * p["nprobe"] / p["nlist"]

    out: dict[str, Any] = {"from": [a["n_windows"], b["n_windows"]], "targets": {}}
    for n in targets:
        row: dict[str, Any] = {}
        for kind in ("exact", "ivfpq"):
            ka, kb = a[kind], b[kind]
            grow = work(kind, n) / work(kind, b["n_windows"])
            row[kind] = {
                "index_gib": round(line(ka["index_bytes"], kb["index_bytes"], n) / 2**30, 2),
                "build_minutes": round(line(ka["build_seconds"], kb["build_seconds"], n) / 60, 1),
                "p50_ms": [kb["p50_ms"], round(kb["p50_ms"] * grow, 1)],
                "p95_ms": [kb["p95_ms"], round(kb["p95_ms"] * grow, 1)],
            }
        p = resolve_params(n, DIM, IndexOptions(kind="ivfpq"))
        row["ivfpq"]["params"] = {k: p[k] for k in ("factory", "nprobe")}
        row["ivfpq"]["bytes_per_window"] = round(row["ivfpq"]["index_gib"] * 2**30 / n, 1)
        row["store_gib"] = round(b["store_bytes_per_window"] * n / 2**30, 1)
        out["targets"][n] = row
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Index benchmark",
        "",
        (
            f"{report['machine']}; {report['threads']} FAISS thread(s); "
            f"seed {report['seed']}; D = {DIM}; synthetic MERT-shaped vectors (untrained-like: "
            "common offset, cosine 0.95-0.995 between unrelated windows); 10 s clips, 0.5 s hop "
            f"(11 windows), noise {NOISE}."
        ),
        "",
        (
            "| windows | kind | params | build s | index bytes/window | peak build RSS MiB | "
            "p50 ms/clip | p95 ms/clip | top-1 | recall@10 vs exact |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["sizes"]:
        for kind in ("exact", "ivfpq"):
            k = r[kind]
            p = k["params"].get("factory", "IndexFlatIP") + (
                f", nprobe {k['params']['nprobe']}, rerank {k['params']['rerank']}"
                if kind == "ivfpq"
                else ""
            )
            rec = (
                f"{k['recall@10_vs_exact']} (PQ alone {k['recall@10_vs_exact_without_rerank']})"
                if kind == "ivfpq"
                else "1 (reference)"
            )
            lines.append(
                f"| {r['n_windows']:,} | {kind} | {p} | {k['build_seconds']} | {k['bytes_per_window']} | "
                f"{k['peak_build_rss_mib']} | {k['p50_ms']} | {k['p95_ms']} | "
                f"{k['top1_accuracy']} ({k['clips']} clips) | {rec} |"
            )
    lines += [
        "",
        "| windows | tracks | ingest s | store bytes/window | recall queries "
        + "| unindexed clips matched (ivfpq) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["sizes"]:
        lines.append(
            f"| {r['n_windows']:,} | {r['n_tracks']:,} | {r['ingest_seconds']} | "
            f"{r['store_bytes_per_window']} | {r['recall_queries']} | "
            f"{r['ivfpq']['unindexed_clips_matched']}/100 |"
        )
    lines += [
        "",
        (
            "Measured on 2 cores shared with other engineers' jobs (load average 3-10): "
            "latencies are noisy, a run that coincides with a busy spell reads slower. Peak "
            "build RSS counts the memory-mapped segment pages the build reads (page cache), so "
            "it overstates what a build must own."
        ),
    ]
    first = report["sizes"][0]
    if "float16_vs_float32_recall@10" in first:
        lines += [
            "",
            (
                f"float16 store vs float32 originals, exact top-10 agreement at "
                f"{first['n_windows']:,} windows: {first['float16_vs_float32_recall@10']}"
            ),
        ]
    e = report["extrapolated"]
    lines += [
        "",
        f"## Extrapolated on paper from {e['from'][0]:,} and {e['from'][1]:,} windows (not measured)",
        "",
        "| windows | kind | params | index GiB | bytes/window | build min | p50 ms/clip (bounds) "
        + "| p95 ms/clip (bounds) | store GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, row in e["targets"].items():
        for kind in ("exact", "ivfpq"):
            k = row[kind]
            params = (
                f"{k['params']['factory']}, nprobe {k['params']['nprobe']}"
                if kind == "ivfpq"
                else "IndexFlatIP"
            )
            bpw = k.get("bytes_per_window", round(k["index_gib"] * 2**30 / int(n), 1))
            lat = " | ".join(f"{lo}-{hi}" for lo, hi in (k["p50_ms"], k["p95_ms"]))
            lines.append(
                f"| {int(n):,} | {kind} | {params} | {k['index_gib']} | {bpw} | {k['build_minutes']} | "
                f"{lat} | {row['store_gib']} |"
            )
    lines += [
        "",
        f"## No-match calibration (threshold {DEFAULT_MIN_SCORE})",
        "",
        (
            "Score of the right track for 100 excerpts per noise level; best score of 100 clips "
            "of un-indexed tracks."
        ),
        "",
        "| catalogue | null floor | excerpt n=0 min/p10/found | n=0.1 | n=0.2 "
        + "| un-indexed max/p90/false match |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["sizes"][0].get("calibration", []):
        ex = [c[f"excerpt_noise{n}"] for n in (0.0, 0.1, 0.2)]
        u = c["unindexed"]
        lines.append(
            f"| {c['catalogue']} | {c['null_similarity']} | "
            + " | ".join(f"{v['min']}/{v['p10']}/{v['found_rate']}" for v in ex)
            + f" | {u['max']}/{u['p90']}/{u['false_match_rate']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100_000, 300_000],
        help="measured sizes; 1M and 10M are extrapolated from the two largest",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clips", type=int, default=200, help="query clips per size (ivfpq)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for the stores")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--render",
        action="store_true",
        help="re-derive the extrapolation and the .md from --out's JSON; measure nothing",
    )
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads((args.out / "index_bench.json").read_text())
        report["extrapolated"] = extrapolate(report["sizes"])
        return write_report(report, args.out)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    emb = SyntheticEmbedder(dim=DIM, latent_dim=64, seed=args.seed, offset=8.0)
    results = [run_size(n, args, emb, i == 0) for i, n in enumerate(sorted(args.sizes))]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"faiss {faiss.__version__}, numpy {np.__version__}",
        "threads": args.threads,
        "seed": args.seed,
        "dim": DIM,
        "noise": NOISE,
        "sizes": results,
        "extrapolated": extrapolate(results),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    return write_report(report, args.out)


def write_report(report: dict[str, Any], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "index_bench.json", json.dumps(report, indent=1))
    atomic_write_text(out / "index_bench.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
