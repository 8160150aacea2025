"""Scaling a training: numeric precision, data parallelism on one or many hosts, input timing.

`setup_scale(precision, distribute, batch_size)` turns the pipelines' `precision` and
`distribute` configuration keys into a `Scale`, which a training uses in five places:

```python
scale = setup_scale(config.precision, config.distribute, config.data.batch_size)
out = scale.output_dir(out)                 # a throw-away folder on processes other than 0
with scale.scope():                         # dtype policy (+ MirroredStrategy on TensorFlow)
    model = build_model(...)
    model.compile(...)                      # mixed_float16: Keras adds loss scaling itself
model.fit(scale.batches(batches), callbacks=[scale.callback(), ...])
metrics.update(scale.summary())             # precision, devices, data-loader share
```

Precision (`precision`):

- `float32`: everything in float32.
- `mixed_bfloat16` / `mixed_float16`: Keras' mixed dtype policies (computations in 16 bits,
  variables in float32). Under `mixed_float16`, `Model.compile` wraps the optimizer in
  `keras.optimizers.LossScaleOptimizer` (dynamic loss scaling; `auto_scale_loss=True` is Keras'
  default), so small gradients do not underflow. Softmax, losses (CTC, cross-entropy) and the
  output layers stay in float32 in the models.
- `auto` (the default): `float32` on CPU, `mixed_bfloat16` on a GPU or TPU.

Distribution (`distribute`):

- `none`: the default device.
- `data-parallel`: every device holds a copy of the weights and takes an equal slice of each
  batch; gradients are averaged, so the result is that of one device with the same (global)
  batch. JAX: `keras.distribution.DataParallel` over all devices of all processes; TensorFlow:
  `tf.distribute.MirroredStrategy` (the local GPUs, else the CPU). `data.batch_size` is the
  global batch and must be a multiple of the number of devices; a shorter last batch is padded
  (rows repeated, with sample weight 0 where the batch has sample weights).

Several hosts (JAX only): start one process per host with the same command and Keras'
environment variables

    KERAS_DISTRIBUTION_JOB_ADDRESSES=host0:1234   # the coordinator (process 0) and a free port
    KERAS_DISTRIBUTION_NUM_PROCESSES=2
    KERAS_DISTRIBUTION_PROCESS_ID=0               # 0, 1, ... on each host

`setup_scale` then calls `keras.distribution.initialize()` (`jax.distributed.initialize`).
Every process reads the data, takes its part of every batch and runs the same steps; only
process 0 writes the output folder and the MLflow run (`Scale.output_dir`, `Scale.tracking`).

Data-loader share: `Scale.batches` times how long the training loop spends getting each batch
(loading, augmenting, padding, slicing); `Scale.callback()` adds `loader_share` (that time over
the epoch's training time) to each epoch's logs, so MLflow records it, and `Scale.summary()`
gives the totals for `metrics.json`. With `workers=1` (the default) batches are made in the
training loop's thread, so this is exactly the time the devices wait for input; with more
workers it is the workers' busy time, an upper bound.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal, get_args

import keras
import numpy as np

from pipelines.common.callbacks import ForwardingCallback
from toolkit.errors import UserError

__all__ = [
    "DISTRIBUTE_MODES",
    "PRECISIONS",
    "Distribute",
    "Precision",
    "LoaderTiming",
    "ProcessLocalCallback",
    "Scale",
    "TimedBatches",
    "accelerator",
    "agree_with_process_0",
    "initialize_multihost",
    "resolve_precision",
    "setup_scale",
    "without_distribution",
]

# Types of the pipelines' `precision` and `distribute` configuration keys.
Precision = Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
Distribute = Literal["none", "data-parallel"]
PRECISIONS = get_args(Precision)
DISTRIBUTE_MODES = get_args(Distribute)
ENV_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
ENV_NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ENV_PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"


def accelerator() -> str:
    """`"gpu"`, `"tpu"` or `"cpu"`: the kind of device the current backend computes on."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        platform = jax.default_backend()
        return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("TPU"):
            return "tpu"
        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy name for a `precision` setting (`auto` decided by the device).

    Raises:
        UserError: `precision` is not one of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise UserError(
            f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={precision!r}"
        )
    if precision == "auto":
        return "float32" if accelerator() == "cpu" else "mixed_bfloat16"
    return precision


