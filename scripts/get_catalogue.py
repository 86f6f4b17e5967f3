#!/usr/bin/env python3
"""Fetch the game-music catalogue: 342 real tracks (20.35 h) from 19 Debian packages.

    python scripts/get_catalogue.py DEST [--manifest benchmarks/corpora/game_music.json]
                                         [--debs DIR] [--only PKG ...] [--check]

The catalogue is free game music packaged by Debian 12 (bookworm, main): the tracks
of the music folders of 19 packages (ardentryst ... xmoto-data; for ufoai-music and
nexuiz-music inside their `.pk3` zip archive), at least 30 s long, without the
near-duplicates, loops and stand-in training tracks listed as `dropped` in the
manifest. It serves retrieval benchmarks at a few hundred tracks. The manifest
(benchmarks/corpora/game_music.json) pins each package's version and each track's
member path, sha256, size, duration and split.

DEST receives:

    DEST/all/<package>__<name>   each track, byte for byte as in the package
    DEST/cat/<file>              relative symlinks into all/: the catalogue split
    DEST/un/<file>               relative symlinks into all/: the un-indexed split
                                 (files sorted by name, every 7th: index % 7 == 3)

No root and no system changes: `apt-get download PKG=VERSION` fetches each .deb into
a temporary folder (it needs the apt package lists: one `apt-get update` on the
machine; when the pinned version is gone it falls back to the current one with a
warning, and the sha256 check then says whether the tracks are still the same), or
the .deb is taken from --debs DIR; `dpkg-deb -x` unpacks it there, only the music is
copied out, and the temporary folder is deleted before the next package (about
0.6 GB at most at a time). Each track is written under a temporary name, checked
against its sha256, synced and renamed into place: a package's tracks land together
or not at all, never half-written. Idempotent: tracks already in DEST/all with the
right sha256 are kept, and a package whose tracks are all there is not downloaded.
The full set downloads about 1.9 GB of packages and keeps 1.06 GB of audio.

Licences: a summary per package in the manifest (`licence`); the authoritative text
is each package's copyright file (usr/share/doc/<package>/copyright). The audio is
never committed (see .gitignore: /data/).

--check verifies DEST against the manifest without fetching anything. Exit status:
0 when done, 1 on an error (one line on stderr: apt-get or dpkg-deb missing, a
failed download, a checksum mismatch, ...), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = ROOT / "benchmarks" / "corpora" / "game_music.json"
SPLIT_DIRS = {"catalogue": "cat", "unindexed": "un"}
CHUNK = 1 << 20
MB = 1e6
PROG = "get_catalogue"


class CatalogueError(Exception):
    """An error reported as one line on stderr, exit status 1."""


def say(msg: str) -> None:
    print(f"{PROG}: {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)


# --- manifest -------------------------------------------------------------------------


def _safe_relative(path: str) -> bool:
    parts = Path(path).parts
    return bool(parts) and not Path(path).is_absolute() and ".." not in parts


def load_manifest(path: Path) -> list[dict[str, Any]]:
    """The manifest's packages, checked for the fields this script relies on."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise CatalogueError(f"cannot read the manifest {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise CatalogueError(f"manifest {path} is not valid JSON: {e}") from e
    packages = data.get("packages") if isinstance(data, dict) else None
    if not isinstance(packages, list):
        raise CatalogueError(f"manifest {path} has no 'packages' list")
    files: set[str] = set()
    for pkg in packages:
        name = pkg.get("name") if isinstance(pkg, dict) else None
        if not name or not pkg.get("version") or not isinstance(pkg.get("tracks"), list):
            raise CatalogueError(f"manifest {path}: a package lacks name, version or tracks")
        for t in pkg["tracks"]:
            where = f"manifest {path}, package {name}"
            for key in ("member", "file", "sha256", "split"):
                if not isinstance(t.get(key), str) or not t[key]:
                    raise CatalogueError(f"{where}: a track lacks '{key}'")
            file = t["file"]
            if "/" in file or file.startswith(".") or file in files:
                raise CatalogueError(f"{where}: bad or repeated file name {file!r}")
            if not _safe_relative(t["member"]) or (
                "zip_member" in t and not _safe_relative(t["zip_member"])
            ):
                raise CatalogueError(f"{where}: {file}: member paths must be relative")
            if t["split"] not in SPLIT_DIRS:
                raise CatalogueError(f"{where}: {file}: unknown split {t['split']!r}")
            files.add(file)
    return packages


def track_source(t: dict[str, Any]) -> str:
    return f"{t['member']}:{t['zip_member']}" if "zip_member" in t else t["member"]


# --- files ----------------------------------------------------------------------------


