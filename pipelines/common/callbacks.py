"""Keras callbacks shared by the pipelines' training loops."""

from __future__ import annotations

import time

import keras


class TimeBudget(keras.callbacks.Callback):
    """Stops training once `max_minutes` of wall time have passed since `fit` began.

    Checked after every batch; `stopped` tells afterwards whether the budget ended training.
    """

    def __init__(self, max_minutes: float):
        super().__init__()
        self.max_seconds = float(max_minutes) * 60.0
        self.start = None
        self.stopped = False

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if time.perf_counter() - self.start > self.max_seconds:
            self.model.stop_training = True
            self.stopped = True
