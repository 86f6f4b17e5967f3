"""The demo: export MERT, serve it with the bundled Triton, index audio, query a clip.

Real weights when the model hub is reachable, otherwise the exact architecture
with random weights (said loudly: its matches come from the signal, not from
music understanding). Sample audio is generated when --input is not given.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, text=True)


def export(repo: Path, size: str, force: bool) -> None:
    onnx = repo / "mert" / "1" / "model.onnx"
    if onnx.exists() and not force:
        print(f"using the existing export in {repo} (--reexport to redo it)")
        return
    exporter = [sys.executable, "export/to_onnx.py", "--output", str(repo)]
    if size == "95m" and run(exporter).returncode == 0:
        return
    if size == "95m":
        print(
            "\n*** The MERT weights are not reachable from here: exporting the exact "
            "MERT-v1-95M architecture with RANDOM weights. Embeddings are meaningless as "
            "music features; the demo still shows the whole pipeline. ***\n",
            flush=True,
        )
    if run([*exporter, "--random-init", "--size", size]).returncode != 0:
        sys.exit("demo: export failed")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--size",
        choices=("95m", "tiny"),
        default="95m",
        help="95m: MERT-v1-95M (real weights if reachable); tiny: a small random "
        "model for a quick look (default: %(default)s)",
    )
    p.add_argument("--input", type=Path, help="audio folder to index (default: generated)")
    p.add_argument("--workdir", type=Path, default=ROOT / "data" / "demo")
    p.add_argument("--reexport", action="store_true")
    args = p.parse_args()
    t0 = time.monotonic()

    from mert_indexer.client.decode import decode
    from mert_indexer.client.synth import write, write_catalogue
    from mert_indexer.server.launcher import LocalTriton, ServeOptions

    repo = args.workdir / "model_repository"
    step("export")
    export(repo, args.size, args.reexport)

    originals = args.input or args.workdir / "originals"
    if args.input is None and not any(originals.glob("*")):
        step(f"generating sample audio in {originals}")
        write_catalogue(
            originals, 6, seconds=(25, 45), suffixes=(".mp3", ".flac", ".ogg", ".wav", ".m4a")
        )
    index = args.workdir / "index"

    from mert_indexer.contract import ModelContract, load_config

    contract = ModelContract.from_config(load_config(repo / "mert" / "config.pbtxt"))
    # Random weights cannot support the no-match threshold: rank best guesses instead.
    rank = ["--min-score", "off"] if contract.model_id.startswith("random-init") else []

    step("starting the local Triton server")
    options = ServeOptions(
        model_repository=repo,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        device="cpu",
        ready_timeout=300,
    )
    with LocalTriton(options) as server:
        print(f"ready at {server.grpc_url}")
        step("indexing")
        proc = run(
            [
                str(BIN / "indexer-client"),
                "--server",
                server.grpc_url,
                "--input",
                str(originals),
                "--index",
                str(index),
            ]
        )
        if proc.returncode != 0:
            return proc.returncode

        tracks = sorted(p for p in originals.rglob("*") if p.is_file())
        source, offset = tracks[len(tracks) // 2], 12.5
        audio = decode(source, 24_000)
        offset = min(offset, max(0.0, len(audio) / 24_000 - 8.0))
        clip = write(
            args.workdir / "clip.wav",
            audio[int(offset * 24_000) : int((offset + 8.0) * 24_000)],
            24_000,
        )
        step(f"querying an 8 s clip cut from {source} at {offset:.2f} s")
        run(
            [
                str(BIN / "indexer-query"),
                "--server",
                server.grpc_url,
                "--index",
                str(index),
                *rank,
                str(clip),
            ]
        )
        out = subprocess.run(
            [
                str(BIN / "indexer-query"),
                "--server",
                server.grpc_url,
                "--index",
                str(index),
                "--json",
                *rank,
                str(clip),
            ],
            capture_output=True,
            text=True,
        )
    best = (json.loads(out.stdout)[0] or [None])[0] if out.returncode == 0 else None
    # Offsets are resolved to within one index hop (5 s) at worst; real weights do far better.
    ok = bool(best) and best["track"] == str(source) and abs(best["offset_seconds"] - offset) <= 5.0
    step("result")
    print(
        f"{'correct' if ok else 'WRONG'}: expected {source} at {offset:.2f} s, got "
        f"{best['track'] + ' at ' + format(best['offset_seconds'], '.2f') + ' s' if best else 'no match'}"
        f"  (demo took {time.monotonic() - t0:.0f} s)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