def sha256_of(path: Path) -> str | None:
    """The file's sha256 (following symlinks), or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def is_present(all_dir: Path, t: dict[str, Any]) -> bool:
    path = all_dir / t["file"]
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if "size" in t and size != t["size"]:
        return False
    return sha256_of(path) == t["sha256"]


def write_synced(src: IO[bytes], dst: Path) -> tuple[str, int]:
    """Copy the stream into dst (created anew), fsync it; its sha256 and size."""
    h = hashlib.sha256()
    size = 0
    with open(dst, "wb") as out:
        while block := src.read(CHUNK):
            h.update(block)
            out.write(block)
            size += len(block)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """rmtree that also clears read-only folders unpacked from a package."""

    def retry(func, p, _exc):  # type: ignore[no-untyped-def]
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            os.chmod(p, 0o755)
        with contextlib.suppress(OSError):
            func(p)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


# --- packages -------------------------------------------------------------------------


def require_tool(name: str, hint: str) -> None:
    if shutil.which(name) is None:
        raise CatalogueError(f"{name} not found: {hint}")


def run_tool(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or [f"exit status {proc.returncode}"])[-1]


def deb_fields(deb: Path) -> tuple[str, str]:
    proc = run_tool(["dpkg-deb", "-f", str(deb), "Package", "Version"])
    fields = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    return fields.get("Package", ""), fields.get("Version", "")


def find_deb(debs_dir: Path, name: str, version: str) -> Path | None:
    """The package's .deb in debs_dir: the pinned version, else another one (warned)."""
    found = sorted(debs_dir.glob(f"{name}_*.deb"))
    others = []
    for deb in found:
        pkg, ver = deb_fields(deb)
        if pkg == name and ver == version:
            return deb
        if pkg == name:
            others.append((deb, ver))
    if others:
        deb, ver = others[-1]
        warn(f"{deb.name} is {name} {ver}, not {version}: using it (sha256 decides)")
        return deb
    return None


def download(name: str, version: str, into: Path) -> Path:
    """apt-get download NAME=VERSION into `into` (else the current NAME, warned)."""
    proc = run_tool(["apt-get", "download", f"{name}={version}"], cwd=into)
    if proc.returncode != 0:
        warn(f"apt-get download {name}={version} failed ({last_line(proc)}); trying {name}")
        proc = run_tool(["apt-get", "download", name], cwd=into)
        if proc.returncode != 0:
            raise CatalogueError(
                f"apt-get download {name} failed: {last_line(proc)}; run 'apt-get update' "
                "once (the apt package lists), or pass --debs DIR with the .deb"
            )
    debs = sorted(into.glob(f"{name}_*.deb"))
    if not debs:
        raise CatalogueError(f"apt-get download {name} left no {name}_*.deb in {into}")
    return debs[0]


@contextlib.contextmanager
def open_member(tree: Path, t: dict[str, Any], where: str) -> Iterator[IO[bytes]]:
    src = tree / t["member"]
    if not src.is_file():
        raise CatalogueError(f"{t['file']}: {t['member']} is not in {where}")
    if "zip_member" not in t:
        with open(src, "rb") as f:
            yield f
        return
    try:
        with zipfile.ZipFile(src) as zf, zf.open(t["zip_member"]) as f:
            yield f
    except KeyError as e:
        raise CatalogueError(
            f"{t['file']}: {t['zip_member']} is not in {t['member']} of {where}"
        ) from e
    except zipfile.BadZipFile as e:
        raise CatalogueError(f"{t['file']}: {t['member']} of {where} is no zip: {e}") from e


def fetch_package(
    pkg: dict[str, Any],
    tracks: list[dict[str, Any]],
    all_dir: Path,
    debs: Path | None,
    tmp_root: str | None,
) -> str:
    """Write the package's missing tracks into all_dir; where its .deb came from."""
    name, version = pkg["name"], pkg["version"]
    work = Path(tempfile.mkdtemp(prefix=f"{PROG}-{name}-", dir=tmp_root))
    staged: list[tuple[Path, Path]] = []
    try:
        deb = find_deb(debs, name, version) if debs is not None else None
        if deb is None:
            deb = download(name, version, work)
            origin = f"apt-get download, {deb.stat().st_size / MB:.1f} MB .deb"
        else:
            origin = f"from {deb}"
        got_version = deb_fields(deb)[1] or version
        if got_version != version:
            origin += f", version {got_version}"
        where = f"{name} {got_version}"
        tree = work / "x"
        tree.mkdir()
        proc = run_tool(["dpkg-deb", "-x", str(deb), str(tree)])
        if proc.returncode != 0:
            raise CatalogueError(f"dpkg-deb -x {deb.name} failed: {last_line(proc)}")
        if deb.parent == work:
            deb.unlink()  # the unpacked tree is all that is needed now
        mismatches = []
        for t in tracks:
            tmp = all_dir / f".{t['file']}.part"
            staged.append((tmp, all_dir / t["file"]))
            with open_member(tree, t, where) as src:
                sha, _size = write_synced(src, tmp)
            if sha != t["sha256"]:
                mismatches.append((t, sha))
        if mismatches:
            t, sha = mismatches[0]
            more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
            raise CatalogueError(
                f"sha256 mismatch for {t['file']} from package {where} ({track_source(t)}): "
                f"expected {t['sha256'][:16]}..., got {sha[:16]}...{more}"
            )
        for tmp, final in staged:
            os.replace(tmp, final)
        staged.clear()
        fsync_dir(all_dir)
        return origin
    finally:
        for tmp, _final in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        remove_tree(work)


