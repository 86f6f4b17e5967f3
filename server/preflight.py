"""Checks and clean-up before the bundled Triton starts: free ports, stale shared memory.

Both fail badly inside Triton. A taken HTTP port makes it exit with a line
buried in its log; a taken gRPC port can even be shared silently, because
gRPC binds with ``SO_REUSEPORT`` and a second server on the same port splits
the connections with the first. Binding a plain socket first catches both.
Killed servers leave their Python-backend regions in ``/dev/shm`` (1 MiB or
more each, never reclaimed), so stale ones are removed at the next start.

Which regions are stale is keyed on a lock, never on process ids or on who
maps a region here: ids are reused, and containers that share ``/dev/shm``
have their own id namespaces and ``/proc``, so a region in use by a Triton
in another container looks unused from here. Each server we start gets a
:class:`ShmLease`: a lock file in ``/dev/shm`` held (``flock``) by the
launcher and by the server itself (the descriptor is inherited), and a
region prefix of its own (``--backend-config=python,shm-region-prefix-name``,
which Triton asks for anyway when servers share a host). The kernel drops
the lock when the last holder dies, so a region whose lease is unlocked is
stale, whichever namespace it came from. Regions without a lease (a Triton
we did not start) are never removed: nothing can tell whether they are in
use; they are only counted in the log.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from mert_indexer.defaults import SHM_DIR
from mert_indexer.errors import ConfigError, ServerStartError

log = logging.getLogger(__name__)

SHM_PREFIX = "triton_python_backend_shm_region_"
# Regions of a server we started: SHM_PREFIX + "mert-<token>-" + Triton's own suffix;
# its lease is LEASE_PREFIX + "<token>" + LEASE_SUFFIX in SHM_DIR.
LEASE_PREFIX = "mert-indexer-serve-"
LEASE_SUFFIX = ".lock"
_LEASED_REGION = re.compile(re.escape(SHM_PREFIX) + r"mert-([0-9a-f]{16})-")


@dataclass
class ShmLease:
    """One server's claim on its shared-memory regions: a lock held while it lives."""

    token: str
    path: Path
    fd: int | None

    @classmethod
    def acquire(cls) -> ShmLease:
        while True:
            token = secrets.token_hex(8)
            path = SHM_DIR / f"{LEASE_PREFIX}{token}{LEASE_SUFFIX}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A cleaner may have taken it for stale between creation and lock, and removed it.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return cls(token, path, fd)
            os.close(fd)

    @property
    def prefix(self) -> str:
        """The Python backend's region prefix for this server."""
        return f"{SHM_PREFIX}mert-{self.token}-"

    def release(self) -> None:
        """Drop the claim (after the server is gone); safe to call twice."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


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


def lease_alive(token: str) -> bool:
    """True while the server of lease ``token`` (or its launcher) lives, in any namespace."""
    path = SHM_DIR / f"{LEASE_PREFIX}{token}{LEASE_SUFFIX}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:  # not ours to open: assume alive
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # drops the lock we may have taken
    return False


def remove_stale_shm() -> list[str]:
    """Delete Python-backend regions (and leases) of servers we started that are gone."""
    if not SHM_DIR.is_dir():
        return []
    removed, foreign, alive = [], 0, {}
    for region in sorted(SHM_DIR.glob(SHM_PREFIX + "*")):
        m = _LEASED_REGION.match(region.name)
        if m is None:
            foreign += 1
            continue
        token = m.group(1)
        if token not in alive:
            alive[token] = lease_alive(token)
        if not alive[token]:
            with contextlib.suppress(OSError):
                region.unlink()
                removed.append(region.name)
    for lease in SHM_DIR.glob(f"{LEASE_PREFIX}*{LEASE_SUFFIX}"):
        token = lease.name[len(LEASE_PREFIX) : -len(LEASE_SUFFIX)]
        if not alive.get(token, True) or (token not in alive and not lease_alive(token)):
            with contextlib.suppress(OSError):
                lease.unlink()
    if removed:
        log.info("removed %d stale Triton shared-memory region(s) from %s", len(removed), SHM_DIR)
    if foreign:
        log.debug(
            "%d Triton shared-memory region(s) in %s were not started by indexer-serve: left "
            "alone (remove them by hand once no Triton runs on this host)",
            foreign,
            SHM_DIR,
        )
    return removed
