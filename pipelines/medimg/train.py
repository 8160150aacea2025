"""Training the lesion classifier: configuration, data, augmentation, callbacks, outputs.

`train(config, data=None, out=None)` runs one training:

1. reads the datalist (`--data`, else the built-in synthetic benchmark, built on first use in the
   toolkit's data folder), with train/val/test splits; rows whose files are missing or are not
   readable NIfTI are skipped, counted and reported;
2. brings every scan onto the model grid once (`preprocess.py`), in threads, with a progress
   bar, and caches the result on disk (`data.cache`), so a second run starts at once;
3. builds the model named by `model.name` (`model.py`), with the preprocessing parameters and
   the decision threshold inside, and compiles it (AdamW, binary cross-entropy;
   `jit_compile="auto"` is off on TensorFlow, whose own CPU kernels beat XLA for 3D
   convolutions, and on for JAX);
4. fits on batches augmented on the fly (random flips, small rotations, intensity scale and
   shift) with class-balancing sample weights. Where the datalist has lesion masks (the
   built-in data does), they supervise the attention maps too (`compile_for_training`): each
   gate's coefficients are fitted to the mask on the gate's grid and each attention pooling's
   weights to the mask spread over its cells, so the model learns where lesions are from
   every voxel rather than one label per scan. Each epoch `ValidationMonitor` computes the
   validation AUC, loss and the pointing game of the native heatmaps (on the model grid) and
   keeps the best model (highest validation AUC) as `model.keras`; then the MLflow callback
   (config, per-epoch metrics at steps 0..E-1, an example heatmap figure per epoch, the final
   model), `EarlyStopping` on `val_auc`, an optional time budget (`optim.max_minutes`) and
   `BackupAndRestore`, so a killed run started again with the same `--out` continues from its
   last finished epoch;
5. evaluates the best model on the test split (`evaluate.evaluate_records`: AUC with its
   bootstrap interval, threshold metrics, heatmap quality in scanner space for every method)
   and writes `config.yaml`, `model.keras`, `metrics.json`, `roc.png` and `confusion.png` in
   the output folder (default `runs/medimg/<timestamp>/`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np
import scipy.ndimage

from pipelines.common.callbacks import (
    ForwardingCallback,
    InterruptAtSafePoints,
    LinearDecay,
    SafeBackupAndRestore,
    TimeBudget,
)
from pipelines.common.cli import interrupts_at_safe_points
from pipelines.common.config import config_to_dict, load_config, save_config
from pipelines.common.paths import toolkit_home
from pipelines.common.progress import progress_bar
from pipelines.common.scale import Distribute, Precision, setup_scale
from pipelines.medimg.model import ModelConfig, build_model, model_metadata
from pipelines.medimg.preprocess import PreprocessConfig
from toolkit.errors import UserError

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "EvaluationConfig",
    "OptimConfig",
    "TrainConfig",
    "ValidationMonitor",
    "VolumeBatches",
    "augment_volume",
    "compile_for_training",
    "mask_loss",
    "mask_on_grid",
    "pooling_mask_loss",
    "default_out_dir",
    "prepare_volumes",
    "resolve_config",
    "resolve_datalist",
    "train",
]

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_RUNS_DIR = Path("runs") / "medimg"
MODEL_FILENAME = "model.keras"
CONFIG_FILENAME = "config.yaml"
METRICS_FILENAME = "metrics.json"
STATE_FILENAME = "validation_state.json"
CACHE_VERSION = 1
MASK_WEIGHTINGS = ("per-scan", "per-cell")
LR_SCHEDULES = ("linear", "constant")


@dataclasses.dataclass
class DataConfig:
    """Where the scans come from and how they are batched (the `data:` section)."""

    path: str | None = None  # datalist CSV/JSON; None = the built-in synthetic benchmark
    builtin_scans: int = 600  # size of the built-in dataset when it has to be built
    builtin_seed: int = 0
    batch_size: int = 4
    cache: str = "default"  # a folder, "default" (toolkit home) or "off"
    workers: int = 2  # threads that preprocess scans
    loader_workers: int = 1  # Keras PyDataset workers (threads) for augmentation
    max_train_scans: int | None = None  # use only the first N training scans

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive. Received: {self.batch_size}")
        if self.builtin_scans < 2:
            raise ValueError(f"builtin_scans must be at least 2. Received: {self.builtin_scans}")
        if self.workers < 1 or self.loader_workers < 1:
            raise ValueError("workers and loader_workers must be at least 1")


@dataclasses.dataclass
class AugmentConfig:
    """On-the-fly 3D augmentation of training volumes (the `augment:` section)."""

    enabled: bool = True
    flip_axes: list[int] = dataclasses.field(default_factory=lambda: [0])  # 0 = left-right
    flip_probability: float = 0.5
    rotation_degrees: float = 8.0  # about one random axis
    rotation_probability: float = 0.3
    intensity_scale: float = 0.1  # x -> x * (1 + U(-s, s))
    intensity_shift: float = 0.1  # ... + U(-t, t)

    def __post_init__(self):
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f"flip_axes must be among 0, 1, 2. Received: {self.flip_axes}")
        for key in ("flip_probability", "rotation_probability"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1]. Received: {getattr(self, key)}")


@dataclasses.dataclass
class OptimConfig:
    """Optimisation (the `optim:` section)."""

    epochs: int = 60
    learning_rate: float = 1e-3
    # "linear": falls linearly to `final_lr_fraction` x learning_rate over the run (the epochs,
    # or max_minutes when that ends training first); "constant": stays at learning_rate.
    lr_schedule: str = "linear"
    final_lr_fraction: float = 0.02
    weight_decay: float = 1e-4
    patience: int = 12  # epochs without a better validation AUC before stopping
    max_minutes: float | None = None  # stop training after this much time
    class_weights: bool = True  # balance the classes with sample weights
    # Lesion masks, where the datalist has them, supervise the attention gates: each gate's
    # coefficients are fitted to the mask on the gate's grid (weighted binary cross-entropy),
    # added to the loss times this weight. 0 turns it off; a train split without any mask of a
    # lesion scan turns all of it off.
    mask_loss_weight: float = 10.0
    # How lesion cells are weighted in that cross-entropy: "per-scan" (a scan's lesion cells
    # share the weight `mask_lesion_weight` x the number of cells on the grid, so a small lesion
    # counts as much as a large one) or "per-cell" (each lesion cell weighs
    # `mask_positive_weight`, so large lesions dominate).
    mask_weighting: str = "per-scan"
    mask_lesion_weight: float = 0.03
    mask_positive_weight: float = 30.0
    # ... and the attention pooling: the cross-entropy of each pooling's weights with the lesion
    # mask spread evenly over its cells (lesion scans only), times this weight. 0 = off.
    mask_pooling_weight: float = 1.0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be positive. Received: {self.epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive. Received: {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}. Received: {self.lr_schedule}"
            )
        if not 0.0 < self.final_lr_fraction <= 1.0:
            raise ValueError(
                f"final_lr_fraction must be in (0, 1]. Received: {self.final_lr_fraction}"
            )
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive. Received: {self.max_minutes}")
        weights = (self.mask_loss_weight, self.mask_pooling_weight)
        if min(weights) < 0 or min(self.mask_positive_weight, self.mask_lesion_weight) <= 0:
            raise ValueError(
                "mask_loss_weight and mask_pooling_weight must be >= 0, mask_positive_weight and "
                f"mask_lesion_weight > 0. Received: {weights}, {self.mask_positive_weight}, "
                f"{self.mask_lesion_weight}"
            )
        if self.mask_weighting not in MASK_WEIGHTINGS:
            raise ValueError(
                f"mask_weighting must be one of {MASK_WEIGHTINGS}. Received: {self.mask_weighting}"
            )


@dataclasses.dataclass
class EvaluationConfig:
    """Evaluation settings, stored with the model (the `evaluation:` section)."""

    threshold: float = 0.5  # probability >= threshold is "lesion"
    top_k_percent: float = 1.0  # IoU of the top-k% heatmap voxels with the lesion
    bootstrap: int = 1000  # resamples of the AUC interval
    heatmap_methods: list[str] = dataclasses.field(default_factory=lambda: ["native", "gradcam"])
    val_pointing_game: bool = True  # pointing game of the validation scans every epoch

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1). Received: {self.threshold}")
        if not 0.0 < self.top_k_percent <= 100.0:
            raise ValueError(f"top_k_percent must be in (0, 100]. Received: {self.top_k_percent}")
        if any(m not in ("native", "gradcam") for m in self.heatmap_methods):
            raise ValueError(
                f"heatmap_methods must be among native, gradcam. Received: {self.heatmap_methods}"
            )


@dataclasses.dataclass
class TrainConfig:
    """The whole configuration (`configs/default.yaml`, then a model's YAML, then overrides)."""

    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    seed: int = 0
    jit_compile: str = "auto"  # "auto" (off on TensorFlow, on for JAX), "true" or "false"
    tracking: str = "on"  # "on" or "off"
    tracking_uri: str | None = None
    # "auto" (float32 on CPU, mixed_bfloat16 on GPU/TPU), "float32", "mixed_bfloat16" or
    # "mixed_float16" (with loss scaling); see pipelines/common/scale.py.
    precision: Precision = "auto"
    distribute: Distribute = "none"  # or "data-parallel": every device (and host) shares a batch


def default_config_path() -> Path:
    return CONFIG_DIR / "default.yaml"


def resolve_config(config_path=None, overrides=()) -> TrainConfig:
    """`configs/default.yaml` <- `config_path` <- `key=value` overrides.

    `config_path` may also name a shipped config (`tiny`, `vit`).
    """
    if config_path is not None and not Path(config_path).exists():
        named = CONFIG_DIR / f"{config_path}.yaml"
        if named.exists():
            config_path = named
    return load_config(
        TrainConfig, path=config_path, overrides=overrides, default_path=default_config_path()
    )


def default_out_dir() -> Path:
    return DEFAULT_RUNS_DIR / time.strftime("%Y%m%d-%H%M%S")


# --------------------------------------------------------------------------------------------
# Data.


def resolve_datalist(config: TrainConfig, data=None, progress: bool = True) -> Path:
    """The datalist to train on: `data`, `config.data.path`, else the built-in dataset."""
    from pipelines.medimg.synth import default_dataset_dir, make_dataset

    path = data if data is not None else config.data.path
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"datalist {path} does not exist")
        return path
    folder = default_dataset_dir(config.data.builtin_scans, config.data.builtin_seed)
    return make_dataset(
        folder, scans=config.data.builtin_scans, seed=config.data.builtin_seed, progress=progress
    )