def precision_caveat(policy: str) -> str | None:
    """A known problem of `policy` on this backend and device, as one sentence, or `None`.

    TensorFlow's oneDNN bfloat16 kernels on CPU (the default on x86 since TF 2.9) were seen to
    return NaN in a 3D convolution's weight gradient at random: the same step on the same
    weights gave NaN about once in ten tries, and never with `TF_ENABLE_ONEDNN_OPTS=0`.
    """
    if (
        policy == "mixed_bfloat16"
        and keras.backend.backend() == "tensorflow"
        and os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"
        and accelerator() == "cpu"
    ):
        return (
            "precision=mixed_bfloat16 on a CPU under TensorFlow: oneDNN's bfloat16 kernels can "
            "give NaN weight gradients at random; use float32 (the CPU default), JAX, or "
            "TF_ENABLE_ONEDNN_OPTS=0"
        )
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(
            f"environment variable {name} must be an integer. Received: {value!r}"
        ) from None


def initialize_multihost(distribute: str = "data-parallel") -> tuple[int, int]:
    """Join a multi-process run described by `KERAS_DISTRIBUTION_*`; return `(index, count)`.

    Without `KERAS_DISTRIBUTION_NUM_PROCESSES` (or with `1`) this does nothing and returns
    `(0, 1)`. Otherwise it calls `keras.distribution.initialize()` (once per process), which
    waits for all processes to connect to the coordinator.

    Raises:
        UserError: a multi-process run with another backend than JAX, without
            `distribute=data-parallel`, or with missing or invalid variables.
    """
    count = _env_int(ENV_NUM_PROCESSES)
    if count is None or count == 1:
        return 0, 1
    index = _env_int(ENV_PROCESS_ID)
    if count < 1 or index is None or not 0 <= index < count:
        raise UserError(
            f"{ENV_NUM_PROCESSES}={count} needs {ENV_PROCESS_ID} set to 0..{count - 1} "
            f"on each process. Received: {ENV_PROCESS_ID}={os.environ.get(ENV_PROCESS_ID)!r}"
        )
    if keras.backend.backend() != "jax":
        raise UserError(
            f"training on several processes ({ENV_NUM_PROCESSES}={count}) needs "
            f"KERAS_BACKEND=jax. Received: KERAS_BACKEND={keras.backend.backend()}"
        )
    if distribute != "data-parallel":
        raise UserError(
            f"{ENV_NUM_PROCESSES}={count} is set: train with distribute=data-parallel. "
            f"Received: distribute={distribute}"
        )
    if not os.environ.get(ENV_ADDRESSES):
        raise UserError(f"{ENV_NUM_PROCESSES}={count} needs {ENV_ADDRESSES}=HOST:PORT of process 0")
    import jax

    if not jax.distributed.is_initialized():
        keras.distribution.initialize()
    return jax.process_index(), jax.process_count()


