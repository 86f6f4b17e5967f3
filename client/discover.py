"""Find the audio files of a run, and split them into shards.

Files are listed in a stable order; a shard is chosen by a hash of the path
relative to its input root, so the split does not move files between shards
when files are added, and every file lands in exactly one shard.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from mert_indexer.client.decode import AUDIO_SUFFIXES
from mert_indexer.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` with 0 <= i < N."""
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"--shard {text!r}: need 0 <= i < N")
        return cls(i, n)

    def owns(self, key: str) -> bool:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index


@dataclass(frozen=True)
class Candidate:
    path: str  # as the run names it: the input as given joined with the relative path
    key: str  # relative to its input root: what sharding hashes


def find_audio(inputs: list[Path], shard: Shard | None = None) -> list[Candidate]:
    """Audio files under ``inputs`` (folders are walked; files are taken as given).

    Anything named like audio is listed, also when it is not a readable file
    (a directory named ``x.mp3``, a broken link): the decoder reports it, so a
    run names every file it could not index.
    """
    found: dict[str, Candidate] = {}
    for root in inputs:
        if not os.path.lexists(root):
            raise ConfigError(f"{root}: input not found")
        if not root.is_dir():
            found[str(root)] = Candidate(str(root), root.name)
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            names = filenames + [d for d in dirnames if _is_audio_name(d)]
            for name in sorted(names):
                if not _is_audio_name(name):
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, root)
                found.setdefault(full, Candidate(full, key))
    files = sorted(found.values(), key=lambda c: c.path)
    if shard is not None:
        files = [c for c in files if shard.owns(c.key)]
    return files


def _is_audio_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in AUDIO_SUFFIXES