@dataclasses.dataclass
class Volumes:
    """Preprocessed scans of one split on the model grid.

    Attributes:
        images: float16 array (N, X, Y, Z).
        labels: int array (N,).
        masks: uint8 array (N, X, Y, Z) (zeros where a scan has no mask).
        has_mask: bool array (N,).
        records: the datalist records, in the same order.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    records: list


def _cache_dir(setting: str) -> Path | None:
    if setting == "off":
        return None
    if setting == "default":
        return toolkit_home() / "medimg" / "cache"
    return Path(setting)


def _cache_key(record, preprocess: PreprocessConfig) -> str:
    parts = [f"v{CACHE_VERSION}", json.dumps(config_to_dict(preprocess), sort_keys=True)]
    for path in (record.image, record.mask):
        if path is None:
            parts.append("-")
            continue
        stat = Path(path).stat()
        parts.append(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _preprocess_record(record, preprocess: PreprocessConfig, cache: Path | None):
    from pipelines.medimg.evaluate import read_mask
    from pipelines.medimg.preprocess import load_and_preprocess, resample

    key = _cache_key(record, preprocess)
    if cache is not None:
        cached = cache / f"{key}.npz"
        if cached.is_file():
            try:
                with np.load(cached) as archive:
                    return archive["image"], archive["mask"], bool(archive["has_mask"])
            except (OSError, ValueError, KeyError):
                pass  # a partial or stale file: compute again
    item = load_and_preprocess(record.image, preprocess)
    image = item.image.astype(np.float16)
    mask = np.zeros(item.geometry.model_shape, np.uint8)
    has_mask = record.mask is not None
    if has_mask:
        data, affine = read_mask(record.mask, max_voxels=preprocess.max_voxels)
        if data is not None:
            mask = resample(
                data.astype(np.uint8),
                affine,
                item.geometry.model_affine,
                item.geometry.model_shape,
                order=0,
            )
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{key}.{os.getpid()}.npz"
        np.savez(partial, image=image, mask=mask, has_mask=np.asarray(has_mask))
        os.replace(partial, cache / f"{key}.npz")
    return image, mask, has_mask


def prepare_volumes(
    records, preprocess: PreprocessConfig, cache=None, workers=2, progress=True, desc="scans"
):
    """Preprocess `records` onto the model grid; returns `(Volumes or None, skipped)`.

    Scans (or masks) that cannot be read are skipped: `skipped` lists one line per file.
    """
    from toolkit.errors import UserError as _UserError

    results: dict[int, tuple] = {}
    skipped: list[str] = []
    with progress_bar(len(records), f"preprocess {desc}", unit="scan", enabled=progress) as bar:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {
                pool.submit(_preprocess_record, record, preprocess, cache): i
                for i, record in enumerate(records)
            }
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except _UserError as error:
                    skipped.append(f"{records[i].source or records[i].image}: skipped: {error}")
                bar.update(1)
    kept = sorted(results)
    if not kept:
        return None, skipped
    return (
        Volumes(
            images=np.stack([results[i][0] for i in kept]),
            labels=np.asarray([records[i].label for i in kept], np.int64),
            masks=np.stack([results[i][1] for i in kept]),
            has_mask=np.asarray([results[i][2] for i in kept], bool),
            records=[records[i] for i in kept],
        ),
        skipped,
    )


# --------------------------------------------------------------------------------------------
# Augmentation and batches.


def augment_volume(volume: np.ndarray, rng: np.random.Generator, config: AugmentConfig, mask=None):
    """One random augmentation of a (X, Y, Z) float32 volume (see `AugmentConfig`).

    With a `mask` of the same shape, returns `(volume, mask)`: the mask gets the same flips and
    rotation (nearest neighbour), not the intensity change.
    """
    for axis in config.flip_axes:
        if rng.random() < config.flip_probability:
            volume = np.flip(volume, axis)
            mask = None if mask is None else np.flip(mask, axis)
    if config.rotation_degrees > 0 and rng.random() < config.rotation_probability:
        angle = rng.uniform(-config.rotation_degrees, config.rotation_degrees)
        axes = [(0, 1), (0, 2), (1, 2)][int(rng.integers(3))]
        volume = scipy.ndimage.rotate(
            volume, angle, axes=axes, reshape=False, order=1, mode="nearest"
        )
        if mask is not None:
            mask = scipy.ndimage.rotate(mask, angle, axes=axes, reshape=False, order=0)
    scale = 1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale)
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift)
    volume = np.ascontiguousarray(volume * np.float32(scale) + np.float32(shift), np.float32)
    return volume if mask is None else (volume, np.ascontiguousarray(mask))


def mask_on_grid(mask: np.ndarray, shape) -> np.ndarray:
    """A (X, Y, Z) lesion mask brought to a coarser grid `shape`: a cell is 1 when any voxel is.

    The factor per axis is `ceil(X / x)`, as for stride-2 "same" convolutions; the volume is
    padded with zeros at the far end to a whole number of cells.
    """
    return masks_on_grids(mask, [shape])[0]


def masks_on_grids(mask: np.ndarray, shapes) -> list[np.ndarray]:
    """`mask_on_grid(mask, shape)` for each of `shapes`, finding the lesion voxels once."""
    voxels = np.nonzero(mask)  # lesions are sparse: mark their cells, reduce no blocks
    grids = []
    for shape in shapes:
        grid = np.zeros(tuple(shape), np.uint8)
        factors = [-(-n // m) for n, m in zip(mask.shape, shape)]
        grid[tuple(c // f for c, f in zip(voxels, factors))] = 1
        grids.append(grid)
    return grids


def mask_loss(positive_weight: float = 30.0, lesion_weight: float | None = None):
    """Per-scan weighted binary cross-entropy between gate coefficients and a lesion mask.

    `y_true` and `y_pred` are (B, x, y, z, 1) in [0, 1]. Lesion cells are a small share of a
    scan, so they weigh more than background cells (weight 1):

    - `lesion_weight=None`: each lesion cell weighs `positive_weight`;
    - otherwise a scan's `n` lesion cells each weigh `lesion_weight * N / n` on a grid of `N`
      cells (at least 1), so the loss is the mean background cross-entropy plus
      `lesion_weight` times the mean cross-entropy over the lesion cells, whatever the
      lesion's size.

    Returns (B,), so sample weights apply per scan.
    """

    def loss(y_true, y_pred):
        y_true = keras.ops.cast(y_true, "float32")
        p = keras.ops.clip(keras.ops.cast(y_pred, "float32"), 1e-6, 1.0 - 1e-6)
        axes = tuple(range(1, len(y_true.shape)))
        if lesion_weight is None:
            weight = 1.0 + (positive_weight - 1.0) * y_true
        else:
            cells = float(np.prod(y_true.shape[1:]))
            lesion = keras.ops.maximum(keras.ops.sum(y_true, axis=axes, keepdims=True), 1.0)
            weight = 1.0 + keras.ops.maximum(lesion_weight * cells / lesion - 1.0, 0.0) * y_true
        cross = -(y_true * keras.ops.log(p) + (1.0 - y_true) * keras.ops.log(1.0 - p))
        return keras.ops.mean(weight * cross, axis=axes)

    loss.__name__ = "gate_mask_loss"
    return loss


def pooling_mask_loss(y_true, y_pred):
    """Cross-entropy of attention-pooling weights with the lesion mask spread evenly on its cells.

    `y_true` (B, x, y, z) is a lesion mask on the pooling grid, `y_pred` the pooling weights
    (B, x, y, z), which sum to 1 per scan. Minimal when all the weight lies on lesion cells.
    Returns (B,); 0 for scans without lesion cells (there is nothing to point at).
    """
    axes = tuple(range(1, len(y_true.shape)))
    y_true = keras.ops.cast(y_true, "float32")
    share = y_true / keras.ops.maximum(keras.ops.sum(y_true, axis=axes, keepdims=True), 1.0)
    log_weights = keras.ops.log(keras.ops.clip(keras.ops.cast(y_pred, "float32"), 1e-8, 1.0))
    return -keras.ops.sum(share * log_weights, axis=axes)


class VolumeBatches(keras.utils.PyDataset):
    """Shuffled, augmented batches `(x (B, X, Y, Z, 1), y (B,), sample_weight (B,))`.

    With `mask_grids` (`{output name: map shape}`), `y` and `sample_weight` are dicts:
    `"probability"` as above, and per name the lesion masks on that grid (B, *shape) with
    weight 1 for scans whose mask is known (a mask file, or a scan without lesion) and 0 for
    the others. The order and the augmentation are deterministic per seed, epoch and batch index.
    """

    def __init__(
        self,
        volumes: Volumes,
        batch_size,
        augment=None,
        class_weight=None,
        seed=0,
        mask_grids=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.volumes = volumes
        self.batch_size = batch_size
        self.augment = augment
        self.class_weight = class_weight or {0: 1.0, 1: 1.0}
        self.seed = seed
        self.mask_grids = dict(mask_grids or {})
        self.epoch = 0
        self._shuffle()

    def _shuffle(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.order = rng.permutation(len(self.volumes.labels))

    def __len__(self):
        return math.ceil(len(self.volumes.labels) / self.batch_size)

    def __getitem__(self, index):
        indices = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        batch, masks = [], []
        for i in indices:
            volume = self.volumes.images[i].astype(np.float32)
            mask = self.volumes.masks[i] if self.mask_grids else None
            if self.augment is not None and self.augment.enabled:
                volume = augment_volume(volume, rng, self.augment, mask=mask)
                if mask is not None:
                    volume, mask = volume
            batch.append(volume)
            masks.append(mask)
        x = np.stack(batch)[..., None]  # (B, X, Y, Z) -> (B, X, Y, Z, 1)
        y = self.volumes.labels[indices].astype(np.float32)
        w = np.asarray([self.class_weight[int(label)] for label in y], np.float32)
        if not self.mask_grids:
            return x, y, w
        known = (self.volumes.has_mask[indices] | (self.volumes.labels[indices] == 0)).astype(
            np.float32
        )
        targets, weights = {"probability": y}, {"probability": w}
        # a gate and its pooling share a grid: bring the masks there once
        grids = sorted({tuple(shape[:3]) for shape in self.mask_grids.values()})
        per_scan = [masks_on_grids(m, grids) for m in masks]
        on_grid = {g: np.stack([scan[k] for scan in per_scan]) for k, g in enumerate(grids)}
        for name, shape in self.mask_grids.items():
            # the map's shape: (B, x, y, z, 1) for gate coefficients, (B, x, y, z) for pooling
            targets[name] = on_grid[tuple(shape[:3])].reshape((len(masks), *shape))
            weights[name] = known
        return x, targets, weights

    def on_epoch_end(self):
        self.epoch += 1
        self._shuffle()


def _supervised_maps(model: keras.Model, volumes: Volumes, optim: OptimConfig) -> dict:
    """`{name: (maps, loss, weight)}` of the attention maps to fit to the lesion masks (maybe none).

    The coefficients of each `AttentionGate` (`mask_loss`, weight `optim.mask_loss_weight`) and
    the weights of each `GatedAttentionPooling` (`pooling_mask_loss`, `optim.mask_pooling_weight`)
    that the model returns, minus
    those whose weight is 0. None at all when no lesion scan of the train split has a mask (the
    gates would only learn to close) or when no gate is supervised (ViT, custom models).
    """
    from toolkit.layers import AttentionGate, GatedAttentionPooling

    if not np.any(volumes.has_mask & (volumes.labels == 1)):
        return {}
    per_scan = optim.mask_weighting == "per-scan"
    gate_loss = mask_loss(
        optim.mask_positive_weight, optim.mask_lesion_weight if per_scan else None
    )
    maps, gated = {}, False
    for layer in model.layers:
        if isinstance(layer, AttentionGate):
            loss, weight = gate_loss, optim.mask_loss_weight
        elif isinstance(layer, GatedAttentionPooling):
            loss, weight = pooling_mask_loss, optim.mask_pooling_weight
        else:
            continue
        output = layer.output
        if weight > 0 and isinstance(output, (list, tuple)) and len(output) > 1:
            maps[layer.name] = (output[1], loss, weight)
            gated = gated or isinstance(layer, AttentionGate)
    return maps if gated else {}


def compile_for_training(model: keras.Model, volumes: Volumes, config: TrainConfig):
    """Compile `model` for `fit`; returns `(fit_model, gates)`.

    Without mask supervision (see `OptimConfig.mask_loss_weight` and `_supervised_maps`),
    `fit_model` is `model`, compiled with AdamW and binary cross-entropy, and `gates` is `{}`.
    With it, `fit_model` shares every layer of `model` and also outputs the maps fitted to the
    lesion masks (`gates`: `{name: tensor}`): the coefficients of each gate, with `mask_loss`
    weighted by `mask_loss_weight`, and the weights of each attention pooling, with
    `pooling_mask_loss` weighted by `mask_pooling_weight`. `model` is compiled with the same
    optimizer, so the classifier that is validated, saved and logged carries the optimizer
    state and learning rate too.
    """
    from pipelines.medimg.heatmaps import resolve_jit

    supervised = _supervised_maps(model, volumes, config.optim)
    gates = {name: maps for name, (maps, _, _) in supervised.items()}
    optimizer = keras.optimizers.AdamW(
        learning_rate=config.optim.learning_rate, weight_decay=config.optim.weight_decay
    )
    jit_compile = resolve_jit(config.jit_compile)
    if not gates:
        model.compile(
            optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(), jit_compile=jit_compile
        )
        return model, gates
    fit_model = keras.Model(
        model.inputs, {"probability": model.outputs[0], **gates}, name=f"{model.name}_fit"
    )
    fit_model.compile(
        optimizer=optimizer,
        loss={
            "probability": keras.losses.BinaryCrossentropy(),
            **{name: loss for name, (_, loss, _) in supervised.items()},
        },
        loss_weights={"probability": 1.0, **{n: w for n, (_, _, w) in supervised.items()}},
        jit_compile=jit_compile,
    )
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy())
    return fit_model, gates


def class_weights(labels) -> dict[int, float]:
    """`n / (2 n_c)` per class: both classes weigh the same in the loss."""
    labels = np.asarray(labels)
    n = len(labels)
    weights = {}
    for c in (0, 1):
        count = int(np.sum(labels == c))
        weights[c] = n / (2.0 * count) if count else 1.0
    return weights


# --------------------------------------------------------------------------------------------
# Callbacks.


def _atomic_write_json(path: Path, data) -> None:
    from pipelines.medimg.evaluate import json_ready

    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(json_ready(data), indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _finite(value, default):
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else value


class ValidationMonitor(keras.callbacks.Callback):
    """Validation AUC, loss and heatmap pointing game each epoch; keeps the best model.

    Adds `val_auc`, `val_loss` and `val_pointing_game` to the epoch logs (so later callbacks,
    MLflow and early stopping, see them), saves the model to `model.keras` whenever the
    validation AUC improves (ties: lower validation loss), remembers the example heatmap figure
    of the epoch, and restores the best weights at the end of training. Its state lives in
    `validation_state.json`, so a resumed run keeps its best epoch.
    """

    def __init__(self, volumes: Volumes, out_dir, batch_size=4, pointing_game=True):
        super().__init__()
        self.volumes = volumes
        self.out_dir = Path(out_dir)
        self.batch_size = batch_size
        self.pointing_game = pointing_game
        self.model_path = self.out_dir / MODEL_FILENAME
        self.state_path = self.out_dir / STATE_FILENAME
        self.state = {"best_auc": None, "best_loss": None, "best_epoch": None, "history": []}
        if self.state_path.is_file():
            try:
                self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
            except ValueError:
                pass
        self.example = None
        positives = np.flatnonzero((volumes.labels == 1) & volumes.has_mask)
        self.example_index = int(positives[0]) if len(positives) else 0
        self._epoch_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1

    def evaluate(self):
        """`(probabilities, maps or None)` of the validation scans with the current weights."""
        from pipelines.medimg.heatmaps import default_method, grad_cam, native_heatmaps

        images = self.volumes.images
        if not self.pointing_game:
            probabilities = []
            for start in range(0, len(images), self.batch_size):
                batch = images[start : start + self.batch_size].astype(np.float32)[..., None]
                probabilities.append(np.asarray(self.model.predict_on_batch(batch)).reshape(-1))
            return np.concatenate(probabilities), None
        if default_method(self.model) == "native":
            return native_heatmaps(self.model, images, batch_size=self.batch_size)
        return grad_cam(self.model, images, batch_size=self.batch_size)

    def on_epoch_end(self, epoch, logs=None):
        from pipelines.medimg.metrics import pointing_game_hit, roc_auc

        logs = logs if logs is not None else {}
        train_seconds = time.perf_counter() - (self._epoch_start or time.perf_counter())
        probabilities, maps = self.evaluate()
        labels = self.volumes.labels
        clipped = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
        loss = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
        auc = _finite(roc_auc(labels, probabilities), 0.5)
        logs["val_auc"] = auc
        logs["val_loss"] = loss
        if maps is not None:
            hits = [
                pointing_game_hit(maps[i], self.volumes.masks[i])
                for i in range(len(labels))
                if labels[i] == 1 and self.volumes.has_mask[i] and self.volumes.masks[i].any()
            ]
            logs["val_pointing_game"] = float(np.mean(hits)) if hits else 0.0
            i = self.example_index
            self.example = (epoch, self.volumes.images[i], maps[i], float(probabilities[i]))
        best_auc, best_loss = self.state["best_auc"], self.state["best_loss"]
        improved = (
            best_auc is None or auc > best_auc or (auc == best_auc and loss < (best_loss or 0))
        )
        if improved:
            partial = self.out_dir / f".{MODEL_FILENAME}.partial.keras"
            self.model.save(partial)
            os.replace(partial, self.model_path)
            self.state.update({"best_auc": auc, "best_loss": loss, "best_epoch": epoch})
        entry = {
            "epoch": epoch,
            "loss": float(logs.get("loss", float("nan"))),
            "val_loss": loss,
            "val_auc": auc,
            "val_pointing_game": logs.get("val_pointing_game"),
            "seconds": time.perf_counter() - (self._epoch_start or time.perf_counter()),
            "train_seconds": train_seconds,
            "train_batches": self._batches,  # fewer than an epoch's when the budget ended it
            "loader_share": logs.get("loader_share"),
        }
        self.state["history"] = [h for h in self.state["history"] if h["epoch"] != epoch]
        self.state["history"].append(entry)
        _atomic_write_json(self.state_path, self.state)

    def on_train_end(self, logs=None):
        # The MLflow callback comes after this one: it logs and registers the best weights.
        if self.model_path.is_file():
            self.model.load_weights(self.model_path)

    def example_figure(self, epoch, model):
        """`{"val_heatmap": Figure}` for the MLflow callback (empty before the first epoch)."""
        from toolkit.interpret import plot_volume_overlay

        if self.example is None:
            return {}
        done, image, heatmap, probability = self.example
        record = self.volumes.records[self.example_index]
        title = (
            f"Epoch {done + 1}: {Path(record.image).name} (label {record.label}), "
            f"p(lesion) = {probability:.2f}"
        )
        figure = plot_volume_overlay(image.astype(np.float32), heatmap, title=title)
        return {"val_heatmap": figure}


# --------------------------------------------------------------------------------------------
# Training.


def train(
    config: TrainConfig, data=None, out=None, callbacks=(), progress: bool = True, model_fn=None
) -> dict:
    """Train a classifier; write `model.keras`, `config.yaml`, `metrics.json` (and plots).

    Args:
        config: `TrainConfig` (see `resolve_config`).
        data: str or Path or None. A datalist; overrides `config.data.path`.
        out: str or Path or None. Output folder; default `runs/medimg/<timestamp>/`. Training
            again into the same folder resumes an interrupted run.
        callbacks: extra Keras callbacks, run after the pipeline's own.
        progress: bool. Show progress bars.
        model_fn: callable or None. `model_fn(config.model, config.preprocess, metadata)`
            builds another model (with a `ScanPreprocessing` layer) in place of
            `model.build_model`; the benchmark trains its baseline this way.

    Returns:
        The content of `metrics.json` as a dict.
    """
    from pipelines.medimg.datasets import read_datalist
    from pipelines.medimg.evaluate import confusion_figure, evaluate_records, roc_figure
    from toolkit.tracking import data_fingerprint, tracking_run

    started = time.time()
    scale = setup_scale(config.precision, config.distribute, config.data.batch_size)
    out = scale.output_dir(Path(out) if out is not None else default_out_dir())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {out}: {error.strerror}") from None
    config_path = save_config(config, out / CONFIG_FILENAME)
    keras.utils.set_random_seed(config.seed)

    datalist_path = resolve_datalist(config, data, progress=progress)
    # warn=False: every skipped row is printed below as one "warning:" line, with the others.
    datalist = read_datalist(datalist_path, seed=config.seed, warn=False)
    skipped = list(datalist.skipped)
    cache = _cache_dir(config.data.cache)
    splits, volumes = {}, {}
    for name in ("train", "val", "test"):
        records = datalist.split(name)
        if name == "train" and config.data.max_train_scans:
            records = records[: config.data.max_train_scans]
        splits[name] = records
        if name == "test":
            continue  # evaluated from the files at the end (heatmaps in scanner space)
        prepared, bad = prepare_volumes(
            records, config.preprocess, cache, config.data.workers, progress, desc=name
        )
        skipped.extend(bad)
        volumes[name] = prepared
    for name in ("train", "val"):
        if volumes[name] is None:
            raise UserError(f"{datalist_path}: no usable {name} scans (every row was skipped)")
        if len(set(volumes[name].labels.tolist())) < 2 and name == "train":
            raise UserError(f"{datalist_path}: the train split needs scans of both classes")
    for line in skipped:
        print(f"warning: {line}", file=sys.stderr)
    if skipped:
        print(
            f"warning: skipped {len(skipped)} datalist entries (see metrics.json)", file=sys.stderr
        )

    metadata = {
        "threshold": config.evaluation.threshold,
        "trained_on": str(datalist_path),
        "heatmap_methods": list(config.evaluation.heatmap_methods),
        "backend": keras.backend.backend(),
    }
    with scale.scope():  # dtype policy, distribution strategy
        model = (model_fn or build_model)(config.model, config.preprocess, metadata=metadata)
        fit_model, gates = compile_for_training(model, volumes["train"], config)
    if gates and progress:
        print(f"mask supervision: {', '.join(gates)} fitted to the lesion masks", file=sys.stderr)
    weights = class_weights(volumes["train"].labels) if config.optim.class_weights else None
    batches = VolumeBatches(
        volumes["train"],
        config.data.batch_size,
        augment=config.augment,
        class_weight=weights,
        seed=config.seed,
        mask_grids={name: tuple(int(n) for n in t.shape[1:]) for name, t in gates.items()},
        workers=config.data.loader_workers,
    )
    monitor = ValidationMonitor(
        volumes["val"],
        out,
        batch_size=config.data.batch_size,
        pointing_game=config.evaluation.val_pointing_game,
    )
    budget = TimeBudget(config.optim.max_minutes) if config.optim.max_minutes else None
    schedule = []
    if config.optim.lr_schedule == "linear":
        schedule.append(
            LinearDecay(
                config.optim.learning_rate,
                config.optim.epochs,
                max_minutes=config.optim.max_minutes,
                final_fraction=config.optim.final_lr_fraction,
            )
        )
    fingerprint = data_fingerprint(files=[str(r.image) for r in datalist.records])
    with tracking_run(
        pipeline="medimg",
        config=config_to_dict(config),
        out_dir=out,
        tracking_uri=config.tracking_uri,
        enabled=scale.tracking(config.tracking),
        config_path=config_path,
        data_fingerprint=fingerprint,
    ) as tracker:
        example = volumes["val"].images[:1].astype(np.float32)[..., None]
        fit_callbacks = [
            InterruptAtSafePoints(),  # Ctrl-C/SIGTERM between steps, before the epoch's work
            *schedule,  # before the monitor and MLflow: they log the learning rate
            scale.callback(),  # `loader_share` in the logs the others see
            ForwardingCallback(monitor, model),
            scale.chief_callback(
                ForwardingCallback(
                    tracker.callback(image_fn=monitor.example_figure, input_example=example),
                    model,
                )
            ),
            keras.callbacks.EarlyStopping(
                monitor="val_auc", mode="max", patience=config.optim.patience
            ),
        ]
        if budget is not None:
            fit_callbacks.append(budget)
        # Last of the pipeline's callbacks: it saves the state the others leave behind.
        backup = SafeBackupAndRestore(out / "backup", callbacks=fit_callbacks)
        fit_callbacks.append(backup)
        fit_callbacks.extend(callbacks)
        fit_start = time.perf_counter()
        with interrupts_at_safe_points():
            fit_model.fit(
                scale.batches(batches),
                epochs=config.optim.epochs,
                callbacks=fit_callbacks,
                verbose=1 if progress else 2,
            )
        fit_seconds = time.perf_counter() - fit_start
        if not monitor.model_path.is_file():
            model.save(monitor.model_path)

        test_records = splits["test"] or splits["val"]
        test_name = "test" if splits["test"] else "val"
        evaluation, _ = evaluate_records(
            model,
            test_records,
            methods=config.evaluation.heatmap_methods,
            threshold=config.evaluation.threshold,
            top_k_percent=config.evaluation.top_k_percent,
            n_bootstrap=config.evaluation.bootstrap,
            seed=config.seed,
            batch_size=config.data.batch_size,
            progress=progress,
        )
        for line in evaluation.get("skipped", []):  # bad test-split rows, found only now
            print(f"warning: {line}", file=sys.stderr)
        skipped.extend(evaluation.get("skipped", []))
        roc = roc_figure(evaluation, title=f"ROC on the {test_name} split")
        confusion = confusion_figure(evaluation, title=f"Confusion matrix ({test_name} split)")
        roc.savefig(out / "roc.png", dpi=100, bbox_inches="tight")
        confusion.savefig(out / "confusion.png", dpi=100, bbox_inches="tight")
        tracker.log_figure(roc, "plots/roc.png")
        tracker.log_figure(confusion, "plots/confusion.png")

        history = monitor.state["history"]
        train_seconds = sum(h["train_seconds"] for h in history) or fit_seconds
        n_train = len(volumes["train"].labels)
        steps = sum(h.get("train_batches", len(batches)) for h in history)
        trained_scans = min(steps * config.data.batch_size, len(history) * n_train)
        metrics = {
            test_name: evaluation,
            "evaluated_split": test_name,
            "best_epoch": monitor.state["best_epoch"],
            "best_val_auc": monitor.state["best_auc"],
            "epochs": history,
            "stopped_by_time_budget": bool(budget and budget.stopped),
            "train_scans": len(volumes["train"].labels),
            "val_scans": len(volumes["val"].labels),
            "test_scans": evaluation.get("scans", 0),
            "skipped": skipped,
            "train_scans_per_second": (trained_scans / train_seconds if train_seconds else None),
            "parameters": int(model.count_params()),
            "mask_supervision": sorted(gates),
            "architecture": model_metadata(model).get("architecture", config.model.name),
            "backend": keras.backend.backend(),
            "datalist": str(datalist_path),
            "elapsed_seconds": time.time() - started,
            "out": str(out),
            **scale.summary(),
        }
        _atomic_write_json(out / METRICS_FILENAME, metrics)
        summary = {
            f"{test_name}_{key}": evaluation[key]
            for key in ("auc", "accuracy", "sensitivity", "specificity", "pointing_game")
            if isinstance(evaluation.get(key), (int, float)) and not math.isnan(evaluation[key])
        }
        tracker.log_metrics(summary)
    backup.delete()  # kept until now: a kill after `fit` resumes without training
    return metrics
