"""Interrupted trainings: SIGKILL, SIGTERM and Ctrl-C, damaged and half-written checkpoints.

The first half drives `SafeBackupAndRestore` in-process on a small model with Adam (whose
state must be restored too): a resumed run must end with exactly the weights of an
uninterrupted one. The second half kills the real CLI trainings of both pipelines at moments
drawn from a seeded generator (after at least one finished epoch), starts the same command
again and checks the outputs and the MLflow record.
"""

import json
import random
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from pipelines.common.callbacks import SafeBackupAndRestore
from tests.reliability import training_runs as runs
from tests.training_callbacks import EpochRecorder, Interrupt, StopAfter
from toolkit.errors import UserError

EPOCHS = 4


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    return x, y


def _model():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, "tanh", kernel_initializer=keras.initializers.GlorotUniform(1)),
            keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(2)),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def _fit(backup, *extra, epochs=EPOCHS, early_stopping=None):
    """Fits a fresh model; returns `(epochs run, final weights)`."""
    x, y = _data()
    model = _model()
    recorder = EpochRecorder()
    callbacks = [recorder, *([early_stopping] if early_stopping else []), backup, *extra]
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return recorder.epochs, [np.asarray(w) for w in model.get_weights()]


def _interrupted(backup_dir, after_epoch, **kwargs):
    with pytest.raises(Interrupt):
        _fit(SafeBackupAndRestore(backup_dir), StopAfter(after_epoch), **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Epochs and final weights of an uninterrupted run."""
    epochs, weights = _fit(SafeBackupAndRestore(tmp_path_factory.mktemp("ref") / "backup"))
    assert epochs == list(range(EPOCHS))
    return weights


def _assert_same_weights(weights, reference):
    assert len(weights) == len(reference)
    for a, b in zip(weights, reference):
        np.testing.assert_array_equal(a, b)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, reference, capsys):
    backup = tmp_path / "backup"
    _interrupted(backup, after_epoch=1)
    assert sorted(p.name for p in backup.iterdir()) == [
        "epoch-000001.json", "epoch-000001.weights.h5",
        "epoch-000002.json", "epoch-000002.weights.h5",
    ]  # fmt: skip
    record = json.loads((backup / "epoch-000002.json").read_text())
    assert record["epochs_done"] == 2 and len(record["sha256"]) == 64
    assert record["size"] == (backup / "epoch-000002.weights.h5").stat().st_size
    callback = SafeBackupAndRestore(backup)
    epochs, weights = _fit(callback)
    assert epochs == [2, 3] and callback.restored_epoch == 2
    _assert_same_weights(weights, reference)  # weights and Adam's moments were restored
    assert "warning" not in capsys.readouterr().err
    assert backup.is_dir()  # kept until the caller's outputs are written
    callback.delete()
    assert not backup.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbled", "record", "missing"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, reference, capsys, damage
):
    backup = tmp_path / "backup"
    _interrupted(backup, after_epoch=2)  # checkpoints after epochs 2 and 3
    capsys.readouterr()
    weights_file = backup / "epoch-000003.weights.h5"
    data = weights_file.read_bytes()
    if damage == "truncated":
        weights_file.write_bytes(data[: len(data) // 2])
    elif damage == "garbled":  # same size, a block of bytes flipped in the middle
        middle = len(data) // 2
        flipped = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        weights_file.write_bytes(data[:middle] + flipped + data[middle + 64 :])
    elif damage == "record":
        (backup / "epoch-000003.json").write_text('{"epochs_done": 3, "weig')
    else:
        weights_file.unlink()
    epochs, weights = _fit(SafeBackupAndRestore(backup))
    assert epochs == [2, 3]  # epoch 3 (index 2) is trained again from the previous checkpoint
    _assert_same_weights(weights, reference)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("warning: checkpoint") and "epoch-000003" in err[0]
    assert "trying the one after epoch 2" in err[0]
    assert err[1].startswith("warning: resumed from the checkpoint after epoch 2")


def test_half_written_checkpoint_is_ignored_and_cleaned_up(tmp_path, reference, capsys):
    backup = tmp_path / "backup"
    _interrupted(backup, after_epoch=1)
    capsys.readouterr()
    # A kill while writing the weights leaves only a temporary file; a kill between the
    # weights and the record leaves weights without a record. Neither is a checkpoint.
    data = (backup / "epoch-000002.weights.h5").read_bytes()
    (backup / ".partial-99999.weights.h5").write_bytes(data[: len(data) // 3])
    (backup / "epoch-000003.weights.h5").write_bytes(data[: len(data) // 3])
    (backup / ".partial-99999-epoch-000003.json").write_text('{"epochs_do')
    callback = SafeBackupAndRestore(backup)
    epochs, weights = _fit(callback)
    assert epochs == [2, 3] and callback.restored_epoch == 2
    _assert_same_weights(weights, reference)
    assert capsys.readouterr().err == ""  # nothing was damaged: no warning
    assert sorted(p.name for p in backup.iterdir()) == [
        "epoch-000003.json", "epoch-000003.weights.h5",
        "epoch-000004.json", "epoch-000004.weights.h5",
    ]  # fmt: skip


def test_no_usable_checkpoint_is_one_user_error(tmp_path, capsys):
    backup = tmp_path / "backup"
    _interrupted(backup, after_epoch=1)
    for path in backup.glob("*.weights.h5"):
        path.write_bytes(b"\0" * 100)
    with pytest.raises(UserError) as error:
        _fit(SafeBackupAndRestore(backup))
    message = str(error.value)
    assert "\n" not in message and str(backup) in message and "delete the folder" in message
    assert len(capsys.readouterr().err.strip().splitlines()) == 2  # one warning per checkpoint


def test_checkpoint_of_another_model_is_refused(tmp_path):
    backup = tmp_path / "backup"
    _interrupted(backup, after_epoch=0)
    x, y = _data()
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    other.compile(optimizer="adam", loss="mse")
    with pytest.raises(UserError, match="does not fit this model"):
        other.fit(x, y, epochs=2, verbose=0, callbacks=[SafeBackupAndRestore(backup)])


def test_early_stopping_state_survives_the_interruption(tmp_path):
    # mode="max" on a falling loss: only epoch 0 "improves", so patience 3 stops after epoch 4.
    def stopper():
        return keras.callbacks.EarlyStopping(monitor="loss", mode="max", patience=3)

    def backup_for(stop):
        return SafeBackupAndRestore(tmp_path / "backup", callbacks=[stop])

    stop = stopper()
    epochs, _ = _fit(backup_for(stop), epochs=10, early_stopping=stop)
    assert epochs == [0, 1, 2, 3]
    (tmp_path / "backup").rename(tmp_path / "finished")

    stop = stopper()
    with pytest.raises(Interrupt):
        _fit(backup_for(stop), StopAfter(1), epochs=10, early_stopping=stop)
    stop = stopper()
    epochs, _ = _fit(backup_for(stop), epochs=10, early_stopping=stop)
    assert epochs == [2, 3]  # without the saved counter it would run epochs 2..5

    # Killed after early stopping ended the run: starting again trains nothing more.
    stop = stopper()
    epochs, _ = _fit(backup_for(stop), epochs=10, early_stopping=stop)
    assert epochs == []


SIGNAL_OUTCOMES = (
    (signal.SIGTERM, 143, "interrupted (SIGTERM)"),
    (signal.SIGINT, 130, "interrupted (Ctrl-C)"),
)


# A command that enters `interrupts_at_safe_points`, prints `ready` and waits until a signal
# is noted; each test adds what happens next and `sys.exit(cli.run_command(work))`.
NOTED_SIGNAL = (
    "import sys, time\n"
    "from pipelines.common import cli\n"
    "def work():\n"
    "    with cli.interrupts_at_safe_points():\n"
    "        print('ready', flush=True)\n"
    "        while cli.pending_signal() is None:\n"
    "            time.sleep(0.01)\n"
)


def _python(code: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _signalled(code: str, env: dict, sig) -> tuple[int, str, str]:
    """Runs `code`, sends `sig` once it printed `ready`; returns (exit code, stdout, stderr)."""
    process = _python(code, env)
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(sig)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out, err


def test_sigterm_ends_a_command_with_one_line_and_code_143(tmp_path):
    code = (
        "import sys, time\n"
        "from pipelines.common.cli import run_command\n"
        "def work():\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "sys.exit(run_command(work))\n"
    )
    for sig, expected_code, expected_line in SIGNAL_OUTCOMES:
        returncode, _, err = _signalled(code, runs.environment(tmp_path), sig)
        assert returncode == expected_code
        assert err.strip() == expected_line


def test_a_signal_during_training_waits_for_the_next_safe_point(tmp_path):
    # Inside `interrupts_at_safe_points` the first signal is noted and raised only by
    # `raise_pending()`; the work between the two goes on.
    code = (
        NOTED_SIGNAL +
        "        print('noted', cli.pending_signal(), flush=True)\n"
        "        cli.raise_pending()\n"
        "        print('not reached', flush=True)\n"
        "sys.exit(cli.run_command(work))\n"
    )
    for sig, expected_code, expected_line in SIGNAL_OUTCOMES:
        returncode, out, err = _signalled(code, runs.environment(tmp_path), sig)
        assert out.split() == ["noted", str(int(sig))]
        assert returncode == expected_code
        assert err.strip() == expected_line


def test_a_second_signal_interrupts_at_once(tmp_path):
    code = (
        NOTED_SIGNAL +
        "        print('noted', flush=True)\n"
        "        time.sleep(120)\n"
        "sys.exit(cli.run_command(work))\n"
    )
    process = _python(code, runs.environment(tmp_path))
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGINT)
        assert process.stdout.readline().strip() == "noted"
        assert process.poll() is None
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert err.strip() == "interrupted (Ctrl-C)"


def test_fit_stops_after_the_batch_during_which_the_signal_came(tmp_path):
    # A callback sends SIGTERM to its own process at the end of batch 2 of epoch 2 and goes
    # on; `InterruptAtSafePoints` (first in the list, so already past batch 2) raises it at
    # the end of batch 3, before the callback sees that batch, and no epoch-end callback
    # runs for the unfinished epoch.
    code = (
        "import os, signal, sys\n"
        "import keras, numpy as np\n"
        "from pipelines.common import cli\n"
        "from pipelines.common.callbacks import InterruptAtSafePoints\n"
        "class Probe(keras.callbacks.Callback):\n"
        "    def on_train_batch_end(self, batch, logs=None):\n"
        "        print('batch', self.epoch, batch, flush=True)\n"
        "        if (self.epoch, batch) == (1, 2):\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            print('sent', flush=True)\n"
        "    def on_epoch_begin(self, epoch, logs=None):\n"
        "        self.epoch = epoch\n"
        "    def on_epoch_end(self, epoch, logs=None):\n"
        "        print('epoch end', epoch, flush=True)\n"
        "def work():\n"
        "    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])\n"
        "    model.compile('sgd', 'mse')\n"
        "    x, y = np.ones((40, 3), 'float32'), np.ones((40, 1), 'float32')\n"
        "    with cli.interrupts_at_safe_points():\n"
        "        model.fit(x, y, batch_size=4, epochs=3, verbose=0,\n"
        "                  callbacks=[InterruptAtSafePoints(), Probe()])\n"
        "sys.exit(cli.run_command(work))\n"
    )
    process = _python(code, runs.environment(tmp_path))
    try:
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err[-2000:]
    lines = out.strip().splitlines()
    assert lines[-3:] == ["batch 1 1", "batch 1 2", "sent"]
    assert "epoch end 0" in lines and "epoch end 1" not in lines
    assert runs.last_line(err) == "interrupted (SIGTERM)"


# ------------------------------------------------------------------------------------------
# The real CLI trainings, killed and started again.


@pytest.mark.slow
def test_asr_sigkill_then_resume(tmp_path):
    # SIGTERM and Ctrl-C take the same path in both pipelines (pipelines.common.cli): the
    # medimg test covers them, and an ASR process costs twice a medimg one.
    rng = random.Random(7)
    corpus = runs.build_asr_corpus(tmp_path)
    _kill_and_resume("asr", corpus, tmp_path, rng, [signal.SIGKILL], epochs=4)


@pytest.mark.slow
def test_medimg_ctrl_c_then_sigterm_then_sigkill_then_resume(tmp_path):
    rng = random.Random(11)
    datalist = runs.build_medimg_dataset(tmp_path)
    _kill_and_resume(
        "medimg", datalist, tmp_path, rng, [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], 8
    )


def _kill_and_resume(pipeline, data, root, rng, signals, epochs):
    """Runs the same command once per signal, interrupting it, then once to the end."""
    env = runs.environment(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "run"
    command = runs.train_command(pipeline, data, out, uri, epochs)
    done, run_id = 0, None
    for attempt, sig in enumerate(signals):
        delay = rng.uniform(0.0, 2.0)
        training = runs.Training(command, root, env, f"attempt{attempt}")
        try:
            code = runs.interrupt(training, out, sig, delay, after_epochs=done + 1)
        finally:
            training.stop()
        name = signal.Signals(sig).name
        context = f"{name} {delay:.2f} s after epoch {done + 1}: {training.stderr[-3000:]}"
        trained = runs.trained_epochs(pipeline, training)
        assert trained[0] == done + 1, (trained, context)  # resumed after the last checkpoint
        assert "Traceback" not in training.stderr, context
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, context
        else:
            assert code == 128 + sig, context
            expected = "interrupted (SIGTERM)" if sig == signal.SIGTERM else "interrupted (Ctrl-C)"
            assert runs.last_line(training.stderr) == expected, context
            run, _ = runs.mlflow_record(uri, out, pipeline)
            assert run.info.status == "KILLED", context
        this_run = (out / "mlflow_run_id").read_text().strip()
        assert run_id in (None, this_run)  # the same MLflow run across attempts
        run_id = this_run
        done = runs.checkpoints(out)[0]
        assert done >= 1, context

    final = runs.run_training(command, root, env, "final")
    assert final.process.returncode == 0, final.stderr[-3000:]
    assert "Traceback" not in final.stderr
    assert runs.trained_epochs(pipeline, final) == list(range(done + 1, epochs + 1))
    assert sorted(runs.history_epochs(pipeline, out)) == list(range(epochs))
    assert (out / "model.keras").is_file() and not (out / "backup").exists()
    run, steps = runs.mlflow_record(uri, out, pipeline)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    runs.assert_every_epoch_once(steps, pipeline, epochs)
