"""What an indexing run shows a person: the progress bar and the end-of-run summary.

File names are bytes on POSIX; Python hands undecodable ones over as
surrogate escapes, which crash ``print``. :func:`display` turns them into
``\\xNN`` escapes, so every name prints, and prints the same each time.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any


def display(text: str) -> str:
    """``text`` with undecodable file-name bytes shown as ``\\xNN`` (never raises)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class RunSummary:
    """Counts of one run; the pipeline fills it, the CLI prints it."""

    indexed: int = 0
    unchanged: int = 0
    renamed: int = 0
    duplicates: int = 0
    pruned: int = 0
    windows: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    # Evidence that memory stayed bounded: windows decoded but not yet answered.
    peak_windows_held: int = 0
    peak_in_flight: int = 0
    # CPU of the PyAV decoder processes (not children of this process, so
    # invisible to os.times()); for benchmarks that count the client's CPU.
    decoder_process_cpu_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.failed

    @property
    def tracks_per_hour(self) -> float:
        return self.indexed / self.wall_seconds * 3600 if self.wall_seconds else 0.0

    @property
    def realtime(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0


def summary_lines(s: RunSummary) -> tuple[list[str], list[str]]:
    """(lines for stdout, lines for stderr) describing ``s``."""
    out = [
        f"indexed {s.indexed} track(s) ({s.windows} windows, {s.audio_seconds / 3600:.2f} h of "
        f"audio) in {_clock(s.wall_seconds)}: {s.tracks_per_hour:.0f} tracks/hour, "
        f"{s.realtime:.0f}x realtime",
        f"unchanged {s.unchanged}, renamed {s.renamed}, duplicates {s.duplicates}, "
        f"pruned {s.pruned}, skipped {len(s.skipped)}, failed {len(s.failed)}",
    ]
    err = [f"skipped: {display(p)}: {display(r)}" for p, r in s.skipped]
    err += [f"failed: {display(p)}: {display(r)}" for p, r in s.failed]
    if not s.ok:
        err.append(f"{len(s.skipped)} file(s) skipped and {len(s.failed)} failed (listed above)")
    return out, err


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Files done, windows/s, x realtime and an ETA by bytes; silent when disabled.

    The ETA counts bytes, not files: a catalogue mixes 1-minute and 10-minute
    tracks, and bytes follow duration far better than file counts do.
    """

    REFRESH_SECONDS = 0.5

    def __init__(
        self, total_files: int, total_bytes: int, enabled: bool, file: IO[str] | None = None
    ) -> None:
        self.bar: Any = None
        self.start = time.monotonic()
        self.total_bytes = max(1, total_bytes)
        self.done_bytes = 0
        self.audio = 0.0
        self.n_windows = 0
        self._last = 0.0
        if enabled and total_files:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_files,
                unit="file",
                dynamic_ncols=True,
                file=file or sys.stderr,
                bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} files "
                "[{elapsed}{postfix}]",
            )

    def windows(self, n: int) -> None:
        self.n_windows += n
        if self.bar is not None and time.monotonic() - self._last > self.REFRESH_SECONDS:
            self._refresh()
            self.bar.refresh()

    def track_done(self, audio_seconds: float, nbytes: int) -> None:
        self.audio += audio_seconds
        self.done_bytes += nbytes
        if self.bar is not None:
            self._refresh()
            self.bar.update(1)

    def _refresh(self) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        frac = min(1.0, self.done_bytes / self.total_bytes)
        eta = _clock(elapsed * (1 - frac) / frac) if frac > 0 else "?"
        self.bar.set_postfix_str(
            f"{self.n_windows / elapsed:.1f} win/s, {self.audio / elapsed:.0f}x realtime, "
            f"ETA {eta}",
            refresh=False,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
