"""Data-parallel training on one CPU machine (JAX): simulated devices and two local processes.

Both tests start fresh JAX processes: XLA's device count and the multi-process runtime are fixed
when JAX starts. Losses of 4 devices and of 1 device may differ by the order of float32 sums:
tolerance 1e-4 relative.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="JAX data parallelism: runs in the JAX test pass"
)


def _env(**extra):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    for key in list(env):
        if key.startswith("KERAS_DISTRIBUTION_") or key == "MLFLOW_TRACKING_URI":
            del env[key]
    env.update(extra)
    return env


def test_four_devices_give_the_losses_of_one_device():
    result = subprocess.run(
        [sys.executable, "-m", "tests.pipelines.distributed_worker"],
        cwd=ROOT,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    assert losses["devices"] == 4
    for name in ("asr", "medimg"):
        one, four = losses[name]["none"], losses[name]["data-parallel"]
        assert len(one) == len(four) >= 4 and np.all(np.isfinite(one)), (name, one)
        np.testing.assert_allclose(four, one, rtol=1e-4, err_msg=name)
        assert one[-1] != one[0]  # the weights moved: a real comparison of several steps


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together_and_only_process_0_writes(tmp_path):
    from pipelines.medimg.synth import make_dataset

    datalist = make_dataset(tmp_path / "data", scans=12, seed=0, workers=1, progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    port = _free_port()
    processes = []
    for index in (0, 1):
        work = tmp_path / f"cwd{index}"
        work.mkdir()
        env = _env(
            ATTENTION_TOOLKIT_HOME=str(tmp_path / f"home{index}"),
            KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
            KERAS_DISTRIBUTION_NUM_PROCESSES="2",
            KERAS_DISTRIBUTION_PROCESS_ID=str(index),
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
        )
        command = [
            sys.executable, "-m", "pipelines.medimg", "train", "--config", "tiny",
            "--data", str(datalist), "--out", str(run_dir), "--no-progress",
            "--tracking-uri", uri, "distribute=data-parallel", "optim.epochs=2",
            "preprocess.shape=[16,20,16]", "evaluation.heatmap_methods=[native]",
            "evaluation.bootstrap=20",
            "data.max_train_scans=7",  # batches of 4 and 3: the 3 are padded to 2 x 2
            "optim.max_minutes=60",  # a time budget: process 0 decides for both each step
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        )
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=600))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]

    # Same global steps: both processes log the same losses.
    def losses(text):
        return [line.split("loss: ")[1].split()[0] for line in text.splitlines() if " loss: " in line]

    first, second = (losses(out + err) for out, err in outputs)
    assert len(first) == 2 and first == second

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["devices"] == 2
    assert metrics["distribute"] == "data-parallel" and len(metrics["epochs"]) == 2
    assert metrics["train_scans"] == 7
    assert {"model.keras", "config.yaml", "roc.png"} <= {p.name for p in run_dir.iterdir()}
    # Process 1 wrote nothing: not in its working folder, not in its toolkit home.
    assert list((tmp_path / "cwd1").iterdir()) == []
    assert not (tmp_path / "home1").exists() or not any((tmp_path / "home1").rglob("*.db"))

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("medimg")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == (run_dir / "mlflow_run_id").read_text().strip()
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [0, 1]
    assert client.get_metric_history(runs[0].info.run_id, "loader_share")
