"""The Keras callback that logs a training run to MLflow, epoch by epoch."""

import math
import time

import keras
import numpy as np


def current_learning_rate(optimizer):
    """Returns the optimizer's current learning rate as a float, schedules included.

    Keras 3 optimizers evaluate a `LearningRateSchedule` at `optimizer.iterations` when
    `optimizer.learning_rate` is read, so at the end of an epoch this is the rate of the next
    step (for a per-epoch `LearningRateScheduler`, the rate used during the epoch).

    Args:
        optimizer: `keras.optimizers.Optimizer` or None.

    Returns:
        float, or `None` when there is no optimizer or no scalar learning rate.
    """
    if optimizer is None:
        return None
    try:
        value = optimizer.learning_rate
        if callable(value) and not hasattr(value, "shape"):
            value = value()
        array = np.asarray(keras.ops.convert_to_numpy(value), dtype="float64")
    except Exception:
        return None
    return float(array) if array.size == 1 else None


def _scalar(value):
    try:
        array = np.asarray(keras.ops.convert_to_numpy(value), dtype="float64")
    except Exception:
        return None
    if array.size != 1:
        return None
    return float(array.reshape(()))


class MlflowCallback(keras.callbacks.Callback):
    """Logs per-epoch metrics, images and the final model of a `fit` call to an MLflow run.

    Made by `Tracker.callback()`; it logs synchronously through the tracker, so every epoch's
    record is in the store when `on_epoch_end` returns. At the end of each epoch it logs, at
    step = epoch index (so `fit(..., initial_epoch=k)` continues at step k):

    - every scalar in Keras' `logs` (`loss`, `val_loss`, compiled metrics, ...);
    - `learning_rate`, read from the optimizer (schedules included) unless `logs` has it;
    - `epoch_time_s`, the wall time of the epoch including validation;
    - the images returned by `image_fn(epoch, model)`, a dict `{key: image}` where an image is
      a matplotlib Figure, a NumPy array (H, W[, C]) or a PIL image, logged with
      `mlflow.log_image(image, key=key, step=epoch)`.

    At the end of training (`on_train_end`, which Keras skips when training raises) it logs the
    model with the MLflow Keras flavor, with a signature, registered under the pipeline's name.

    Place it *before* checkpoint callbacks in the list: an epoch is then recorded before its
    checkpoint is written, and a run killed in between re-runs that epoch on resume, whose
    metrics the tracker recognises as already logged and skips (no duplicate steps, no gaps).

    Args:
        tracker: `toolkit.tracking.Tracker`. The run to log to; a disabled tracker makes this
            callback do nothing.
        image_fn: callable `(epoch, model) -> dict` or None. Images to log each epoch.
            Defaults to `None`.
        log_model: bool. Log and register the model in `on_train_end`. Defaults to `True`.
        input_example: array or None. A batch of inputs, used for the model signature when the
            model has no symbolic inputs (subclassed models). Defaults to `None`.

    Example:

    ```python
    with tracking_run(pipeline="asr", config=cfg, out_dir=out) as tracker:
        model.fit(x, y, epochs=10, callbacks=[tracker.callback(), checkpoint])
    ```
    """

    def __init__(self, tracker, image_fn=None, log_model=True, input_example=None):
        super().__init__()
        self.tracker = tracker
        self.image_fn = image_fn
        self.log_model = log_model
        self.input_example = input_example
        self._epoch_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if not self.tracker.enabled:
            return
        metrics = {}
        for key, value in (logs or {}).items():
            scalar = _scalar(value)
            if scalar is not None:
                metrics[key] = scalar
        if "learning_rate" not in metrics:
            lr = current_learning_rate(getattr(self.model, "optimizer", None))
            if lr is not None and math.isfinite(lr):
                metrics["learning_rate"] = lr
        if self._epoch_start is not None:
            metrics["epoch_time_s"] = time.perf_counter() - self._epoch_start
        images = None
        if self.image_fn is not None and not self.tracker.is_epoch_logged(epoch):
            images = self.image_fn(epoch, self.model)
        self.tracker.log_epoch(epoch, metrics, images=images)

    def on_train_end(self, logs=None):
        if self.tracker.enabled and self.log_model:
            self.tracker.log_model(self.model, input_example=self.input_example)