@dataclasses.dataclass
class Scale:
    """How one training uses its devices (see the module docstring; made by `setup_scale`).

    Attributes:
        precision: str. The Keras dtype policy of the model (`"float32"`, `"mixed_bfloat16"`,
            `"mixed_float16"`).
        distribute: str. `"none"` or `"data-parallel"`.
        num_replicas: int. Devices sharing each batch (all processes).
        num_processes: int. Processes of the run.
        process_index: int. This process (0 writes outputs).
        strategy: the `tf.distribute.Strategy` (TensorFlow data-parallel), else `None`.
    """

    precision: str = "float32"
    distribute: str = "none"
    num_replicas: int = 1
    num_processes: int = 1
    process_index: int = 0
    strategy: object = None
    timing: LoaderTiming | None = None

    def __post_init__(self):
        if self.timing is None:
            self.timing = LoaderTiming()

    @property
    def is_chief(self) -> bool:
        """True on the process that writes the output folder and the MLflow run."""
        return self.process_index == 0

    @contextlib.contextmanager
    def scope(self):
        """Build and compile the model in here: dtype policy and distribution strategy.

        The global dtype policy is put back on exit; the layers keep theirs.
        """
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.precision)
        try:
            if self.strategy is not None:
                with self.strategy.scope():
                    yield self
            else:
                yield self
        finally:
            keras.config.set_dtype_policy(previous)

    def batches(self, dataset: keras.utils.PyDataset) -> TimedBatches:
        """`dataset` timed and, for JAX data-parallel, padded and sliced for this process."""
        shard = self.distribute == "data-parallel" and self.strategy is None
        return TimedBatches(
            dataset,
            self.timing,
            num_replicas=self.num_replicas if shard else 1,
            num_processes=self.num_processes if shard else 1,
            process_index=self.process_index if shard else 0,
        )

    def callback(self) -> LoaderTiming:
        """The callback adding `loader_share` to each epoch's logs (put it first)."""
        return self.timing

    def chief_callback(self, callback):
        """`callback` made safe for work that only process 0 does (MLflow logging).

        With several processes, every variable Keras creates under the global distribution is
        checked across processes (a collective), and `model.save` creates one (a reference
        optimizer): process 0 saving alone would wait for the others forever. The returned
        callback runs `callback`'s hooks with the distribution unset; with one process it is
        `callback` itself.
        """
        return callback if self.num_processes == 1 else ProcessLocalCallback(callback)

    def output_dir(self, out) -> Path:
        """`out` on process 0; a private temporary folder (removed at exit) elsewhere."""
        if self.is_chief:
            return Path(out)
        path = Path(tempfile.mkdtemp(prefix=f"process{self.process_index}-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return path

    def tracking(self, setting):
        """The tracking setting: unchanged on process 0, `"off"` on the others."""
        return setting if self.is_chief else "off"

    def summary(self) -> dict:
        """Keys for `metrics.json`: precision, devices and the data-loader share."""
        return {
            "precision": self.precision,
            "distribute": self.distribute,
            "devices": self.num_replicas,
            "processes": self.num_processes,
            "loader_seconds": self.timing.total_loader_seconds,
            "loader_share": self.timing.total_share,
        }


def setup_scale(
    precision: str = "auto",
    distribute: str = "none",
    batch_size: int | None = None,
    batch_key: str = "data.batch_size",
) -> Scale:
    """Resolve the precision, join a multi-process run and set up data parallelism.

    Call it at the start of a training, before any computation (JAX's multi-process
    initialisation must come first). With `distribute="data-parallel"` on JAX this sets
    Keras' global distribution (`keras.distribution.set_distribution`) for the process.

    Args:
        precision: str. One of `PRECISIONS`. Defaults to `"auto"`.
        distribute: str. One of `DISTRIBUTE_MODES`. Defaults to `"none"`.
        batch_size: int or None. The global batch size, checked to be a multiple of the number
            of devices. Defaults to `None` (not checked).
        batch_key: str. The configuration key of `batch_size`, for the error message.

    Returns:
        A `Scale`.

    Raises:
        UserError: an unknown precision or distribute value, a batch size that the devices do
            not divide, or a bad multi-process environment.
    """
    if distribute not in DISTRIBUTE_MODES:
        raise UserError(
            f"distribute must be one of {', '.join(DISTRIBUTE_MODES)}. "
            f"Received: distribute={distribute!r}"
        )
    if precision not in PRECISIONS:
        resolve_precision(precision)  # raises before any multi-process waiting
    process_index, num_processes = initialize_multihost(distribute)
    policy = resolve_precision(precision)
    caveat = precision_caveat(policy)
    if caveat:
        print(f"warning: {caveat}", file=sys.stderr, flush=True)
    scale = Scale(precision=policy, distribute=distribute)
    scale.process_index, scale.num_processes = process_index, num_processes
    if distribute == "none":
        return scale
    backend = keras.backend.backend()
    if backend == "jax":
        devices = keras.distribution.list_devices()
        scale.num_replicas = len(devices)
        _check_batch(batch_size, scale.num_replicas, batch_key)
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        )
    elif backend == "tensorflow":
        import tensorflow as tf

        scale.strategy = tf.distribute.MirroredStrategy()
        scale.num_replicas = scale.strategy.num_replicas_in_sync
        _check_batch(batch_size, scale.num_replicas, batch_key)
    else:
        raise UserError(
            f"distribute=data-parallel supports the jax and tensorflow backends. "
            f"Received: KERAS_BACKEND={backend}"
        )
    return scale


def _check_batch(batch_size, replicas, key):
    if batch_size is not None and batch_size % replicas:
        raise UserError(
            f"{key}={batch_size} must be a multiple of the {replicas} devices that "
            f"distribute=data-parallel uses (e.g. {key}={replicas * max(1, batch_size // replicas)})"
        )


def agree_with_process_0(flag: bool) -> bool:
    """`flag` as process 0 sees it (every process must call this at the same point).

    Decisions that end training (a time budget) must be the same on every process of a
    multi-process run, or the others wait forever for the one that stopped. One process:
    `flag` itself.
    """
    return bool(value_from_process_0(float(bool(flag))))


def value_from_process_0(value: float) -> float:
    """`value` as process 0 has it, as a float32 (every process must call this at the same point).

    Values that feed training (a learning rate computed from a process's own clock) must be
    identical on every process of a multi-process JAX run. One process: `value` itself.
    """
    if keras.backend.backend() != "jax":
        return float(value)
    import jax

    if jax.process_count() == 1:
        return float(value)
    from jax.experimental import multihost_utils

    with without_distribution():
        return float(multihost_utils.broadcast_one_to_all(np.float32(value)))


@contextlib.contextmanager
def without_distribution():
    """Unset Keras' global distribution inside the block (variables stay on this process)."""
    previous = keras.distribution.distribution()
    if previous is None:
        yield
        return
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


class ProcessLocalCallback(ForwardingCallback):
    """Runs another callback's hooks without Keras' global distribution (`without_distribution`)."""

    def __init__(self, callback):
        super().__init__(callback)

    def _context(self):
        return without_distribution()


class LoaderTiming(keras.callbacks.Callback):
    """Time spent making batches, per epoch (`loader_share` in the logs) and in total.

    `TimedBatches` adds to `seconds`; this callback reads it at the start and end of each
    epoch. Put it first among the callbacks so that later ones (MLflow) see `loader_share`
    and the epoch time excludes their work.
    """

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self.seconds = 0.0  # all batches so far
        self.total_loader_seconds = 0.0  # during epochs (fit's training loops)
        self.total_train_seconds = 0.0
        self._epoch = None

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds

    @property
    def total_share(self) -> float | None:
        if self.total_train_seconds <= 0:
            return None
        return min(1.0, self.total_loader_seconds / self.total_train_seconds)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = (time.perf_counter(), self.seconds)

    def on_epoch_end(self, epoch, logs=None):
        if self._epoch is None:
            return
        start, loaded = self._epoch
        wall = time.perf_counter() - start
        loader = self.seconds - loaded
        self.total_train_seconds += wall
        self.total_loader_seconds += loader
        if logs is not None and wall > 0:
            logs["loader_share"] = min(1.0, loader / wall)
        self._epoch = None


class TimedBatches(keras.utils.PyDataset):
    """A `PyDataset` around another: times each batch; pads and slices it for data parallelism.

    With `num_replicas > 1` a batch of `n` rows is padded to a multiple of `num_replicas` by
    repeating its first rows (their sample weights, the third element of an `(x, y, w)` batch,
    set to 0), and this process keeps rows `[p * m / P, (p + 1) * m / P)` of the padded `m`:
    Keras' JAX `DataParallel` then assembles the global batch from the processes' parts.

    Args:
        dataset: `keras.utils.PyDataset`. Its `on_epoch_begin`/`on_epoch_end` are forwarded,
            and its `workers`/`use_multiprocessing`/`max_queue_size` reused.
        timing: `LoaderTiming` collecting the seconds.
        num_replicas: int. Devices over all processes. Defaults to `1`.
        num_processes: int. Defaults to `1`.
        process_index: int. Defaults to `0`.
    """

    def __init__(self, dataset, timing, num_replicas=1, num_processes=1, process_index=0):
        super().__init__(
            workers=dataset.workers,
            use_multiprocessing=dataset.use_multiprocessing,
            max_queue_size=dataset.max_queue_size,
        )
        if num_replicas % num_processes:
            raise ValueError(
                f"num_replicas must be a multiple of num_processes. Received: "
                f"num_replicas={num_replicas}, num_processes={num_processes}"
            )
        self.dataset = dataset
        self.timing = timing
        self.num_replicas = num_replicas
        self.num_processes = num_processes
        self.process_index = process_index

    def __len__(self):
        return len(self.dataset)

    @property
    def num_batches(self):
        return self.dataset.num_batches

    def __getitem__(self, index):
        start = time.perf_counter()
        batch = self.dataset[index]
        if self.num_replicas > 1:
            batch = self._shard(batch)
        self.timing.add(time.perf_counter() - start)
        return batch

    def _shard(self, batch):
        rows = len(keras.tree.flatten(batch)[0])
        pad = -rows % self.num_replicas
        index = np.arange(rows + pad) % rows  # (n + pad,): padding repeats the first rows
        per_process = (rows + pad) // self.num_processes
        mine = slice(self.process_index * per_process, (self.process_index + 1) * per_process)
        take = lambda array: np.asarray(array)[index][mine]  # noqa: E731
        if pad and isinstance(batch, tuple) and len(batch) == 3 and batch[2] is not None:

            def padded_weights(array):  # the padding rows weigh nothing
                weights = np.asarray(array).copy()[index]
                weights[rows:] = 0
                return weights[mine]

            weights = keras.tree.map_structure(padded_weights, batch[2])
            return keras.tree.map_structure(take, batch[:2]) + (weights,)
        return keras.tree.map_structure(take, batch)

    def on_epoch_begin(self):
        if hasattr(self.dataset, "on_epoch_begin"):
            self.dataset.on_epoch_begin()

    def on_epoch_end(self):
        self.dataset.on_epoch_end()
