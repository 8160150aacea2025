"""Keras callbacks shared by the pipelines' training loops."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import keras

from pipelines.common.cli import raise_pending
from toolkit.errors import UserError


class ForwardingCallback(keras.callbacks.Callback):
    """Passes every hook to another callback, which sees `model` instead of the fitted model.

    A pipeline that fits a training model with extra outputs (auxiliary losses) but saves,
    validates and logs the classifier that shares its layers wraps the callbacks that use
    `self.model` for that in `ForwardingCallback(callback, classifier)`. Subclasses can run the
    hooks in a context (`_context`).

    Args:
        callback: `keras.callbacks.Callback`.
        model: `keras.Model` or None. The model `callback` sees; None: the fitted model.
    """

    def __init__(self, callback, model=None):
        super().__init__()
        self.callback = callback
        self.view = model

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(self.view if self.view is not None else model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def _context(self):
        return contextlib.nullcontext()


def _forward(name):
    def hook(self, *args, **kwargs):
        with self._context():
            return getattr(self.callback, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


for _name in [n for n in dir(keras.callbacks.Callback) if n.startswith("on_")]:
    setattr(ForwardingCallback, _name, _forward(_name))


class InterruptAtSafePoints(keras.callbacks.Callback):
    """Raises a Ctrl-C or SIGTERM noted by `pipelines.common.cli` between steps, not inside one.

    Checked after every training batch and before every epoch, so the interruption unwinds
    `fit` from Python code, with no step running, and after the previous epoch's callbacks
    (its checkpoint included) have finished. Use it with `fit` inside
    `cli.interrupts_at_safe_points()`.
    """

    def on_epoch_begin(self, epoch, logs=None):
        raise_pending()

    def on_train_batch_end(self, batch, logs=None):
        raise_pending()


class TimeBudget(keras.callbacks.Callback):
    """Stops training once `max_minutes` of wall time have passed since `fit` began.

    Checked after every batch; `stopped` tells afterwards whether the budget ended training.
    In a multi-process (multi-host) run, process 0's clock decides for all processes, so they
    stop after the same step.
    """

    def __init__(self, max_minutes: float):
        super().__init__()
        self.max_seconds = float(max_minutes) * 60.0
        self.start = None
        self.stopped = False

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        from pipelines.common.scale import agree_with_process_0

        if agree_with_process_0(time.perf_counter() - self.start > self.max_seconds):
            self.model.stop_training = True
            self.stopped = True


class LinearDecay(keras.callbacks.Callback):
    """Learning rate falling linearly over the run to `final_fraction` of its start value.

    The decay spans the run: `epochs` epochs, or `max_minutes` of wall time from the start of
    `fit` when that comes first (as for `TimeBudget`). The learning rate is
    `initial * (1 - (1 - final_fraction) * progress)`, where `progress` in [0, 1] is the larger
    of the share of epochs done and the share of the time used, optionally times a linear
    warm-up `min(1, (step + 1) / warmup_steps)` over the first optimizer steps. Training under a
    fixed budget gains from ending on a small learning rate (Li et al., 2020, "Budgeted
    Training", https://arxiv.org/abs/1905.04753). Adds `learning_rate` to the epoch logs. In a
    multi-process (multi-host) run, process 0's clock decides, so every process steps with the
    same rate.

    Args:
        initial: float. The rate at the start (after warm-up).
        epochs: int. Epochs of the run.
        max_minutes: float or None. The run's time budget.
        final_fraction: float. The rate at the end, as a fraction of `initial`.
        warmup_steps: int. Optimizer steps of linear warm-up (`0`: none).
        update_every: int or None. Also update the decay every this many batches within an
            epoch (`None`: once per epoch, at its start). The warm-up is applied every step.
    """

    def __init__(self, initial, epochs, max_minutes=None, final_fraction=0.02, warmup_steps=0,
                 update_every=None):  # fmt: skip
        super().__init__()
        self.initial = float(initial)
        self.epochs = int(epochs)
        self.max_seconds = None if max_minutes is None else float(max_minutes) * 60.0
        self.final_fraction = float(final_fraction)
        self.warmup_steps = int(warmup_steps)
        self.update_every = update_every
        self.start = None
        self.epoch = 0
        self.step = None
        self.decayed = self.initial

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self.step = None  # read from the optimizer at the first batch (after any restore)

    def rate(self, epoch, elapsed_seconds=0.0) -> float:
        """The decayed rate after `epoch` epochs (a fraction counts) and `elapsed_seconds`.

        The warm-up factor is applied on top of it, step by step (`_apply`)."""
        progress = epoch / max(self.epochs, 1)
        if self.max_seconds:
            # In steps of 0.1% of the budget: a run that the epochs end (its clock far behind)
            # then gets the same rates every time, so a seeded run stays repeatable.
            progress = max(progress, math.floor(elapsed_seconds / self.max_seconds * 1000) / 1000)
        return self.initial * (1.0 - (1.0 - self.final_fraction) * min(progress, 1.0))

    def _decay(self, epoch):
        from pipelines.common.scale import value_from_process_0

        # Every process of a multi-process run must step with the same rate: process 0's clock.
        elapsed = value_from_process_0(time.perf_counter() - self.start)
        self.decayed = self.rate(epoch, elapsed)

    def _apply(self):
        rate = self.decayed
        if self.warmup_steps and self.step is not None:
            rate *= min(1.0, (self.step + 1) / self.warmup_steps)
        self.model.optimizer.learning_rate = rate

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._decay(epoch)
        self._apply()

    def on_train_batch_begin(self, batch, logs=None):
        if self.step is None:
            self.step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        steps = (self.params or {}).get("steps")
        refresh = self.update_every and batch and batch % self.update_every == 0 and steps
        if refresh:
            self._decay(self.epoch + batch / steps)
        if refresh or batch == 0 or (self.warmup_steps and self.step < self.warmup_steps):
            self._apply()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


class SafeBackupAndRestore(keras.callbacks.Callback):
    """`keras.callbacks.BackupAndRestore` that survives a kill at any moment and a bad checkpoint.

    Keras' own callback overwrites `latest.weights.h5` in place and writes the epoch number in
    a second file afterwards, so a kill while saving leaves a truncated weights file (the next
    start fails) or new weights with the old epoch number. This one keeps, in `backup_dir`,
    the `keep` newest checkpoints, each a pair written atomically (temporary file, `fsync`,
    rename) in this order:

    - `epoch-<n>.weights.h5`: model and optimizer variables after `n` finished epochs;
    - `epoch-<n>.json`: `n`, the weights file's size and SHA-256, and the state of the
      `EarlyStopping` callbacks given in `callbacks`. Written last, it commits the checkpoint:
      a weights file without it (a kill in between) is ignored.

    At the start of `fit` it restores the newest checkpoint whose record parses, whose weights
    file has the recorded size and checksum and loads into the model, and training continues
    at epoch `n`. Each checkpoint it has to pass over prints one `warning:` line on stderr;
    with no checkpoint at all training starts at epoch 0. If checkpoints exist but none can be
    restored (every copy damaged, or the model changed), it raises `UserError` rather than
    silently training from scratch. If the restored checkpoint records that a callback
    stopped training (early stopping, time budget), `fit` runs no further epoch.

    The backup is kept when `fit` ends, so a kill during the work after `fit` (evaluation,
    model logging) resumes without training again; call `delete()` once the run's outputs
    are written.

    Args:
        backup_dir: str or path-like. A folder used by this run only.
        keep: int. Checkpoints kept (the newest first). Defaults to `2`.
        callbacks: sequence of callbacks. `EarlyStopping` instances whose counters are saved
            and restored with each checkpoint, so a resumed run stops at the same epoch as an
            uninterrupted one. Put this callback after them in `fit`'s list. Defaults to `()`.

    Example:

    ```python
    stop = keras.callbacks.EarlyStopping(patience=3)
    backup = SafeBackupAndRestore("runs/x/backup", callbacks=[stop])
    model.fit(x, y, epochs=10, callbacks=[stop, backup])
    backup.delete()
    ```
    """

    _EARLY_STOPPING_STATE = ("wait", "best", "best_epoch", "stopped_epoch")

    def __init__(self, backup_dir, keep=2, callbacks=()):
        super().__init__()
        if not backup_dir:
            raise ValueError(f"backup_dir must be a folder. Received: backup_dir={backup_dir!r}")
        if int(keep) < 1:
            raise ValueError(f"keep must be at least 1. Received: keep={keep}")
        self.backup_dir = Path(backup_dir)
        self.keep = int(keep)
        self.callbacks = list(callbacks)
        self.restored_epoch = None  # epochs already done when `fit` began (None: fresh start)

    # -- files ---------------------------------------------------------------------------------

    def _record_path(self, epochs_done):
        return self.backup_dir / f"epoch-{epochs_done:06d}.json"

    def _weights_path(self, epochs_done):
        return self.backup_dir / f"epoch-{epochs_done:06d}.weights.h5"

    def checkpoints(self):
        """Epoch counts of the committed checkpoints (those with a record), newest first."""
        found = []
        for path in self.backup_dir.glob("epoch-*.json"):
            match = _CHECKPOINT_RECORD.fullmatch(path.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found, reverse=True)

    def delete(self):
        """Removes the backup folder (after the run's outputs are written)."""
        shutil.rmtree(self.backup_dir, ignore_errors=True)

    # -- saving --------------------------------------------------------------------------------

    def on_epoch_end(self, epoch, logs=None):
        self._save(epoch + 1)

    def _save(self, epochs_done):
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        # Keras only writes names ending in `.weights.h5`.
        partial = self.backup_dir / f".partial-{os.getpid()}.weights.h5"
        self.model.save_weights(partial, overwrite=True)
        size, digest = _fsync_and_hash(partial)
        os.replace(partial, self._weights_path(epochs_done))
        record = {
            "epochs_done": epochs_done,
            "weights": self._weights_path(epochs_done).name,
            "size": size,
            "sha256": digest,
            "stop_training": bool(getattr(self.model, "stop_training", False)),
            "callbacks": [self._callback_state(c) for c in self.callbacks],
        }
        _atomic_write_text(self._record_path(epochs_done), json.dumps(record, indent=1))
        _fsync_dir(self.backup_dir)
        self._prune(epochs_done)

    def _prune(self, newest):
        kept = [n for n in self.checkpoints() if n <= newest][: self.keep]
        for path in self.backup_dir.iterdir():
            match = _CHECKPOINT_FILE.fullmatch(path.name)
            stale = match is not None and int(match.group(1)) not in kept
            if stale or path.name.startswith(".partial-"):
                path.unlink(missing_ok=True)

    def _callback_state(self, callback):
        if not isinstance(callback, keras.callbacks.EarlyStopping):
            return {}
        state = {}
        for name in self._EARLY_STOPPING_STATE:
            value = getattr(callback, name, None)
            state[name] = None if value is None else float(keras.ops.convert_to_numpy(value))
        return state

    # -- restoring -----------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self.restored_epoch = None
        candidates = self.checkpoints() if self.backup_dir.is_dir() else []
        problems = []
        for epochs_done in candidates:
            try:
                record = self._restore(epochs_done)
            except _BadCheckpoint as problem:
                problems.append(str(problem))
                older = [n for n in candidates if n < epochs_done]
                then = f"trying the one after epoch {older[0]}" if older else "none left"
                print(f"warning: {problem}; {then}", file=sys.stderr, flush=True)
                continue
            self.restored_epoch = epochs_done
            initial = epochs_done
            if record.get("stop_training"):
                initial = max(epochs_done, int((self.params or {}).get("epochs", epochs_done)))
            self.model._initial_epoch = initial
            if problems:
                print(
                    f"warning: resumed from the checkpoint after epoch {epochs_done} in "
                    f"{self.backup_dir} (newer ones were damaged)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if problems:
            raise UserError(
                f"no usable checkpoint in {self.backup_dir} ({problems[0]}); delete the folder "
                "to train from the start"
            )

    def _restore(self, epochs_done):
        path = self._record_path(epochs_done)
        try:
            record = json.loads(path.read_text())
            weights = self._weights_path(epochs_done)
            size, digest = int(record["size"]), str(record["sha256"])
            states = list(record.get("callbacks", []))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _BadCheckpoint(f"checkpoint record {path} is unreadable ({error})") from None
        if not weights.is_file():
            raise _BadCheckpoint(f"checkpoint {weights} is missing")
        actual_size, actual_digest = _fsync_and_hash(weights, sync=False)
        if actual_size != size:
            raise _BadCheckpoint(
                f"checkpoint {weights} is truncated or damaged ({actual_size} bytes, "
                f"{size} expected)"
            )
        if actual_digest != digest:
            raise _BadCheckpoint(f"checkpoint {weights} is damaged (SHA-256 mismatch)")
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        try:
            self.model.load_weights(weights)
        except Exception as error:
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise _BadCheckpoint(
                f"checkpoint {weights} does not fit this model ({reason})"
            ) from None
        for callback, state in zip(self.callbacks, states):
            if not state or not isinstance(callback, keras.callbacks.EarlyStopping):
                continue  # the list changed since the checkpoint: leave it alone
            for name, value in state.items():
                if value is not None and name != "best":
                    value = int(value)  # counters and epoch indices
                setattr(callback, name, value)
        return record


class _BadCheckpoint(Exception):
    pass


_CHECKPOINT_RECORD = re.compile(r"epoch-(\d{6})\.json")
_CHECKPOINT_FILE = re.compile(r"epoch-(\d{6})\.(?:json|weights\.h5)")


def _fsync_and_hash(path, sync=True):
    """`(size, sha256 hex)` of a file, flushed to disk first when `sync`."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _atomic_write_text(path, text):
    partial = path.with_name(f".partial-{os.getpid()}-{path.name}")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _fsync_dir(folder):
    # Makes the renames durable (a power cut, not just a killed process); not possible on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
