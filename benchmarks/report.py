"""Pieces the benchmarks share for their Markdown reports: the CPU's name, numbers, appending."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from `/proc/cpuinfo`, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fmt(value, digits=3) -> str:
    """`value` with `digits` decimals; `n/a` for `None` or NaN."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}f}"


def append_markdown(path, text: str) -> None:
    """Appends `text` as it is to the Markdown file `path` (`--markdown-out`)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
