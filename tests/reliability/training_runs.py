"""Helpers for the reliability tests that drive real trainings: data, commands, MLflow checks.

Each training runs the real CLI (`python -m pipelines.<name> train`) in a subprocess, with its
output in files (a full pipe would block it), on data built in the test's temporary folder and
against a SQLite MLflow store there. Nothing touches the user's default store or data folder:
`ATTENTION_TOOLKIT_HOME` points into the temporary folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Tiny configs, more epochs than the shipped 2-3, early stopping out of the way.
ASR_OVERRIDES = [
    "optim.patience=20",
    "data.max_train_utterances=16",
    "data.max_dev_utterances=2",
    "jit_compile=false",
]
MEDIMG_OVERRIDES = [
    "optim.patience=20",
    "evaluation.heatmap_methods=[native]",
    "evaluation.bootstrap=20",
]
# Guards against a hung process only: a loaded shared CPU can slow a tiny training 10-fold.
TIMEOUT = 900

# Metrics the tracking callback logs at every epoch (steps 0..E-1).
EPOCH_METRICS = {
    "asr": ("loss", "dev_cer", "dev_wer", "learning_rate", "epoch_time_s"),
    "medimg": ("loss", "val_auc", "val_loss", "val_pointing_game", "learning_rate", "epoch_time_s"),
}


def environment(root: Path) -> dict:
    """The subprocess environment: the repository importable, every store under `root`."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        {
            "ATTENTION_TOOLKIT_HOME": str(root / "home"),
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def build_asr_corpus(root: Path) -> Path:
    """A 30-utterance espeak-ng corpus in `root/corpus`."""
    out = root / "corpus"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.asr", "make-corpus", "--out", str(out),
         "--utterances", "30", "--no-progress", "--workers", "2"],
        cwd=root, env=environment(root), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def build_medimg_dataset(root: Path) -> Path:
    """The 16-scan synthetic lesion dataset in `root/scans`; returns its datalist."""
    out = root / "scans"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.medimg", "make-dataset", "--out", str(out),
         "--scans", "16", "--no-progress"],
        cwd=root, env=environment(root), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "datalist.csv"


def train_command(pipeline: str, data: Path, out: Path, uri: str, epochs: int) -> list[str]:
    overrides = ASR_OVERRIDES if pipeline == "asr" else MEDIMG_OVERRIDES
    return [
        sys.executable, "-m", f"pipelines.{pipeline}", "train", "--config", "tiny",
        "--data", str(data), "--out", str(out), "--no-progress", "--tracking-uri", uri,
        f"optim.epochs={epochs}", *overrides,
    ]  # fmt: skip


class Training:
    """One training subprocess; `stdout`/`stderr` are read from files once it has ended."""

    def __init__(self, command, cwd: Path, env: dict, name: str):
        self.command = command
        self.log_out = cwd / f"{name}.out"
        self.log_err = cwd / f"{name}.err"
        with open(self.log_out, "w") as out, open(self.log_err, "w") as err:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)

    def wait(self, timeout=TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            message = f"training did not end in {timeout} s:\n{self.stderr[-3000:]}"
            raise AssertionError(message) from None

    def stop(self):
        """Kills the process if it still runs (test clean-up)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def stdout(self) -> str:
        return self.log_out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.log_err.read_text(errors="replace")


def run_training(command, cwd: Path, env: dict, name: str, timeout=TIMEOUT) -> Training:
    training = Training(command, cwd, env, name)
    training.wait(timeout)
    return training


def checkpoints(out: Path) -> list[int]:
    """Committed checkpoints in `out/backup` (epochs done), newest first."""
    found = []
    for path in (out / "backup").glob("epoch-*.json"):
        found.append(int(path.name[len("epoch-") : -len(".json")]))
    return sorted(found, reverse=True)


def wait_for_checkpoint(training: Training, out: Path, at_least: int, timeout=TIMEOUT) -> int:
    """Waits until a checkpoint after `at_least` epochs is committed; returns the newest."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = checkpoints(out)
        if done and done[0] >= at_least:
            return done[0]
        if training.process.poll() is not None:
            raise AssertionError(
                f"training ended (code {training.process.returncode}) before epoch {at_least}:"
                f"\n{training.stderr[-3000:]}"
            )
        time.sleep(0.05)
    training.stop()
    raise AssertionError(f"no checkpoint after epoch {at_least} within {timeout} s")


def interrupt(training: Training, out: Path, sig, delay: float, after_epochs: int) -> int:
    """Sends `sig` `delay` seconds after the checkpoint of epoch `after_epochs`; returns the code.

    The signal goes out early if the next epoch's checkpoint appears first, so the process is
    interrupted within its next two epochs however fast they are: a tiny training's epoch can
    take less than the delay, and several of them would let it run to the end.
    """
    newest = wait_for_checkpoint(training, out, after_epochs)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and checkpoints(out)[:1] == [newest]:
        time.sleep(0.02)
    assert training.process.poll() is None, (
        f"training ended before {signal.Signals(sig).name} ({delay:.2f} s after epoch "
        f"{after_epochs}): pick more epochs"
    )
    training.process.send_signal(sig)
    return training.wait()


def trained_epochs(pipeline: str, training: Training) -> list[int]:
    """Epoch numbers (1-based) that a finished process trained, from its own output."""
    epochs = []
    if pipeline == "asr":  # DevEvaluation: "epoch 3: dev CER ..." on stderr
        for line in training.stderr.splitlines():
            if line.startswith("epoch ") and ": dev CER" in line:
                epochs.append(int(line.split()[1].rstrip(":")))
    else:  # Keras' verbose=2 log: "Epoch 3/5" on stdout
        for line in training.stdout.splitlines():
            if line.startswith("Epoch ") and "/" in line:
                epochs.append(int(line.split()[1].split("/")[0]))
    return epochs


def history_epochs(pipeline: str, out: Path) -> list[int]:
    """Epoch indices (0-based) recorded in the run's `metrics.json`."""
    metrics = json.loads((out / "metrics.json").read_text())
    return [entry["epoch"] for entry in metrics["epochs"]]


def mlflow_record(uri: str, out: Path, pipeline: str):
    """`(run, {metric key: [steps]})` of the run named in `out/mlflow_run_id`."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    run_id = (out / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    steps = {
        key: [m.step for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
        if not key.startswith("system/")
    }
    return run, steps


def assert_every_epoch_once(steps: dict, pipeline: str, epochs: int):
    """Every per-epoch metric at steps 0..E-1 exactly once; no metric with a repeated step."""
    for key in EPOCH_METRICS[pipeline]:
        assert sorted(steps.get(key, [])) == list(range(epochs)), (key, steps.get(key))
    for key, logged in steps.items():
        assert len(logged) == len(set(logged)), (key, logged)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
