"""Run one pipeline's command line several times in a single child process.

`python -m tests.reliability.cli_batch MODULE CALLS.json` imports `MODULE` (e.g.
`pipelines.medimg`, whose `__main__` defines `main(argv) -> int`), then for each argument list
in `CALLS.json` calls `main(argv)` exactly as `python -m MODULE *argv` would, with stdout and
stderr captured, and prints one JSON object per call: `code`, `stdout`, `stderr`. An exception
escaping `main` (a bug: the real entry point would print a traceback) is recorded with its
traceback text in `stderr` and code 1. Start-up (Keras, TensorFlow or JAX) is paid once instead
of once per call, which keeps tests with many bad inputs fast.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import traceback


def run_calls(module: str, calls: list[list[str]]) -> list[dict]:
    main = importlib.import_module(f"{module}.__main__").main
    results = []
    for argv in calls:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exit_:  # argparse errors
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:  # noqa: BLE001 - recorded for the test to see
                traceback.print_exc()
                code = 1
        results.append({"argv": argv, "code": code, "stdout": out.getvalue(),
                        "stderr": err.getvalue()})  # fmt: skip
    return results


if __name__ == "__main__":
    with open(sys.argv[2], encoding="utf-8") as f:
        calls = json.load(f)
    for result in run_calls(sys.argv[1], calls):
        print(json.dumps(result), flush=True)
