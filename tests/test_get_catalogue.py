"""scripts/get_catalogue.py on a tiny fake .deb: no download, only dpkg-deb."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "get_catalogue.py"

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None, reason="dpkg-deb not found (Debian/Ubuntu only)"
)

MUSIC = "usr/share/games/fakemusic/music"
PK3 = "usr/share/games/fakemusic/data/music.pk3"
TRACKS = {  # file -> (member, zip member or None, bytes, split)
    "fakemusic__intro.ogg": (f"{MUSIC}/intro.ogg", None, b"OggS intro " * 300, "catalogue"),
    "fakemusic__boss_fight.ogg": (
        f"{MUSIC}/boss fight.ogg",
        None,
        b"OggS boss " * 500,
        "unindexed",
    ),
    "fakemusic__zipped.ogg": (PK3, "music/zipped.ogg", b"OggS zipped " * 400, "catalogue"),
}


def build_deb(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: fakemusic\nVersion: 1.0-1\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: fake game music\n"
    )
    (tree / MUSIC).mkdir(parents=True)
    (tree / PK3).parent.mkdir(parents=True)
    with zipfile.ZipFile(tree / PK3, "w") as zf:
        zf.writestr("music/", b"")
        for _member, zip_member, data, _split in TRACKS.values():
            if zip_member:
                zf.writestr(zip_member, data)
    for member, zip_member, data, _split in TRACKS.values():
        if not zip_member:
            (tree / member).write_bytes(data)
    debs = tmp_path / "debs"
    debs.mkdir()
    deb = debs / "fakemusic_1.0-1_all.deb"
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    return debs


def write_manifest(path: Path, wrong: str | None = None) -> Path:
    tracks = []
    for file, (member, zip_member, data, split) in TRACKS.items():
        sha = hashlib.sha256(data).hexdigest()
        if file == wrong:
            sha = hashlib.sha256(b"something else").hexdigest()
        t = {"member": member, "file": file, "sha256": sha, "size": len(data)}
        if zip_member:
            t["zip_member"] = zip_member
        tracks.append(dict(t, duration_s=60.0, split=split))
    package = {"name": "fakemusic", "version": "1.0-1", "licence": "CC0", "tracks": tracks}
    path.write_text(json.dumps({"packages": [package]}))
    return path


def run(dest: Path, manifest: Path, debs: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    tmp.mkdir(exist_ok=True)
    cmd = [sys.executable, str(SCRIPT), str(dest), "--manifest", str(manifest)]
    cmd += ["--debs", str(debs), "--tmp", str(tmp)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_fetch_links_and_is_idempotent(tmp_path):
    debs = build_deb(tmp_path)
    manifest = write_manifest(tmp_path / "manifest.json")
    dest, tmp = tmp_path / "dest", tmp_path / "tmp"

    proc = run(dest, manifest, debs, tmp)
    assert proc.returncode == 0, proc.stderr
    assert "fakemusic 1.0-1: 3 tracks" in proc.stdout
    assert sorted(os.listdir(dest / "all")) == sorted(TRACKS)
    for file, (_member, _zip, data, split) in TRACKS.items():
        assert (dest / "all" / file).read_bytes() == data
        sub, other = ("cat", "un") if split == "catalogue" else ("un", "cat")
        link = dest / sub / file
        assert link.is_symlink() and os.readlink(link) == f"../all/{file}"
        assert link.read_bytes() == data
        assert not (dest / other / file).exists()
    assert os.listdir(tmp) == []  # the unpacked package is gone

    # Second run: nothing fetched (an empty --debs: it would have to download), nothing
    # rewritten.
    before = {f: (dest / "all" / f).stat().st_ino for f in TRACKS}
    empty = tmp_path / "no_debs"
    empty.mkdir()
    proc = run(dest, manifest, empty, tmp)
    assert proc.returncode == 0, proc.stderr
    assert "3 tracks, 0.0 MB already there" in proc.stdout
    assert "(0 written)" in proc.stdout
    assert {f: (dest / "all" / f).stat().st_ino for f in TRACKS} == before

    # A lost track comes back alone; a broken link is mended.
    (dest / "all" / "fakemusic__zipped.ogg").unlink()
    (dest / "cat" / "fakemusic__intro.ogg").unlink()
    proc = run(dest, manifest, debs, tmp)
    assert proc.returncode == 0, proc.stderr
    assert "1 tracks" in proc.stdout and "2 already there" in proc.stdout
    assert (dest / "all" / "fakemusic__zipped.ogg").read_bytes() == TRACKS["fakemusic__zipped.ogg"][
        2
    ]
    assert os.readlink(dest / "cat" / "fakemusic__intro.ogg") == "../all/fakemusic__intro.ogg"

    check = subprocess.run(
        [sys.executable, str(SCRIPT), str(dest), "--manifest", str(manifest), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_wrong_sha256_fails_cleanly(tmp_path):
    debs = build_deb(tmp_path)
    manifest = write_manifest(tmp_path / "manifest.json", wrong="fakemusic__boss_fight.ogg")
    dest, tmp = tmp_path / "dest", tmp_path / "tmp"

    proc = run(dest, manifest, debs, tmp)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "sha256 mismatch" in lines[0]
    assert "fakemusic__boss_fight.ogg" in lines[0] and "fakemusic 1.0-1" in lines[0]
    assert os.listdir(dest / "all") == []  # no half-written package, no temporaries
    assert os.listdir(tmp) == []


def test_missing_apt_get_is_one_clear_line(tmp_path):
    """No .deb in --debs and no apt-get on PATH: exit 1 before anything is written."""
    manifest = write_manifest(tmp_path / "manifest.json")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg-deb").symlink_to(shutil.which("dpkg-deb"))
    empty = tmp_path / "no_debs"
    empty.mkdir()
    cmd = [sys.executable, str(SCRIPT), str(tmp_path / "dest"), "--manifest", str(manifest)]
    proc = subprocess.run(
        [*cmd, "--debs", str(empty)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=str(bin_dir)),
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "get_catalogue: error: apt-get not found: pass --debs DIR with the packages' .deb files"
    ]
    assert os.listdir(tmp_path / "dest" / "all") == []
