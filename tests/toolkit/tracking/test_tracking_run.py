"""`tracking_run` and its Keras callback against a temporary SQLite store.

One store per module (creating an MLflow database takes a few seconds); every test uses its own
experiment (pipeline name) and output folder. The user's default store is never touched:
`ATTENTION_TOOLKIT_HOME` and `MLFLOW_TRACKING_URI` point into tmp paths.
"""

import json
import os
import signal
import time

import keras
import numpy as np
import pytest
import yaml

from toolkit.errors import UserError
from toolkit.tracking import current_learning_rate, device_description, git_state, tracking_run

mlflow = pytest.importorskip("mlflow")

EPOCHS = 3
SAMPLES, BATCH = 48, 16  # 3 optimizer steps per epoch


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-store")
    return f"sqlite:///{root}/mlflow.db", root


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTENTION_TOOLKIT_HOME", str(tmp_path / "default-home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's own default store is relative to the working directory: keep it in tmp_path.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    # No test may create a store in the default location or fall back to MLflow's default.
    assert not (tmp_path / "default-home").exists()
    assert list(cwd.iterdir()) == []


def tiny_model(initial_lr=0.01):
    inputs = keras.Input((4,), name="features")
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = keras.layers.Dense(1, name="score")(hidden)
    model = keras.Model(inputs, outputs)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        initial_lr, decay_steps=2, decay_rate=0.5
    )
    model.compile(keras.optimizers.Adam(schedule), "mse")
    return model


def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES + 16, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True).astype("float32")
    return x[:SAMPLES], y[:SAMPLES], (x[SAMPLES:], y[SAMPLES:])


def image_fn(epoch, model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, epoch])
    ax.set_title(f"epoch {epoch}")
    gray = np.full((8, 8), epoch * 40, dtype="uint8")
    return {"plots/curve": fig, "weights": gray}


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def image_steps(client, run_id):
    """{(key, step): count} of full-resolution images logged with log_image(key=, step=)."""
    counts = {}
    for info in client.list_artifacts(run_id, "images"):
        name = os.path.basename(info.path)
        if name.endswith("+compressed.webp"):
            continue
        key, _, step = name.split("+")[:3]
        counts[(key.replace("~", "/"), int(step))] = (
            counts.get((key.replace("~", "/"), int(step)), 0) + 1
        )
    return counts


class StopAt(keras.callbacks.Callback):
    """Raises `error` at the end of epoch `epoch` (after the MLflow callback has logged it)."""

    def __init__(self, epoch, error):
        super().__init__()
        self.epoch, self.error = epoch, error

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise self.error


