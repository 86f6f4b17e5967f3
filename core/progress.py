"""The progress bar of long work (index builds, compaction, exports): rate and ETA, or nothing.

tqdm is imported only when a bar is shown; callers pass ``on`` from the CLI's
``--progress``/``--no-progress``.
"""

from __future__ import annotations

from typing import Any


def progress_bar(on: bool, total: int, desc: str, unit: str = "win") -> Any:
    """A tqdm bar counting ``total`` ``unit``s (rate and ETA shown), or ``None`` when off."""
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True)
