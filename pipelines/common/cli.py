"""Running a command-line entry point: user errors become one stderr line and exit code 2.

`toolkit.errors.UserError` is what a user can cause (bad file, bad config value, missing program);
it is printed as `error: <message>` on one line, without a traceback. Anything else is a bug and
keeps its traceback.

Ctrl-C (SIGINT) and SIGTERM (what `kill`, schedulers and container runtimes send) take the same
path: while the command runs, either one raises `KeyboardInterrupt` (`Terminated` for SIGTERM)
in the main thread, so open MLflow runs end as KILLED, and the command prints one line and
exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM). A SIGINT that the
calling shell ignores (`nohup`, a background job) stays ignored.

Inside `interrupts_at_safe_points()` (training wraps `fit` in it) the first signal is only
noted, and `raise_pending()` raises it at the next safe point: `InterruptAtSafePoints`
calls it after every training batch and before every epoch. Raising in the middle of a step
unwound Python frames while TensorFlow's input threads were still using them, and the
process could die with a corrupted heap (SIGABRT) instead of stopping cleanly. A second
signal raises at once, for a user who does not want to wait. Training keeps its per-epoch
backup, so the same command resumes.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from toolkit.errors import UserError

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's `KeyboardInterrupt` so the same clean-up runs."""


# `deferring`: depth of `interrupts_at_safe_points` blocks; `pending`: a signal noted there.
_state = {"deferring": 0, "pending": None}


def _interruption(signum: int) -> KeyboardInterrupt:
    if signum == signal.SIGTERM:
        return Terminated(f"signal {signum}")
    return KeyboardInterrupt()


def _on_signal(signum, frame):
    if _state["deferring"] and _state["pending"] is None:
        _state["pending"] = signum  # raised by the next `raise_pending()`
        return
    _state["pending"] = None
    raise _interruption(signum)


def pending_signal() -> int | None:
    """The signal number noted inside `interrupts_at_safe_points()` and not raised yet."""
    return _state["pending"]


def raise_pending() -> None:
    """Raises the Ctrl-C or SIGTERM noted inside `interrupts_at_safe_points()`, if any."""
    signum = _state["pending"]
    if signum is not None:
        _state["pending"] = None
        raise _interruption(signum)


@contextlib.contextmanager
def interrupts_at_safe_points() -> Iterator[None]:
    """Within the block, the first Ctrl-C/SIGTERM waits for `raise_pending()`; a second raises.

    Only takes effect under `run_command`, which installs the handlers; elsewhere (a notebook,
    a test) signals behave as Python's defaults. A signal still pending when the block ends
    normally is raised then.
    """
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if not _state["deferring"]:
        raise_pending()


def _install_handlers() -> dict:
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_signal)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    return previous


def _restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    _state["pending"] = None


def run_command(func: Callable[..., int | None], *args, **kwargs) -> int:
    """Call `func(*args, **kwargs)` and turn its outcome into an exit code.

    Returns the function's own integer result (or `0` for `None`); `2` after printing one line
    for a `UserError`; `130` (Ctrl-C) or `143` (SIGTERM) after printing one line.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = _install_handlers() if main_thread else {}
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
        _restore_handlers(previous)
    return 0 if result is None else int(result)