def test_full_run_logs_everything(store, tmp_path):
    uri, root = store
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    config = {
        "model": {"name": "tiny", "units": 8, "kernels": [3, 3]},
        "train": {"epochs": EPOCHS, "batch_size": BATCH},
        "many": {f"p{i}": i for i in range(520)},
        "notes": "n" * 7000,
    }
    x, y, val = tiny_data()
    model = tiny_model()
    out = tmp_path / "out"
    with tracking_run(
        "t-full",
        config,
        out,
        tracking_uri=uri,
        data_fingerprint="abc123",
        system_metrics_interval=0.2,
    ) as tracker:
        assert mlflow.get_tracking_uri() == uri
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=EPOCHS,
            validation_data=val,
            verbose=0,
            callbacks=[tracker.callback(image_fn=image_fn)],
        )
        (out / "metrics.json").write_text(json.dumps({"test_mse": 0.5}))
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before

    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert (out / "mlflow_run_id").read_text().strip() == run.info.run_id
    assert run.info.status == "FINISHED" and tracker.status == "FINISHED"
    assert run.info.run_name.startswith("t-full-tiny-")
    assert client.get_experiment(run.info.experiment_id).name == "t-full"
    # Artifacts live in an absolute folder beside the database, never under the cwd.
    assert run.info.artifact_uri == (root / "mlartifacts" / "t-full").as_uri() + (
        f"/{run.info.run_id}/artifacts"
    )

    # Per-epoch metrics at steps 0..E-1, exactly once each.
    for key in ("loss", "val_loss", "learning_rate", "epoch_time_s"):
        assert [step for step, _ in history(client, run.info.run_id, key)] == list(range(EPOCHS))
    losses = [v for _, v in history(client, run.info.run_id, "loss")]
    np.testing.assert_allclose(losses[-1], model.history.history["loss"][-1], rtol=1e-6)
    # ExponentialDecay(0.01, 2, 0.5) read after epoch e, i.e. at iteration 3 (e + 1).
    expected_lr = [0.01 * 0.5 ** (3 * (e + 1) / 2) for e in range(EPOCHS)]
    lrs = [v for _, v in history(client, run.info.run_id, "learning_rate")]
    np.testing.assert_allclose(lrs, expected_lr, rtol=1e-5)
    assert all(v > 0 for _, v in history(client, run.info.run_id, "epoch_time_s"))

    # Params: the whole flattened config, long values cut to MLflow's limit.
    params = run.data.params
    assert params["model.name"] == "tiny" and params["model.kernels"] == "[3, 3]"
    assert params["train.epochs"] == str(EPOCHS) and params["many.p519"] == "519"
    assert len(params) == 3 + 2 + 520 + 1
    assert params["notes"].endswith("...[truncated]") and len(params["notes"]) == 6000

    # Tags.
    tags = run.data.tags
    assert tags["keras_backend"] == keras.config.backend()
    assert tags["devices"] == device_description()
    assert tags["data_fingerprint"] == "abc123"
    assert tags["toolkit_version"] == "0.1.0"
    commit, _ = git_state()
    assert tags.get("git_commit") == commit

    # Images at each step, and artifacts.
    assert image_steps(client, run.info.run_id) == {
        (key, step): 1 for key in ("plots/curve", "weights") for step in range(EPOCHS)
    }
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl"))
    with open(local) as f:
        assert yaml.safe_load(f) == json.loads(json.dumps(config))
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "dl"))
    with open(local) as f:
        assert json.load(f) == {"test_mse": 0.5}

    # System metrics were sampled during the run.
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 1 and len(memory) == len(cpu)
    assert sorted(m.step for m in cpu) == list(range(len(cpu)))
    assert all(0 <= m.value <= 100 for m in cpu) and all(m.value > 0 for m in memory)

    # The model: registered under the pipeline name, with a signature, and it loads back.
    versions = client.search_model_versions("name='t-full'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run.info.run_id)]
    assert str(tracker.model_version) == "1"
    signature = tracker.model_info.signature
    assert signature.inputs.inputs[0].shape == (-1, 4)
    assert signature.outputs.inputs[0].shape == (-1, 1)
    source = client.get_model_version_download_uri("t-full", 1)
    reloaded = mlflow.keras.load_model(source)
    np.testing.assert_allclose(reloaded.predict(x[:5], verbose=0), model.predict(x[:5], verbose=0))


def test_failure_marks_run_failed(store, tmp_path):
    uri, _ = store
    x, y, _ = tiny_data()
    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"):
        with tracking_run("t-fail", {"a": 1}, tmp_path, tracking_uri=uri) as tracker:
            model.fit(
                x,
                y,
                epochs=EPOCHS,
                verbose=0,
                callbacks=[tracker.callback(), StopAt(1, RuntimeError("boom"))],
            )
    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert [s for s, _ in history(client, tracker.run_id, "loss")] == [0, 1]
    # on_train_end is not reached: no model version.
    assert client.search_model_versions("name='t-fail'") == []


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_interruption_marks_run_killed(store, tmp_path, how):
    uri, _ = store

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler raises KeyboardInterrupt before this returns
                raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    x, y, _ = tiny_data()
    with pytest.raises(KeyboardInterrupt):
        with tracking_run(f"t-{how}", {"a": 1}, tmp_path, tracking_uri=uri) as tracker:
            tiny_model().fit(
                x, y, epochs=EPOCHS, verbose=0, callbacks=[tracker.callback(), Interrupt()]
            )
    assert signal.getsignal(signal.SIGTERM) == previous
    assert mlflow.MlflowClient(uri).get_run(tracker.run_id).info.status == "KILLED"


def test_resume_continues_same_run_without_duplicates(store, tmp_path):
    uri, _ = store
    x, y, val = tiny_data()
    out = tmp_path / "out"
    epochs = 4
    config = {"model": {"name": "resume"}, "epochs": epochs}

    def fit(tracker, initial_epoch, extra):
        model = tiny_model()
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=epochs,
            initial_epoch=initial_epoch,
            validation_data=val,
            verbose=0,
            callbacks=[tracker.callback(image_fn=image_fn), *extra],
        )

    # First attempt: killed at the end of epoch 2, after MLflow logged it but before the
    # (simulated) checkpoint callback saved it, so training resumes at epoch 2.
    with pytest.raises(KeyboardInterrupt):
        with tracking_run("t-resume", config, out, tracking_uri=uri) as first:
            fit(first, 0, [StopAt(2, KeyboardInterrupt())])
    client = mlflow.MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert [s for s, _ in history(client, first.run_id, "loss")] == [0, 1, 2]

    with tracking_run("t-resume", config, out, tracking_uri=uri) as second:
        assert second.resumed
        fit(second, 2, [])
    assert second.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == first.run_name
    for key in ("loss", "val_loss", "learning_rate", "epoch_time_s"):
        assert [s for s, _ in history(client, run.info.run_id, key)] == list(range(epochs)), key
    assert image_steps(client, run.info.run_id) == {
        (key, step): 1 for key in ("plots/curve", "weights") for step in range(epochs)
    }
    system_steps = [
        m.step
        for m in client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    ]
    assert sorted(system_steps) == list(range(len(system_steps))) and len(system_steps) >= 2
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tracking_off_logs_nothing(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    x, y, _ = tiny_data()
    model = tiny_model()
    with tracking_run(
        "t-off", {"a": 1}, tmp_path / "out", tracking_uri=f"sqlite:///{db}", enabled="off"
    ) as tracker:
        assert tracker.run_id is None
        model.fit(x, y, epochs=2, verbose=0, callbacks=[tracker.callback(image_fn=image_fn)])
    assert not db.exists() and not (tmp_path / "store").exists()
    assert not (tmp_path / "out" / "mlflow_run_id").exists()
    assert tracker.status is None


def test_unreachable_server_fails_before_training(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    entered = False
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        with tracking_run("t-down", {"a": 1}, tmp_path, tracking_uri=uri):
            entered = True
    assert time.monotonic() - start < 10
    assert not entered
    assert uri in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "mlflow_run_id").exists()


def test_current_learning_rate_reads_plain_and_scheduled_rates():
    assert current_learning_rate(keras.optimizers.SGD(0.25)) == pytest.approx(0.25)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0], [1.0, 0.5])
    optimizer = keras.optimizers.SGD(schedule)
    assert current_learning_rate(optimizer) == pytest.approx(1.0)  # iterations == 0
    optimizer.iterations.assign(3)
    assert current_learning_rate(optimizer) == pytest.approx(0.5)
    assert current_learning_rate(None) is None


