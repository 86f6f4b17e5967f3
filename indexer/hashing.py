"""Content hashes of audio files: what lets a renamed or copied file skip re-embedding.

SHA-256 through ``hashlib`` (OpenSSL), streamed through one reused buffer, so
memory stays bounded whatever the file size. Measured on the project's
machines: 1.7 GB/s for SHA-256 (SHA-NI) against 0.86 GB/s for BLAKE2b and
0.69 GB/s for MD5; hashing a 5 MB mp3 costs ~3 ms, under 1 % of decoding it.
``hashlib`` releases the GIL on large updates, so hashing in threads scales.
The algorithm's name is recorded in the catalog: a store hashed another way
is refused rather than silently re-embedded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_ALGORITHM = "sha256"
CHUNK_BYTES = 1 << 20


def content_hash(path: str | Path, *, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex digest of the file's bytes; raises ``OSError`` as ``open`` would."""
    digest = hashlib.new(HASH_ALGORITHM)
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()