def link_split(dest: Path, t: dict[str, Any]) -> None:
    """DEST/<split>/<file> -> ../all/<file>, replaced atomically when it differs."""
    target = f"../all/{t['file']}"
    for split, sub in SPLIT_DIRS.items():
        path = dest / sub / t["file"]
        if split != t["split"]:  # a link left in the other split by an older manifest
            if path.is_symlink() and os.readlink(path) == target:
                path.unlink()
            continue
        if path.is_symlink() and os.readlink(path) == target:
            continue
        if path.is_dir() and not path.is_symlink():
            raise CatalogueError(f"{path} is a folder, not a link into all/")
        tmp = path.with_name(f".{t['file']}.link")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, path)


# --- commands -------------------------------------------------------------------------


def check(dest: Path, packages: list[dict[str, Any]]) -> int:
    bad = 0
    for pkg in packages:
        for t in pkg["tracks"]:
            link = dest / SPLIT_DIRS[t["split"]] / t["file"]
            if not is_present(dest / "all", t):
                print(f"{PROG}: missing or wrong: all/{t['file']} ({pkg['name']})")
                bad += 1
            elif not (link.is_symlink() and os.readlink(link) == f"../all/{t['file']}"):
                print(f"{PROG}: no link {link.relative_to(dest)}")
                bad += 1
    n = sum(len(p["tracks"]) for p in packages)
    if bad:
        print(f"{PROG}: error: {bad} of {n} tracks missing or wrong in {dest}", file=sys.stderr)
        return 1
    say(f"{dest}: all {n} tracks present with their sha256 and split links")
    return 0


def fetch(args: argparse.Namespace, packages: list[dict[str, Any]]) -> int:
    dest: Path = args.dest
    all_dir = dest / "all"
    for sub in ("all", *SPLIT_DIRS.values()):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for stale in all_dir.glob(".*.part"):  # left by a killed run
        stale.unlink()
    todo = []
    for pkg in packages:
        missing = [t for t in pkg["tracks"] if not is_present(all_dir, t)]
        for t in missing:
            if (all_dir / t["file"]).exists():
                warn(f"all/{t['file']} differs from the manifest's sha256: fetching it again")
        todo.append((pkg, missing))
    if any(missing for _pkg, missing in todo):
        require_tool("dpkg-deb", "this script unpacks Debian packages (Debian/Ubuntu only)")
        needs_apt = args.debs is None or any(
            missing and not any(args.debs.glob(f"{pkg['name']}_*.deb")) for pkg, missing in todo
        )
        if needs_apt:
            require_tool("apt-get", "pass --debs DIR with the packages' .deb files")
    written = 0
    for i, (pkg, missing) in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {pkg['name']} {pkg['version']}"
        total_mb = sum(t.get("size", 0) for t in pkg["tracks"]) / MB
        if missing:
            origin = fetch_package(pkg, missing, all_dir, args.debs, args.tmp)
            mb = sum(t.get("size", 0) for t in missing) / MB
            kept = len(pkg["tracks"]) - len(missing)
            extra = f", {kept} already there" if kept else ""
            say(f"{head}: {len(missing)} tracks, {mb:.1f} MB written{extra} ({origin})")
            written += len(missing)
        else:
            say(f"{head}: {len(pkg['tracks'])} tracks, {total_mb:.1f} MB already there")
        for t in pkg["tracks"]:
            link_split(dest, t)
    counts = {s: 0 for s in SPLIT_DIRS}
    hours = {s: 0.0 for s in SPLIT_DIRS}
    for pkg in packages:
        for t in pkg["tracks"]:
            counts[t["split"]] += 1
            hours[t["split"]] += t.get("duration_s", 0.0) / 3600
    split_text = ", ".join(
        f"{counts[s]} {s} ({hours[s]:.2f} h) in {sub}/" for s, sub in SPLIT_DIRS.items()
    )
    say(f"{dest}: {sum(counts.values())} tracks ({written} written): {split_text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="get_catalogue.py",
        description="Fetch the game-music catalogue (Debian packages) into DEST.",
    )
    parser.add_argument("dest", type=Path, metavar="DEST")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--debs", type=Path, metavar="DIR", help="take .deb files from DIR")
    parser.add_argument(
        "--only", action="append", metavar="PKG", help="only this package (repeatable)"
    )
    parser.add_argument("--tmp", metavar="DIR", help="for temporaries (default: $TMPDIR)")
    parser.add_argument("--check", action="store_true", help="verify DEST, fetch nothing")
    args = parser.parse_args(argv)
    try:
        packages = load_manifest(args.manifest)
        if args.only:
            names = {p["name"] for p in packages}
            unknown = sorted(set(args.only) - names)
            if unknown:
                parser.error(
                    f"--only {', '.join(unknown)}: not in the manifest "
                    f"(one of: {', '.join(sorted(names))})"
                )
            packages = [p for p in packages if p["name"] in args.only]
        if args.debs is not None and not args.debs.is_dir():
            raise CatalogueError(f"--debs {args.debs}: no such folder")
        return check(args.dest, packages) if args.check else fetch(args, packages)
    except CatalogueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
