"""Where the pipelines keep data that outlives one run.

Everything reusable across runs (the built-in speech corpus, the feature cache) lives under one
folder outside the source tree, so a second `train` reuses what the first one built:

- `$ATTENTION_TOOLKIT_HOME` when that environment variable is set,
- else `~/.local/share/attention-toolkit/`.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "ATTENTION_TOOLKIT_HOME"


def toolkit_home() -> Path:
    """Return the folder for data reused across runs (created on first use by the callers)."""
    value = os.environ.get(HOME_ENV)
    if value:
        return Path(value).expanduser().absolute()
    return Path.home() / ".local" / "share" / "attention-toolkit"
