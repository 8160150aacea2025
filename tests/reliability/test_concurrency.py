"""Trainings that write to the same local tracking store (one SQLite file) at the same time.

Two processes are started, import everything, wait at a barrier file and then open their runs
at the same moment on a store that does not exist yet (both create the MLflow tables), log
every epoch, sample system metrics every 0.1 s and register a model version under the same
name. Both must end FINISHED with every epoch's metrics, and two distinct model versions.
"""

import sys
import time

import pytest

from tests.reliability import training_runs as runs

mlflow = pytest.importorskip("mlflow")

WORKERS = 2
EPOCHS = 8
METRICS = ("loss", "mae", "learning_rate", "epoch_time_s")

WORKER = """
import pathlib, sys, time
import keras, numpy as np
from toolkit.tracking import tracking_run

uri, out, go, seed = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4])
keras.utils.set_random_seed(seed)
x = np.random.default_rng(seed).normal(size=(32, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse", metrics=["mae"])
(out / "ready").write_text("")
while not go.exists():
    time.sleep(0.01)
with tracking_run("shared", {"seed": seed}, out, tracking_uri=uri, run_name=f"worker-{seed}",
                  system_metrics_interval=0.1) as tracker:
    model.fit(x, y, batch_size=8, epochs=int(sys.argv[5]), verbose=0,
              callbacks=[tracker.callback()])
print(tracker.run_id, tracker.model_version)
"""


def test_two_trainings_share_one_new_sqlite_store(tmp_path):
    env = runs.environment(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    go = tmp_path / "go"
    trainings = []
    try:
        for seed in range(WORKERS):
            out = tmp_path / f"out{seed}"
            out.mkdir()
            command = [sys.executable, "-c", WORKER, uri, str(out), str(go), str(seed), str(EPOCHS)]
            trainings.append((out, runs.Training(command, tmp_path, env, f"worker{seed}")))
        deadline = time.monotonic() + 120
        while not all((out / "ready").exists() for out, _ in trainings):
            assert time.monotonic() < deadline, "workers did not start"
            assert all(t.process.poll() is None for _, t in trainings), trainings[0][1].stderr
            time.sleep(0.05)
        go.write_text("")
        codes = [training.wait(timeout=180) for _, training in trainings]
    finally:
        for _, training in trainings:
            training.stop()
    for code, (_, training) in zip(codes, trainings):
        assert code == 0, training.stderr[-3000:]
        assert "Traceback" not in training.stderr
        assert "Could not log" not in training.stderr  # e.g. "database is locked" while sampling

    client = mlflow.MlflowClient(uri)
    run_ids, versions = set(), set()
    for _, training in trainings:
        run_id, version = training.stdout.split()
        run_ids.add(run_id)
        versions.add(version)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in METRICS:
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(EPOCHS)), (key, steps)
        assert client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(run_ids) == WORKERS
    assert versions == {str(v) for v in range(1, WORKERS + 1)}  # one model version each
    experiment = client.get_experiment_by_name("shared")
    assert len(client.search_runs([experiment.experiment_id])) == WORKERS
