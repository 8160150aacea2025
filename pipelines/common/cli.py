"""Running a command-line entry point: user errors become one stderr line and exit code 2.

`toolkit.errors.UserError` is what a user can cause (bad file, bad config value, missing program);
it is printed as `error: <message>` on one line, without a traceback. Anything else is a bug and
keeps its traceback.

Ctrl-C (SIGINT) and SIGTERM (what `kill`, schedulers and container runtimes send) take the same
path: while the command runs, SIGTERM raises `KeyboardInterrupt` in the main thread, so open
MLflow runs end as KILLED and the command prints one line and exits with 128 + the signal
number (130 for Ctrl-C, 143 for SIGTERM). Training keeps its per-epoch backup, so the same
command resumes.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from toolkit.errors import UserError

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's `KeyboardInterrupt` so the same clean-up runs."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


def run_command(func: Callable[..., int | None], *args, **kwargs) -> int:
    """Call `func(*args, **kwargs)` and turn its outcome into an exit code.

    Returns the function's own integer result (or `0` for `None`); `2` after printing one line
    for a `UserError`; `130` (Ctrl-C) or `143` (SIGTERM) after printing one line.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        result = func(*args, **kwargs)
    except UserError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt as error:
        terminated = isinstance(error, Terminated)
        print(f"interrupted ({'SIGTERM' if terminated else 'Ctrl-C'})", file=sys.stderr, flush=True)
        return TERMINATED_EXIT_CODE if terminated else INTERRUPTED_EXIT_CODE
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0 if result is None else int(result)
