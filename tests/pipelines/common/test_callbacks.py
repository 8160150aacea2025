import keras
import numpy as np

from pipelines.common.callbacks import LinearDecay, TimeBudget


def _fit(budget):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((40, 3), "float32")
    history = model.fit(x, x[:, :1], batch_size=4, epochs=5, verbose=0, callbacks=[budget])
    return len(history.history["loss"])


def test_exhausted_budget_stops_after_the_first_batch():
    budget = TimeBudget(0.0)
    assert _fit(budget) == 1
    assert budget.stopped


def test_generous_budget_runs_every_epoch():
    budget = TimeBudget(60.0)
    assert _fit(budget) == 5
    assert not budget.stopped


def test_linear_decay_falls_over_the_epochs_and_applies_to_training():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.ones((8, 3), "float32")
    decay = LinearDecay(0.1, epochs=4, final_fraction=0.2)
    history = model.fit(x, x[:, :1], batch_size=8, epochs=4, verbose=0, callbacks=[decay])
    np.testing.assert_allclose(history.history["learning_rate"], [0.1, 0.08, 0.06, 0.04], rtol=1e-5)
    # A new fit starts again from the initial rate, and the optimizer steps with it (SGD moves
    # the bias by the learning rate times its gradient).
    bias = float(keras.ops.convert_to_numpy(model.layers[0].bias)[0])
    gradient = 2 * (float(keras.ops.convert_to_numpy(model(x[:1]))[0, 0]) - 1)
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0, callbacks=[decay])
    after = float(keras.ops.convert_to_numpy(model.layers[0].bias)[0])
    np.testing.assert_allclose(after - bias, -0.1 * gradient, rtol=1e-4)


def test_linear_decay_follows_the_time_budget_when_it_ends_first():
    decay = LinearDecay(1.0, epochs=100, max_minutes=10.0, final_fraction=0.1)
    assert decay.rate(0, 0.0) == 1.0
    np.testing.assert_allclose(decay.rate(1, 300.0), 0.55)  # half the time: halfway down
    np.testing.assert_allclose(decay.rate(90, 60.0), 0.19)  # epochs ahead of the clock
    np.testing.assert_allclose(decay.rate(2, 900.0), 0.1)  # never below the final rate
    # The clock counts in steps of 0.1% of the budget (0.6 s here): a run far ahead of its
    # clock gets the same rates whatever its speed, so seeded runs repeat exactly.
    assert decay.rate(0, 0.3) == decay.rate(0, 0.0) == 1.0
    np.testing.assert_allclose(decay.rate(0, 0.61), 1.0 - 0.9 * 0.001)


def test_linear_decay_warms_up_per_step_and_decays_within_epochs():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x = np.ones((40, 3), "float32")
    decay = LinearDecay(1.0, epochs=2, final_fraction=0.0, warmup_steps=4, update_every=2)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0, callbacks=[decay, Record()])
    # 10 steps an epoch: warm-up over steps 0-3, decay refreshed every 2 batches by the share
    # of the 2 epochs done.
    expected = [0.25, 0.5, 0.9 * 0.75, 0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6,
                0.5, 0.5, 0.4, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1]  # fmt: skip
    np.testing.assert_allclose(seen, expected, rtol=1e-5)
    # A resumed fit takes the step count from the optimizer: no second warm-up.
    decay.epochs = 1
    seen.clear()
    model.fit(x[:8], x[:8, :1], batch_size=4, epochs=1, verbose=0, callbacks=[decay, Record()])
    np.testing.assert_allclose(seen, [1.0, 1.0], rtol=1e-5)
