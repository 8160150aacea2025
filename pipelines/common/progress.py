"""One progress-bar style for long data work (corpus synthesis, feature extraction)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """Return a tqdm bar on stderr; `enabled=False` gives a silent bar with the same interface."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )
