"""The replaced approach vs ours, in the same run, on the same audio.

Baseline (what this project replaces): MERT in-process with PyTorch
(transformers ``HubertModel(HubertConfig())``, random init, the 95M
architecture), a ``ThreadPoolExecutor`` of workers sharing the model, batches
of 32 windows, librosa-style decoding (the whole file loaded, averaged to
mono, resampled in one go with soxr, as ``librosa.load(sr=24000)`` does).
Same windows (5 s, no overlap, last aligned to the end), same per-window
normalisation, same pooling (every hidden state, mean over time and layers).

Ours: the exported INT8 model served by the bundled Triton, and the real
client with its automatic sizing.

    python benchmarks/bench_baseline.py                       # exports INT8 once
    python benchmarks/bench_baseline.py --repo /path/model_repository

Writes benchmarks/results/client_baseline.{json,md} and docs/client_baseline.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_end_to_end import end_to_end, exported
from common import (
    DOCS,
    SR,
    WINDOW,
    CpuClock,
    bar_chart,
    machine,
    write_corpus,
    write_results,
)

from mert_indexer.client.tuning import usable_cores
from mert_indexer.client.windows import cut

BASELINE_BATCH = 32


def librosa_style_load(path: Path) -> np.ndarray:
    """The whole file in memory, mono by channel mean, resampled at once (soxr HQ)."""
    import soundfile as sf
    import soxr

    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError):  # m4a and friends: librosa falls back too
        import av

        with av.open(str(path)) as container:
            frames = [f.to_ndarray() for f in container.decode(audio=0)]
            rate = container.streams.audio[0].rate
        audio = np.concatenate(frames, axis=1).T.astype(np.float32)
    mono = audio.mean(axis=1)
    return soxr.resample(mono, rate, SR, quality="HQ").astype(np.float32)


class Baseline:
    """HubertModel shared by a thread pool; one file per task."""

    def __init__(self, workers: int) -> None:
        import torch
        from transformers import HubertConfig, HubertModel

        torch.manual_seed(0)
        self.torch = torch
        self.model = HubertModel(HubertConfig()).eval()
        self.workers = workers
        self.windows = 0
        self.lock = threading.Lock()

    def embed_file(self, path: Path) -> np.ndarray:
        audio = librosa_style_load(path)
        _, windows = cut(audio, WINDOW, WINDOW)
        out = []
        for i in range(0, len(windows), BASELINE_BATCH):
            x = windows[i : i + BASELINE_BATCH]
            x = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-7)
            with self.torch.inference_mode():
                states = self.model(
                    self.torch.from_numpy(x.astype(np.float32)), output_hidden_states=True
                ).hidden_states
                pooled = self.torch.stack([h.mean(dim=1) for h in states]).mean(dim=0)
            out.append(pooled.numpy())
        with self.lock:
            self.windows += len(windows)
        return np.concatenate(out)

    def run(self, files: list[Path]) -> dict:
        with CpuClock() as clock, ThreadPoolExecutor(self.workers) as ex:
            results = list(ex.map(self.embed_file, files))
        audio = sum(len(librosa_style_load(f)) for f in files) / SR
        assert all(np.isfinite(r).all() for r in results)
        return {
            "x_realtime": audio / clock.wall,
            "audio_s": audio,
            "wall_s": clock.wall,
            "cpu_s": clock.cpu,
            "windows": self.windows,
            "workers": self.workers,
            "batch": BASELINE_BATCH,
            "torch_threads": self.torch.get_num_threads(),
        }


def plot(rows: dict, out: Path) -> None:
    bar_chart(
        out,
        ["PyTorch in-process (fp32)", "client + Triton (INT8)"],
        [rows["baseline"]["x_realtime"], rows["ours"]["x_realtime"]],
        ["#999", "#2a7"],
        f"MERT-95M, {rows['machine']['cores']} CPU cores: speedup {rows['speedup']:.1f}x",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, help="an exported INT8 repository (default: export)")
    p.add_argument("--minutes", type=float, default=4.0, help="audio for each side")
    p.add_argument("--corpus", type=Path, help="corpus folder (default: a cache in /tmp)")
    p.add_argument("--workers", type=int, help="baseline threads (default: usable cores)")
    args = p.parse_args(argv)
    repo = exported("int8", args.repo)
    corpus = write_corpus(
        args.corpus or Path(tempfile.gettempdir()) / "mert-bench-e2e",
        args.minutes * 60,
        seed=5,
        lengths=(60.0, 90.0),
    )
    cores = usable_cores()
    info = machine()
    print(
        f"corpus: {len(corpus.files)} files, {corpus.seconds / 60:.1f} min {corpus.by_format}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        ours = end_to_end(repo, corpus.files, Path(tmp))
    print(f"ours (INT8, client + Triton): {ours['x_realtime']:.2f}x realtime", flush=True)
    t0 = time.perf_counter()
    baseline = Baseline(args.workers or cores)
    print(f"baseline model built in {time.perf_counter() - t0:.0f} s", flush=True)
    base = baseline.run(corpus.files)
    print(
        f"baseline (PyTorch fp32, {base['workers']} threads, batch {BASELINE_BATCH}): "
        f"{base['x_realtime']:.2f}x realtime",
        flush=True,
    )
    rows = {
        "machine": info,
        "repo": str(repo),
        "corpus": {
            "files": len(corpus.files),
            "seconds": corpus.seconds,
            "formats": corpus.by_format,
        },
        "ours": ours,
        "baseline": base,
        "speedup": ours["x_realtime"] / base["x_realtime"],
        "load_avg_at_end": os.getloadavg()[0],
    }
    table = [
        f"# Replaced approach vs ours, MERT-95M random init, {info['cpu']}, {cores} cores "
        f"(load average {info['load_avg_at_start']:.1f} at start; "
        f"{corpus.seconds / 60:.1f} min in {len(corpus.files)} files)",
        "",
        "| approach | x realtime |",
        "|---|---|",
        f"| PyTorch in-process, fp32, {base['workers']} threads sharing the model, batch "
        f"{BASELINE_BATCH}, whole-file decode | {base['x_realtime']:.2f} |",
        f"| client + local Triton, INT8, automatic sizing | {ours['x_realtime']:.2f} |",
        f"| **speedup** | **{rows['speedup']:.1f}x** |",
    ]
    md = write_results("client_baseline", rows, table)
    plot(rows, DOCS / "client_baseline.png")
    print("\n".join(table))
    print(f"wrote {md} and {DOCS / 'client_baseline.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
