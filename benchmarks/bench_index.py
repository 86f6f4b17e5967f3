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

``--scale`` measures instead what daily operation of a large catalogue costs
(``benchmarks/results/index_bench_scale.{json,md}``): IVF-PQ at 100k, 300k and
1M windows (build time and peak RSS in a fresh process, bytes per window on
disk and in RAM, p50/p95 per 10 s clip, recall@10 against an exact scan of the
store); then, on the 1M index, 10 increments of 1 % each through the same
build call indexer-client makes (time against the full build; recall after
them against a fresh build), removing 1 % of the tracks by id and compacting
(time; clips of the removed tracks searched without a threshold, before and
after the compaction); 10M extrapolated by power laws through the 3 sizes.

    python benchmarks/bench_index.py --scale --clips 100     # ~40 min on 2 shared cores

Not a test: run by hand; ~6 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import contextlib
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
from mert_indexer.indexer.generation import INDEX_DIR
from mert_indexer.indexer.kinds import IndexOptions, prepare, resolve_params
from mert_indexer.indexer.loaded import LoadedIndex
from mert_indexer.indexer.plan import PendingFile
from mert_indexer.indexer.search import DEFAULT_MIN_SCORE, Searcher, SearchOptions
from mert_indexer.indexer.segments import SEGMENTS_DIR
from mert_indexer.indexer.store import IndexStore
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
                and m[0].track.endswith(f"track{t:07d}.mp3")  # stored absolute
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
    """Scores of excerpts (by noise) and of un-indexed clips per catalogue.

    The no-match threshold is chosen from these.
    """
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
        threshold = s.threshold  # the index's own, calibrated at build time
        row["threshold"] = threshold
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
                "found_rate": round(float(np.mean(sc >= threshold)), 3),
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
            "false_match_rate": round(float(np.mean(sc >= threshold)), 3),
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
            res["ivfpq"]["threshold"] = s.threshold
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
                f"| {r['n_windows']:,} | {kind} | {p} | {k['build_seconds']} | "
                f"{k['bytes_per_window']} | "
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
            f"{r['ivfpq']['unindexed_clips_matched']}/100"
            + (f" (threshold {r['ivfpq']['threshold']})" if "threshold" in r["ivfpq"] else "")
            + " |"
        )
    lines += [
        "",
        (
            "Measured on 2 cores shared with other jobs (load average 3-10): "
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
        f"## Extrapolated on paper from {e['from'][0]:,} and {e['from'][1]:,} windows "
        "(not measured)",
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
                f"| {int(n):,} | {kind} | {params} | {k['index_gib']} | {bpw} | "
                f"{k['build_minutes']} | "
                f"{lat} | {row['store_gib']} |"
            )
    lines += [
        "",
        "## No-match calibration (each index's threshold, calibrated at build time)",
        "",
        (
            "Score of the right track for 100 excerpts per noise level; best score of 100 clips "
            "of un-indexed tracks; found and false match at the index's threshold "
            f"({DEFAULT_MIN_SCORE} where an index has none)."
            + (
                f" Re-measured on {report['sizes'][0]['calibration_measured']}, with the "
                "un-indexed counts above; the timings are the earlier run's."
                if "calibration_measured" in report["sizes"][0]
                else ""
            )
        ),
        "",
        "| catalogue | null floor | threshold | excerpt n=0 min/p10/found | n=0.1 | n=0.2 "
        + "| un-indexed max/p90/false match |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["sizes"][0].get("calibration", []):
        ex = [c[f"excerpt_noise{n}"] for n in (0.0, 0.1, 0.2)]
        u = c["unindexed"]
        lines.append(
            f"| {c['catalogue']} | {c['null_similarity']} | "
            f"{c.get('threshold', DEFAULT_MIN_SCORE)} | "
            + " | ".join(f"{v['min']}/{v['p10']}/{v['found_rate']}" for v in ex)
            + f" | {u['max']}/{u['p90']}/{u['false_match_rate']} |"
        )
    return "\n".join(lines) + "\n"


# -- scale: 1M windows measured, increments, deletes, compaction (--scale) ----------


def cpu_label() -> str:
    """The CPU and the SIMD flags FAISS picks its kernels by (shared machines differ)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags]
    return f"{model} ({', '.join(simd) or 'no avx2'}), {os.cpu_count()} cores (shared)"


def add_tracks(root: Path, emb: SyntheticEmbedder, t0: int, n_windows: int, seed: int) -> int:
    """Append whole synthetic tracks from number ``t0`` until ``n_windows``; the next number."""
    t, windows = t0, 0
    with IndexStore.open(root, synthetic_identity(emb.dim, SR), create=True) as store:
        while windows < n_windows:
            n, starts, x = indexed_track(emb, t, track_seconds(t, seed), SR)
            store.add_track(
                PendingFile(f"/bench/track{t:07d}.mp3", f"h{t}", 1, 1),
                n_samples=n,
                sample_rate=SR,
                starts=starts,
                embeddings=x,
            )
            windows += len(starts)
            t += 1
            if t % 200 == 0:
                store.commit()
        store.commit()
    return t


def _update_child(root: str, threads: int, what: dict[str, Any], out: Any) -> None:
    import faiss

    faiss.omp_set_num_threads(threads)
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    with IndexStore.open(root, None, create=False, read_only=False) as store:
        if what["op"] == "build":
            result = store.build_index(
                kind=what.get("kind", "auto"), rebuild=what.get("rebuild", False), compact=False
            )
        elif what["op"] == "remove":
            result = store.remove(ids=what["ids"])
        else:
            result = store.compact()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    out.put({"result": result, "seconds": seconds, "peak_rss_delta_bytes": (peak - before) * 1024})


def in_child(root: Path, threads: int, **what: Any) -> dict[str, Any]:
    """One store operation in a fresh process: its time and peak RSS are its own."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_update_child, args=(str(root), threads, what, q))
    p.start()
    got: dict[str, Any] = q.get()
    p.join()
    return got


def exact_top(root: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k ids of ``queries`` over the live index's windows, by blocked products.

    Centred on the live generation's mean, as the index compares; reads the
    float16 segments chunk by chunk (never the whole store).
    """
    index = LoadedIndex(root / INDEX_DIR, root / SEGMENTS_DIR)
    q = index.prepare(queries)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    ids_all = index.layout.all_ids()
    for lo in range(0, len(ids_all), 65536):
        ids = ids_all[lo : lo + 65536]
        s = q @ index.vectors(ids).T
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_i = np.take_along_axis(best_i, keep, axis=1)
    index.close()
    return best_i


def recall_at(root: Path, queries: np.ndarray, want: np.ndarray) -> float:
    index = LoadedIndex(root / INDEX_DIR, root / SEGMENTS_DIR)
    got = index.knn(queries, 10)[1]
    index.close()
    return recall(got, want)


def run_scale(args: argparse.Namespace) -> dict[str, Any]:
    """Measured sizes up to 1M, then at 1M: 10 increments of 1 %, delete 1 % and compact."""
    emb = SyntheticEmbedder(dim=DIM, latent_dim=64, seed=args.seed, offset=8.0)
    sizes = sorted(args.scale_sizes)
    rows: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work))
    report: dict[str, Any] = {"cpu": cpu_label(), "threads": args.threads, "seed": args.seed}
    try:
        next_track, have = 0, 0
        for n in sizes:
            t0 = time.perf_counter()
            next_track = add_tracks(root, emb, next_track, n - have, args.seed)
            with IndexStore.open(root, None, create=False) as st:
                stats = st.stats()
            have = stats["windows"]
            ingest_s = time.perf_counter() - t0
            built = in_child(root, args.threads, op="build", rebuild=True, kind="ivfpq")
            info = built["result"]
            clips_ = clips(emb, args.clips, next_track, args.seed, noise=NOISE)
            rq = np.vstack([x for _, _, x in clips_[: args.recall_clips]])
            want = exact_top(root, rq)
            row = {
                "n_windows": have,
                "n_tracks": stats["tracks"],
                "ingest_seconds": round(ingest_s, 1),
                "build_seconds": round(built["seconds"], 1),
                "build_window_index_seconds": round(built["seconds"] - track_step(info), 1),
                "build_track_step_seconds": round(track_step(info), 1),
                "train_size": info["trained_on"],
                "factory": info["params"]["factory"],
                "nprobe": info["params"]["nprobe"],
                "peak_build_rss_mib": round(built["peak_rss_delta_bytes"] / 2**20, 1),
                "index_bytes_per_window": info["bytes_per_vector"],
                "ram_bytes_per_window": round(info["ram_bytes"] / have, 1),
                "store_bytes_per_window": round(stats["segment_bytes"] / have, 1),
                "recall@10_vs_exact": recall_at(root, rq, want),
                "recall_queries": len(rq),
            } | query(root, clips_)
            rows.append(row)
            print(f"[scale] {row}", flush=True)
        report["sizes"] = rows
        base = rows[-1]

        # Increments: 10 x 1 % of the largest size, each through the client's build call.
        inc = []
        step = base["n_windows"] // 100
        for i in range(args.increments):
            t0 = time.perf_counter()
            next_track = add_tracks(root, emb, next_track, step, args.seed)
            ingest_s = time.perf_counter() - t0
            done = in_child(root, args.threads, op="build")
            r = done["result"]
            inc.append(
                {
                    "increment": i + 1,
                    "windows_added": r["last_added_windows"],
                    "update": r["update"],
                    "seconds": round(done["seconds"], 2),
                    "window_index_seconds": round(done["seconds"] - track_step(r), 2),
                    "track_step_seconds": round(track_step(r), 2),
                    "window_index_fraction": round(
                        (done["seconds"] - track_step(r)) / base["build_window_index_seconds"], 4
                    ),
                    "ingest_seconds": round(ingest_s, 1),
                    "fraction_of_full_build": round(done["seconds"] / base["build_seconds"], 4),
                    "peak_rss_mib": round(done["peak_rss_delta_bytes"] / 2**20, 1),
                }
            )
            print(f"[scale] increment {inc[-1]}", flush=True)
        clips_ = clips(emb, args.clips, next_track, args.seed + 7, noise=NOISE)
        rq = np.vstack([x for _, _, x in clips_[: args.recall_clips]])
        want = exact_top(root, rq)
        after_inc = recall_at(root, rq, want)
        fresh = in_child(root, args.threads, op="build", rebuild=True)
        want_fresh = exact_top(root, rq)  # a fresh build centres on the new mean
        report["increments"] = {
            "steps": inc,
            "n_windows": fresh["result"]["n_vectors"],
            "recall@10_after_increments": after_inc,
            "recall@10_fresh_build": recall_at(root, rq, want_fresh),
            "fresh_build_seconds": round(fresh["seconds"], 1),
        }
        print(f"[scale] increments {report['increments']}", flush=True)

        # Delete 1 % of the tracks by id, then compact; the deleted are never returned.
        with IndexStore.open(root, None, create=False) as st:
            tracks = st.tracks()
        rng = np.random.default_rng(args.seed + 3)
        doomed = sorted(rng.choice([t.id for t in tracks], len(tracks) // 100, replace=False))
        names = {t.id: t.path for t in tracks}
        removed = in_child(root, args.threads, op="remove", ids=[int(i) for i in doomed])
        number = {names[i]: int(names[i][-11:-4]) for i in doomed}

        def returned() -> int:
            with Searcher(root, options=SearchOptions(min_score=None)) as s:
                cs = clip_starts(CLIP_SECONDS, HOP)
                hits = 0
                for path, t in list(number.items())[:100]:
                    x = emb.windows(t, 30.0 + cs, track_seconds=track_seconds(t, args.seed))
                    hits += any(m.track == path for m in s.search(x, cs, top=10))
                return hits

        after_remove = returned()
        compacted = in_child(root, args.threads, op="compact")
        report["delete"] = {
            "tracks_removed": len(doomed),
            "windows_removed": removed["result"]["removed_windows"],
            "remove_seconds": round(removed["seconds"], 2),
            "compact_seconds": round(compacted["seconds"], 1),
            "compact_peak_rss_mib": round(compacted["peak_rss_delta_bytes"] / 2**20, 1),
            "rows_copied": compacted["result"]["rows_copied"],
            "deleted_clips_searched": min(100, len(number)),
            "deleted_returned_after_remove": after_remove,
            "deleted_returned_after_compact": returned(),
        }
        print(f"[scale] delete {report['delete']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["extrapolated_10M"] = fit_10m(rows)
    return report


def track_step(info: dict[str, Any]) -> float:
    """Seconds of the track-similarity step (pooling + its index) within one build; the rest
    of a build call (open, window index, FAISS write, catalog) is the window index's part."""
    return float(info.get("track_pooling_seconds", 0.0)) + float(
        (info.get("extra_write_seconds") or {}).get("track_index", 0.0)
    )


def fit_10m(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """10M windows from the measured sizes: power laws ``y = a * n**b`` fitted in log-log."""
    n = np.array([r["n_windows"] for r in rows], np.float64)
    out: dict[str, Any] = {"from_sizes": [int(v) for v in n]}
    for key in ("build_seconds", "p50_ms", "p95_ms", "peak_build_rss_mib"):
        y = np.array([r[key] for r in rows], np.float64)
        b, log_a = np.polyfit(np.log(n), np.log(y), 1)
        out[key] = {"at_10M": round(float(np.exp(log_a) * 1e7**b), 1), "exponent": round(b, 3)}
    per = rows[-1]
    out["index_gib"] = round(per["index_bytes_per_window"] * 1e7 / 2**30, 2)
    out["store_gib"] = round(per["store_bytes_per_window"] * 1e7 / 2**30, 1)
    return out


def scale_markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Index at scale: 1M windows measured, increments, deletes, compaction",
        "",
        f"{r['cpu']}; {r['threads']} FAISS threads; seed {r['seed']}; D = {DIM}; "
        "synthetic MERT-shaped vectors (untrained-like); 10 s clips, 0.5 s hop, noise "
        f"{NOISE}; IVF-PQ built with `rebuild --kind ivfpq`. Run once, on 2 cores shared "
        "with other jobs: times are noisy and pessimistic.",
        "",
        "| windows | tracks | index | build s (window index + track step) | peak build RSS MiB "
        "| index B/window (disk) "
        "| RAM B/window (loaded index) | store B/window | p50 / p95 ms per clip | top-1 "
        "| recall@10 vs exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["sizes"]:
        lines.append(
            f"| {s['n_windows']:,} | {s['n_tracks']:,} | {s['factory']}, nprobe {s['nprobe']}, "
            f"trained on {s['train_size']:,} | {s['build_seconds']} "
            f"({s['build_window_index_seconds']} + {s['build_track_step_seconds']}) "
            f"| {s['peak_build_rss_mib']} "
            f"| {s['index_bytes_per_window']} | {s['ram_bytes_per_window']} "
            f"| {s['store_bytes_per_window']} "
            f"| {s['p50_ms']} / {s['p95_ms']} | {s['top1_accuracy']} | {s['recall@10_vs_exact']} "
            f"({s['recall_queries']} query windows) |"
        )
    i = r["increments"]
    lines += [
        "",
        f"## {len(i['steps'])} increments of 1 % each on the "
        f"{r['sizes'][-1]['n_windows']:,}-window index (the client's build call: no retraining)",
        "",
        "| increment | windows added | update | seconds (whole call) | of a full build "
        "| window index s | of its full build | track-similarity step s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in i["steps"]:
        lines.append(
            f"| {s['increment']} | {s['windows_added']:,} | {s['update']} | {s['seconds']} "
            f"| {100 * s['fraction_of_full_build']:.1f} % | {s['window_index_seconds']} "
            f"| {100 * s['window_index_fraction']:.1f} % | {s['track_step_seconds']} "
            f"| {s['peak_rss_mib']} |"
        )
    lines += [
        "",
        f"At {i['n_windows']:,} windows: recall@10 vs exact after the increments "
        f"{i['recall@10_after_increments']}, of a fresh build {i['recall@10_fresh_build']} "
        f"(difference {round(i['recall@10_fresh_build'] - i['recall@10_after_increments'], 4)}; "
        f"the fresh build took {i['fresh_build_seconds']} s).",
        "",
        "## Delete 1 % and compact",
        "",
    ]
    d = r["delete"]
    lines += [
        f"Removed {d['tracks_removed']:,} tracks ({d['windows_removed']:,} windows) by id in "
        f"{d['remove_seconds']} s; compaction copied {d['rows_copied']:,} live windows in "
        f"{d['compact_seconds']} s (peak RSS {d['compact_peak_rss_mib']} MiB). Clips of "
        f"{d['deleted_clips_searched']} deleted tracks, top 10 without a threshold: returned "
        f"{d['deleted_returned_after_remove']} times after the remove, "
        f"{d['deleted_returned_after_compact']} after the compaction.",
        "",
        "## 10M windows: extrapolated (not measured)",
        "",
    ]
    e = r["extrapolated_10M"]
    lines.append(
        f"Power laws y = a n^b fitted in log-log through the {len(e['from_sizes'])} measured "
        f"sizes ({', '.join(f'{v:,}' for v in e['from_sizes'])}): "
        + "; ".join(
            f"{k} {e[k]['at_10M']} (b = {e[k]['exponent']})"
            for k in ("build_seconds", "peak_build_rss_mib", "p50_ms", "p95_ms")
        )
        + f"; index {e['index_gib']} GiB and store {e['store_gib']} GiB (linear)."
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
    parser.add_argument(
        "--scale",
        action="store_true",
        help="the scale run instead: sizes up to 1M measured, increments, delete and compact",
    )
    parser.add_argument("--scale-sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--increments", type=int, default=10)
    parser.add_argument("--recall-clips", type=int, default=30, help="clips whose windows query")
    args = parser.parse_args(argv)
    if args.scale:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        t0 = time.perf_counter()
        report = run_scale(args)
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "index_bench_scale.json", json.dumps(report, indent=1))
        atomic_write_text(args.out / "index_bench_scale.md", scale_markdown(report))
        print(scale_markdown(report))
        return 0
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
        "machine": (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
            f"faiss {faiss.__version__}, numpy {np.__version__}"
        ),
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
