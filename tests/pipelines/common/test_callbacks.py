import keras
import numpy as np

from pipelines.common.callbacks import TimeBudget


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
