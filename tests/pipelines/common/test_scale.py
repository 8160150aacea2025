"""Scaling settings: precision, data-parallel batches, multi-process checks, data-loader timing."""

import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from pipelines.common.scale import (
    LoaderTiming,
    Scale,
    TimedBatches,
    initialize_multihost,
    resolve_precision,
    setup_scale,
)
from toolkit.errors import UserError

ROOT = Path(__file__).resolve().parents[3]


def test_precision_auto_is_float32_on_cpu_and_unknown_values_are_user_errors():
    assert resolve_precision("auto") == "float32"  # the test machine computes on CPU
    assert resolve_precision("mixed_float16") == "mixed_float16"
    with pytest.raises(UserError, match="precision must be one of auto, float32"):
        resolve_precision("float16")
    with pytest.raises(UserError, match="precision=.fp8."):
        setup_scale("fp8")
    with pytest.raises(UserError, match="distribute must be one of none, data-parallel"):
        setup_scale("float32", "pipeline")


def test_scope_sets_the_policy_for_building_then_restores_it():
    scale = setup_scale("mixed_float16", "none")
    with scale.scope():
        assert keras.config.dtype_policy().name == "mixed_float16"
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss="mse")
    assert keras.config.dtype_policy().name == "float32"
    assert model.layers[0].compute_dtype == "float16"
    assert model.layers[0].kernel.dtype == "float32"
    # Keras wraps the optimizer itself (compile's auto_scale_loss) for mixed_float16 only.
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    with setup_scale("mixed_bfloat16").scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss="mse")
    assert model.layers[0].compute_dtype == "bfloat16"
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


class Rows(keras.utils.PyDataset):
    """Batches whose values are the row numbers, so slicing and padding can be read off."""

    def __init__(self, sizes, weights=True, delay=0.0, as_dict=True, **kwargs):
        super().__init__(**kwargs)
        self.sizes = sizes
        self.weights = weights
        self.as_dict = as_dict
        self.delay = delay
        self.epochs_ended = 0

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, index):
        time.sleep(self.delay)
        n = self.sizes[index]
        x = {"a": np.arange(n, dtype="float32")[:, None] + 100 * index, "b": np.ones((n, 2))}
        y = np.arange(n, dtype="float32")[:, None]
        if not self.as_dict:
            x = x["a"]
        if self.weights == "dict":  # one weight per output, as for several losses
            y = {"out": y, "aux": -y}
            return x, y, {"out": np.full((n,), 0.5, "float32"), "aux": np.ones((n,), "float32")}
        if self.weights:
            return x, y, np.full((n,), 0.5, "float32")
        return x, y

    def on_epoch_end(self):
        self.epochs_ended += 1