def test_config_file_is_logged_and_a_missing_one_is_a_user_error(store, tmp_path):
    uri, _ = store
    config_file = tmp_path / "resolved.yaml"
    config_file.write_text("model:\n  name: x\n")
    with tracking_run(
        "t-config",
        {"model": {"name": "x"}},
        tmp_path / "out",
        tracking_uri=uri,
        config_path=config_file,
        system_metrics=False,
    ) as tracker:
        pass
    client = mlflow.MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["resolved.yaml"]
    assert client.get_run(tracker.run_id).data.params == {"model.name": "x"}
    with pytest.raises(UserError, match="config file .*missing.yaml does not exist"):
        with tracking_run(
            "t-config",
            {},
            tmp_path / "out2",
            tracking_uri=uri,
            config_path=tmp_path / "missing.yaml",
        ):
            pass
    experiment = client.get_experiment_by_name("t-config")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_model_signature_for_functional_and_subclassed_models():
    from toolkit.tracking import model_signature

    signature = model_signature(tiny_model())
    assert [(s.name, s.shape) for s in signature.inputs.inputs] == [("features", (-1, 4))]
    assert signature.outputs.inputs[0].shape == (-1, 1)

    class TwoInputs(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, inputs):
            return self.dense(keras.ops.concatenate([inputs["a"], inputs["b"]], axis=-1))

    model = TwoInputs()
    example = {"a": np.zeros((2, 4), "float32"), "b": np.ones((2, 1), "float32")}
    assert model_signature(model) is None
    signature = model_signature(model, example)
    specs = {s.name: s.shape for s in signature.inputs.inputs}
    assert specs == {"a": (-1, 4), "b": (-1, 1)}
    assert signature.outputs.inputs[0].shape == (-1, 3)
