"""The distribution: one import package, working console scripts, extras that resolve cleanly.

Built from this checkout with the installed setuptools (no network); the extras
are resolved by pip against the package index (``--dry-run``, nothing installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("indexer-serve", "indexer-client", "indexer-query", "indexer-merge")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, installed (without dependencies) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "wheel"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp / "wheel").glob("mert_indexer-*.whl")
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return site


def _dist_info(site: Path) -> Path:
    (info,) = site.glob("mert_indexer-*.dist-info")
    return info


def test_the_wheel_installs_one_import_package(installed: Path) -> None:
    info = _dist_info(installed)
    files = [line.split(",")[0] for line in (info / "RECORD").read_text().splitlines()]
    top = {f.split("/")[0] for f in files} - {info.name, ".."}  # "../../bin/": the scripts
    assert top == {"mert_indexer"}, top
    assert (info / "top_level.txt").read_text().split() == ["mert_indexer"]
    assert (installed / "mert_indexer" / "server" / "backend" / "model.py").is_file()
    assert (installed / "mert_indexer" / "py.typed").is_file()


def test_console_scripts_run_from_the_installed_wheel(installed: Path) -> None:
    # -S: no site-packages processing, so the checkout's editable install is not seen;
    # the dependencies come from this environment's site-packages through PYTHONPATH.
    deps = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), deps])}
    for name in SCRIPTS:
        proc = subprocess.run(
            [sys.executable, "-S", str(installed / "bin" / name), "--help"],
            capture_output=True, text=True, env=env, timeout=120, cwd=installed,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert f"usage: {name}" in proc.stdout
    where = subprocess.run(
        [sys.executable, "-S", "-c", "import mert_indexer; print(mert_indexer.__file__)"],
        capture_output=True, text=True, env=env, timeout=60, cwd=installed, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(installed))


FAMILIES = {
    "faiss": ("faiss-cpu", "faiss-gpu-cu12"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
}


def test_no_extra_but_cpu_and_gpu_brings_faiss_or_onnxruntime() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"(base)": project["dependencies"], **project["optional-dependencies"]}
    for extra, requirements in groups.items():
        names = {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()
                 for r in requirements}  # fmt: skip
        runtime = {n for family in FAMILIES.values() for n in family} & names
        if extra == "cpu":
            assert runtime == {"faiss-cpu", "onnxruntime"}
        elif extra == "gpu":
            assert runtime == {"faiss-gpu-cu12", "onnxruntime-gpu"}
        else:
            assert not runtime, f"[{extra}] must leave FAISS and ONNX Runtime to [cpu] or [gpu]"


@pytest.mark.parametrize("extras", ["cpu,server", "gpu,server"])
def test_an_install_resolves_exactly_one_faiss_and_one_onnxruntime(
    extras: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "--report", str(report), f"{ROOT}[{extras}]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    for family, members in FAMILIES.items():
        got = names & set(members)
        assert len(got) == 1, f"[{extras}]: {family} from {sorted(got) or 'nothing'}"
    assert ("gpu" in extras) == ("onnxruntime-gpu" in names)