def test_batches_are_padded_to_the_devices_and_sliced_per_process():
    timing = LoaderTiming()
    rows = Rows([8, 6])
    parts = [TimedBatches(rows, timing, num_replicas=4, num_processes=2, process_index=p)
             for p in (0, 1)]  # fmt: skip
    assert len(parts[0]) == 2
    x0, y0, w0 = parts[0][0]
    x1, y1, w1 = parts[1][0]
    np.testing.assert_array_equal(x0["a"][:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(x1["a"][:, 0], [4, 5, 6, 7])
    np.testing.assert_array_equal(np.concatenate([w0, w1]), np.full(8, 0.5))
    # 6 rows on 4 devices: padded to 8 with the first rows again, weighted 0.
    x0, y0, w0 = parts[0][1]
    x1, y1, w1 = parts[1][1]
    np.testing.assert_array_equal(np.concatenate([x0["a"], x1["a"]])[:, 0] - 100,
                                  [0, 1, 2, 3, 4, 5, 0, 1])  # fmt: skip
    np.testing.assert_array_equal(np.concatenate([y0, y1])[:, 0], [0, 1, 2, 3, 4, 5, 0, 1])
    np.testing.assert_array_equal(np.concatenate([w0, w1]), [0.5] * 6 + [0, 0])
    assert x0["b"].shape == (4, 2)
    # Without sample weights the padding rows are plain repeats; one device changes nothing.
    x, y = TimedBatches(Rows([3], weights=False), timing, num_replicas=4)[0]
    np.testing.assert_array_equal(y[:, 0], [0, 1, 2, 0])
    x, y, w = TimedBatches(Rows([3]), timing)[0]
    assert len(y) == 3 and timing.seconds > 0
    parts[0].on_epoch_end()
    assert rows.epochs_ended == 1
    # Several outputs: every weight of a padding row is 0.
    x, y, w = TimedBatches(Rows([3], weights="dict"), timing, num_replicas=4)[0]
    np.testing.assert_array_equal(y["aux"][:, 0], [0, -1, -2, 0])
    np.testing.assert_array_equal(w["out"], [0.5, 0.5, 0.5, 0])
    np.testing.assert_array_equal(w["aux"], [1, 1, 1, 0])


def test_loader_share_is_logged_each_epoch_and_summarised():
    scale = setup_scale("float32", "none")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    slow = Rows([4, 4, 4], weights=False, delay=0.05, as_dict=False)
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(dict(logs)))
    model.fit(
        scale.batches(slow), epochs=2, verbose=0, callbacks=[scale.callback(), record]
    )  # fmt: skip
    assert len(seen) == 2 and all(0 < logs["loader_share"] <= 1 for logs in seen)
    summary = scale.summary()
    # 6 batches slept 50 ms each, all inside the epochs.
    assert summary["loader_seconds"] >= 0.3
    assert 0 < summary["loader_share"] <= 1
    assert summary["precision"] == "float32" and summary["devices"] == 1
    assert slow.epochs_ended >= 2  # forwarded (Keras may call it once more at the end)


def test_other_processes_write_to_a_private_folder_without_tracking(tmp_path):
    chief, other = Scale(process_index=0, num_processes=2), Scale(process_index=1, num_processes=2)
    assert chief.output_dir(tmp_path / "run") == tmp_path / "run" and chief.tracking("on") == "on"
    private = other.output_dir(tmp_path / "run")
    assert private.is_dir() and tmp_path not in private.parents
    assert other.tracking("on") == "off" and not other.is_chief


@pytest.mark.parametrize(
    "env, message",
    [
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"}, "must be an integer"),
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}, "KERAS_DISTRIBUTION_PROCESS_ID set to 0..1"),
        (
            {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "2"},
            "KERAS_DISTRIBUTION_PROCESS_ID set to 0..1",
        ),
    ],
)
def test_bad_multiprocess_environment_is_a_user_error(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message):
        initialize_multihost("data-parallel")


def test_multiprocess_needs_jax_data_parallel_and_a_coordinator(monkeypatch):
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "1")
    monkeypatch.delenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", raising=False)
    if keras.backend.backend() != "jax":
        with pytest.raises(UserError, match="needs KERAS_BACKEND=jax"):
            initialize_multihost("data-parallel")
        return
    with pytest.raises(UserError, match="train with distribute=data-parallel"):
        initialize_multihost("none")
    with pytest.raises(UserError, match="KERAS_DISTRIBUTION_JOB_ADDRESSES=HOST:PORT"):
        initialize_multihost("data-parallel")


def test_one_process_needs_no_variables(monkeypatch):
    monkeypatch.delenv("KERAS_DISTRIBUTION_NUM_PROCESSES", raising=False)
    assert initialize_multihost("none") == (0, 1)
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "1")
    assert initialize_multihost("none") == (0, 1)


def test_batch_size_must_divide_by_the_devices():
    """Four simulated JAX devices: batch 6 is refused with a hint, batch 8 is accepted."""
    code = (
        "from pipelines.common.scale import setup_scale\n"
        "from toolkit.errors import UserError\n"
        "try:\n"
        "    setup_scale('float32', 'data-parallel', 6, 'data.batch_size')\n"
        "except UserError as e:\n"
        "    print('error:', e)\n"
        "s = setup_scale('float32', 'data-parallel', 8)\n"
        "print('devices', s.num_replicas, s.summary()['distribute'])\n"
    )
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=str(ROOT),
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == (
        "error: data.batch_size=6 must be a multiple of the 4 devices that "
        "distribute=data-parallel uses (e.g. data.batch_size=4)"
    )
    assert lines[1] == "devices 4 data-parallel"


def test_data_parallel_trains_on_this_backend():
    """TensorFlow: a `MirroredStrategy` (one CPU replica here); JAX: `DataParallel`."""
    try:
        scale = setup_scale("float32", "data-parallel", 4)
        with scale.scope():
            model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
        history = model.fit(scale.batches(Rows([4, 4], weights=False, as_dict=False)), verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert scale.num_replicas == len(keras.distribution.list_devices()) == 1
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            assert isinstance(scale.strategy, tf.distribute.MirroredStrategy)
            assert model.distribute_strategy is scale.strategy
        else:
            assert isinstance(keras.distribution.distribution(), keras.distribution.DataParallel)
    finally:
        if keras.backend.backend() == "jax":
            keras.distribution.set_distribution(None)
