"""Running a pipeline command in a child process and measuring its peak memory.

`run_measured` starts `python -m <module> ...` from the repository root, waits for it with
`os.wait4` (the CPU time of that one child) and returns its exit code, output, wall time and
peak resident memory. On Linux the peak is the child's own `VmHWM` (read from
`/proc/<pid>/status` every 20 ms while it runs): `ru_maxrss` would not do, because Linux carries
the parent's resident size at fork time over `execve`, so a child of a 3 GB pytest worker reports
at least 3 GB whatever it uses.
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


class _PeakWatcher(threading.Thread):
    """Polls a child's `VmHWM` (its own peak resident size, in bytes) until stopped."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            try:
                for line in self.path.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
                        break
            except (OSError, ValueError):
                pass  # not started yet, or already gone
            self._done.wait(self.interval)

    def stop(self):
        self._done.set()
        self.join()


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
        watcher = _PeakWatcher(process.pid)
        watcher.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
            watcher.stop()
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    if watcher.peak:
        peak = watcher.peak
    if process.returncode < 0:
        stderr += f"\n[killed by signal {-process.returncode} after {seconds:.0f} s]"
    cpu = usage.ru_utime + usage.ru_stime
    return Finished(process.returncode, stdout, stderr, seconds, peak, cpu)
