"""Checks and clean-up before the bundled Triton starts: free ports, stale shared memory.

Both fail badly inside Triton. A taken HTTP port makes it exit with a line
buried in its log; a taken gRPC port can even be shared silently, because
gRPC binds with ``SO_REUSEPORT`` and a second server on the same port splits
the connections with the first. Binding a plain socket first catches both.
Killed servers leave their Python-backend regions in ``/dev/shm`` (1 MiB or
more each, never reclaimed), so regions that no process maps are removed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from pathlib import Path

from mert_indexer.errors import ConfigError, ServerStartError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
# A region younger than this may belong to a server that is starting right
# now and has not mapped it yet (another user's, or a parallel test's).
SHM_GRACE_SECONDS = 30.0


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Raise :class:`ServerStartError` for the first port in ``ports`` (flag -> port) in use."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port in seen:
            raise ConfigError(f"{flag} and {seen[port]} are both {port}: give each its own port")
        seen[port] = flag
    for flag, port in ports.items():
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot resolve --host {host!r}: {exc.strerror}") from exc
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR ignores TIME_WAIT leftovers, never a live listener.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ServerStartError(
                    f"port {port} ({flag}) on {host} is not available: {exc.strerror}; "
                    f"stop what uses it or pass another {flag}"
                ) from None


def mapped_shm_regions() -> set[str]:
    """Names of the Triton regions that some live process has mapped (from /proc/*/maps)."""
    in_use: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            for line in maps.read_text(errors="replace").splitlines():
                if SHM_PREFIX in line:
                    in_use.add(line.rsplit("/", 1)[-1].split(" ")[0])
    return in_use


def remove_stale_shm(grace_seconds: float = SHM_GRACE_SECONDS) -> list[str]:
    """Delete Python-backend regions that no live process maps and that are past the grace age."""
    regions = sorted(SHM_DIR.glob(SHM_PREFIX + "*")) if SHM_DIR.is_dir() else []
    if not regions:
        return []
    in_use = mapped_shm_regions()
    now = time.time()
    removed = []
    for region in regions:
        if region.name in in_use:
            continue
        with contextlib.suppress(OSError):
            if now - region.stat().st_mtime < grace_seconds:
                continue
            region.unlink()
            removed.append(region.name)
    if removed:
        log.info("removed %d stale Triton shared-memory region(s) from %s", len(removed), SHM_DIR)
    return removed
