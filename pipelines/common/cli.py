"""Running a command-line entry point: user errors become one stderr line and exit code 2.

`toolkit.errors.UserError` is what a user can cause (bad file, bad config value, missing program);
it is printed as `error: <message>` on one line, without a traceback. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from toolkit.errors import UserError

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130


def run_command(func: Callable[..., int | None], *args, **kwargs) -> int:
    """Call `func(*args, **kwargs)` and turn its outcome into an exit code.

    Returns the function's own integer result (or `0` for `None`); `2` after printing one line
    for a `UserError`; `130` after printing one line for Ctrl-C.
    """
    try:
        result = func(*args, **kwargs)
    except UserError as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    return 0 if result is None else int(result)
