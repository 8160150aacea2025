"""Running a pipeline command in a child process and measuring its peak memory.

`run_measured` starts `python -m <module> ...` from the repository root, waits for it with
`os.wait4` (which returns the resource usage of that one child, so earlier children of the test
process do not count) and returns its exit code, output, wall time and peak resident memory.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["ROOT", "Finished", "child_env", "run_measured"]

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Finished:
    """What a finished child left: exit code, output, wall and CPU seconds, peak RSS in bytes."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int
    cpu_seconds: float = 0.0

    @property
    def error_lines(self) -> list[str]:
        """The `error: ...` lines of stderr (libraries may log other lines there)."""
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def child_env(home: Path) -> dict[str, str]:
    """The test's environment (same Keras backend) with the toolkit's data folder in `home`."""
    env = dict(os.environ)
    env.update(
        {
            "ATTENTION_TOOLKIT_HOME": str(home),
            "PYTHONPATH": str(ROOT),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "MLFLOW_TRACKING_URI": "",
        }
    )
    return env


def run_measured(module: str, arguments, env, cwd=None, timeout: float = 900) -> Finished:
    """Run `python -m module *arguments` to completion; the child is killed after `timeout`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", module, *[str(a) for a in arguments]],
            cwd=cwd or ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    if process.returncode < 0:
        stderr += f"\n[killed by signal {-process.returncode} after {seconds:.0f} s]"
    cpu = usage.ru_utime + usage.ru_stime
    return Finished(process.returncode, stdout, stderr, seconds, peak, cpu)
