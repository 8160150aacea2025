"""From a stored scan to the model's input grid, and from model-space maps back to the scan.

The model sees every scan on one grid: RAS+ axes (axis 0 runs left -> right, axis 1 posterior
-> anterior, axis 2 inferior -> superior), `spacing` millimetres per voxel, `shape` voxels,
centred on the world-space centre of the scan's foreground (or of its field of view). One
linear map, `original voxel index = T @ model voxel index`, takes the model grid to the stored
voxel grid; reorientation (any permutation and flip of axes, e.g. LPS or PSR storage),
resampling and the crop/pad are all that one map, so an image is interpolated exactly once.

`Geometry` keeps the original affine and shape and that map: `to_model` resamples any volume on
the scan's grid (the image, a lesion mask) onto the model grid and `to_original` maps a
model-space array (a heatmap) back onto the stored grid, with exactly the input's shape, ready to
be saved with the input's affine (`io.save_nifti(..., reference=scan)`).

Axis-aligned scans (the usual case, any orientation) are resampled separably with NumPy (linear
or nearest), which is several times faster than `scipy.ndimage.affine_transform`; oblique scans
fall back to `scipy.ndimage.affine_transform`. Both treat points outside the source grid as
`cval` and interpolate between the edge voxel and `cval` within half a voxel of the edge.

Intensities are normalised on the model grid: `zscore` (MRI) standardises with the mean and
standard deviation of the foreground after clipping it to percentiles (robust statistics), then
bounds the result to `+-max_abs_z`; `window` (CT) clips to a Hounsfield window `[low, high]` and
scales it to `[0, 1]`; `none` leaves values alone. The image itself is not clipped at the
percentiles: a small bright lesion is by definition above the 99.5th percentile of the brain,
and clipping there would flatten exactly what the model must find.

Default grid: 2 mm, 96 x 112 x 96 voxels (192 x 224 x 192 mm, an adult head with margin).
On the project's 2-core CPU a 4-block Conv3D classifier trains at about 7.8 scans/s on this
grid and about 30 scans/s on 64 x 80 x 64 (docs: notes/calibration.md); lower `shape` and raise
`spacing` together (e.g. 3 mm, 64 x 80 x 64) for faster experiments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.ndimage

from pipelines.medimg.io import DEFAULT_MAX_VOXELS, Scan, load_scan

__all__ = [
    "Geometry",
    "PreprocessConfig",
    "Preprocessed",
    "foreground_threshold",
    "load_and_preprocess",
    "normalize",
    "preprocess",
    "resample",
]


@dataclasses.dataclass
class PreprocessConfig:
    """How scans are brought onto the model grid (the `preprocess:` section of a config).

    Args:
        spacing: three floats. Model voxel size in millimetres. Defaults to `(2.0, 2.0, 2.0)`.
        shape: three ints. Model grid size in voxels. Defaults to `(96, 112, 96)`.
        center: `"foreground"` (centre of the foreground's bounding box) or `"volume"` (centre
            of the stored field of view). Defaults to `"foreground"`.
        normalization: `"zscore"` (MRI), `"window"` (CT, uses `hu_window`) or `"none"`.
            Defaults to `"zscore"`.
        clip_percentiles: two floats. Foreground percentiles the `zscore` statistics are
            computed within. Defaults to `(0.5, 99.5)`.
        max_abs_z: float. The `zscore` output is clipped to `[-max_abs_z, max_abs_z]` (guards
            against spikes and outliers). Defaults to `8.0`.
        hu_window: two floats. `[low, high]` Hounsfield window of the `window` mode, mapped to
            `[0, 1]`. Defaults to `(0.0, 80.0)` (brain window: level 40, width 80).
        max_voxels: int. Largest stored volume accepted. Defaults to `2**27`.
    """

    spacing: tuple[float, ...] = (2.0, 2.0, 2.0)
    shape: tuple[int, ...] = (96, 112, 96)
    center: Literal["foreground", "volume"] = "foreground"
    normalization: Literal["zscore", "window", "none"] = "zscore"
    clip_percentiles: tuple[float, ...] = (0.5, 99.5)
    max_abs_z: float = 8.0
    hu_window: tuple[float, ...] = (0.0, 80.0)
    max_voxels: int = DEFAULT_MAX_VOXELS

    def __post_init__(self):
        self.spacing = tuple(float(v) for v in self.spacing)
        self.shape = tuple(int(v) for v in self.shape)
        self.clip_percentiles = tuple(float(v) for v in self.clip_percentiles)
        self.hu_window = tuple(float(v) for v in self.hu_window)
        if len(self.spacing) != 3 or not all(0 < v < 100 for v in self.spacing):
            raise ValueError(
                f"spacing must be three positive millimetre values. Received: spacing={self.spacing}"
            )
        if len(self.shape) != 3 or not all(v > 0 for v in self.shape):
            raise ValueError(f"shape must be three positive integers. Received: shape={self.shape}")
        if self.center not in ("foreground", "volume"):
            raise ValueError(
                f"center must be 'foreground' or 'volume'. Received: center={self.center!r}"
            )
        if self.normalization not in ("zscore", "window", "none"):
            raise ValueError(
                "normalization must be 'zscore', 'window' or 'none'. "
                f"Received: normalization={self.normalization!r}"
            )
        if len(self.clip_percentiles) != 2 or not (
            0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100
        ):
            raise ValueError(
                "clip_percentiles must satisfy 0 <= low < high <= 100. "
                f"Received: clip_percentiles={self.clip_percentiles}"
            )
        if not self.max_abs_z > 0:
            raise ValueError(f"max_abs_z must be positive. Received: max_abs_z={self.max_abs_z}")
        if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(
                f"hu_window must be [low, high] with low < high. Received: hu_window={self.hu_window}"
            )
        if self.max_voxels <= 0:
            raise ValueError(f"max_voxels must be positive. Received: max_voxels={self.max_voxels}")


# --------------------------------------------------------------------------------------------
# Resampling.


def _axis_aligned(matrix: np.ndarray):
    """If `matrix` (3, 3) is a scaled signed permutation, return the source axis of each column."""
    scale = np.abs(matrix).max()
    axes = np.argmax(np.abs(matrix), axis=0)
    if len(set(axes.tolist())) != 3:
        return None
    off = matrix.copy()
    off[axes, np.arange(3)] = 0
    if np.abs(off).max() > 1e-6 * scale:
        return None
    return axes


def _interp_axis(x: np.ndarray, axis: int, coords: np.ndarray, order: int, cval: float):
    """Sample `x` along `axis` at fractional indices `coords` (1D); outside is `cval`."""
    n = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = len(coords)
    if order == 0:
        index = np.floor(coords + 0.5).astype(np.intp)
        valid = (index >= 0) & (index < n)
        out = np.take(x, np.clip(index, 0, n - 1), axis=axis)
        if not valid.all():
            selector = [slice(None)] * x.ndim
            selector[axis] = ~valid
            out[tuple(selector)] = cval
        return out
    base = np.floor(coords)
    frac = (coords - base).astype(np.float32)
    i0 = base.astype(np.intp)
    i1 = i0 + 1
    valid0 = (i0 >= 0) & (i0 < n)
    valid1 = (i1 >= 0) & (i1 < n)
    w0 = np.where(valid0, 1.0 - frac, 0.0).astype(np.float32)
    w1 = np.where(valid1, frac, 0.0).astype(np.float32)
    if np.all(w1 == 0) and np.all(valid0):
        out = np.take(x, i0, axis=axis)
    else:
        out = np.take(x, np.clip(i0, 0, n - 1), axis=axis) * w0.reshape(shape)
        out += np.take(x, np.clip(i1, 0, n - 1), axis=axis) * w1.reshape(shape)
    if cval != 0:
        outside = (np.where(valid0, 0.0, 1.0 - frac) + np.where(valid1, 0.0, frac)).astype(
            np.float32
        )
        if outside.any():
            out += (cval * outside).reshape(shape)
    return out


def resample(
    data: np.ndarray,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Resample `data` (on the grid of `source_affine`) onto another grid, in world space.

    Each target voxel centre is mapped to world coordinates by `target_affine` and into the
    source grid by the inverse of `source_affine`; the value there is interpolated (`order` 1,
    trilinear) or taken from the nearest voxel (`order` 0, for masks). Points outside the source
    grid get `cval`.

    Args:
        data: array `(X, Y, Z)`.
        source_affine: array `(4, 4)`. Voxel -> world of `data`.
        target_affine: array `(4, 4)`. Voxel -> world of the target grid.
        target_shape: three ints.
        order: int, 0 or 1. Defaults to `1`.
        cval: float. Value outside the source grid. Defaults to `0.0`.

    Returns:
        float32 array of `target_shape` (`order=1`), or of `data`'s dtype (`order=0`).
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1. Received: order={order}")
    transform = np.linalg.inv(np.asarray(source_affine, np.float64)) @ np.asarray(
        target_affine, np.float64
    )
    matrix, offset = transform[:3, :3], transform[:3, 3]
    target_shape = tuple(int(n) for n in target_shape)
    if order == 1 and data.dtype != np.float32:
        data = data.astype(np.float32)
    axes = _axis_aligned(matrix)
    if axes is None:
        return scipy.ndimage.affine_transform(
            data,
            matrix,
            offset=offset,
            output_shape=target_shape,
            order=order,
            mode="grid-constant",
            cval=cval,
            prefilter=False,
        )
    # Target axis k reads source axis axes[k]: bring the source axes into target order (a view),
    # then interpolate one axis at a time, shrinking axes first so later passes touch less data.
    out = np.transpose(data, axes)
    steps = []
    for k in range(3):
        coords = matrix[axes[k], k] * np.arange(target_shape[k]) + offset[axes[k]]
        steps.append((target_shape[k] / max(out.shape[k], 1), k, coords))
    for _, k, coords in sorted(steps, key=lambda step: step[0]):
        out = _interp_axis(out, k, coords, order, cval)
    return np.ascontiguousarray(out)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The stored grid of a scan, the model grid, and the maps between them.

    Attributes:
        original_shape: three ints. Stored shape `(X, Y, Z)` of the scan.
        original_affine: array `(4, 4)`. Stored voxel -> world.
        model_shape: three ints. Model grid shape.
        model_affine: array `(4, 4)`. Model voxel -> world: RAS+ axes, diagonal spacing.
    """

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray

    @classmethod
    def centered(cls, original_shape, original_affine, center_world, spacing, shape):
        """The model grid of `spacing`/`shape` whose centre lies at world point `center_world`."""
        spacing = np.asarray(spacing, np.float64)
        shape = tuple(int(n) for n in shape)
        model_affine = np.eye(4)
        model_affine[:3, :3] = np.diag(spacing)
        model_affine[:3, 3] = (
            np.asarray(center_world, np.float64) - spacing * (np.asarray(shape) - 1) / 2.0
        )
        return cls(
            original_shape=tuple(int(n) for n in original_shape),
            original_affine=np.asarray(original_affine, np.float64),
            model_shape=shape,
            model_affine=model_affine,
        )

    @property
    def model_to_original(self) -> np.ndarray:
        """`(4, 4)` map from model voxel indices to stored voxel indices."""
        return np.linalg.inv(self.original_affine) @ self.model_affine

    def to_model(self, data: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Resample a volume on the stored grid (image, mask) onto the model grid."""
        if tuple(data.shape) != self.original_shape:
            raise ValueError(
                f"data shape {data.shape} does not match the scan's shape {self.original_shape}"
            )
        return resample(
            data, self.original_affine, self.model_affine, self.model_shape, order, cval
        )

    def to_original(self, volume: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Map a model-space array (e.g. a heatmap) back onto the stored grid of the scan.

        Args:
            volume: array of shape `model_shape` (a trailing channel axis of size 1 is allowed).
            order: int. 1 (linear, for maps) or 0 (nearest, for labels). Defaults to `1`.
            cval: float. Value where the model grid does not cover the scan. Defaults to `0.0`.

        Returns:
            float32 array (`order=1`) with exactly `original_shape`, to be saved with the
            scan's affine.
        """
        volume = np.asarray(volume)
        if volume.ndim == 4 and volume.shape[-1] == 1:
            volume = volume[..., 0]
        if tuple(volume.shape) != self.model_shape:
            raise ValueError(
                f"volume shape {volume.shape} does not match the model grid {self.model_shape}"
            )
        return resample(
            volume, self.model_affine, self.original_affine, self.original_shape, order, cval
        )

    def model_index_to_world(self, index) -> np.ndarray:
        """World coordinates (mm) of model voxel indices `(..., 3)`."""
        index = np.asarray(index, np.float64)
        return index @ self.model_affine[:3, :3].T + self.model_affine[:3, 3]

    def model_index_to_original(self, index) -> np.ndarray:
        """Fractional stored voxel indices of model voxel indices `(..., 3)`."""
        transform = self.model_to_original
        index = np.asarray(index, np.float64)
        return index @ transform[:3, :3].T + transform[:3, 3]

    def original_index_to_model(self, index) -> np.ndarray:
        """Fractional model voxel indices of stored voxel indices `(..., 3)`."""
        transform = np.linalg.inv(self.model_to_original)
        index = np.asarray(index, np.float64)
        return index @ transform[:3, :3].T + transform[:3, 3]

    def to_dict(self) -> dict:
        """JSON-ready description (lists of numbers)."""
        return {
            "original_shape": list(self.original_shape),
            "original_affine": self.original_affine.tolist(),
            "model_shape": list(self.model_shape),
            "model_affine": self.model_affine.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        """Inverse of `to_dict`."""
        return cls(
            original_shape=tuple(int(n) for n in data["original_shape"]),
            original_affine=np.asarray(data["original_affine"], np.float64),
            model_shape=tuple(int(n) for n in data["model_shape"]),
            model_affine=np.asarray(data["model_affine"], np.float64),
        )


# --------------------------------------------------------------------------------------------
# Foreground and intensities.


def foreground_threshold(data: np.ndarray, affine: np.ndarray, config: PreprocessConfig) -> float:
    """Intensity above which a voxel counts as foreground.

    `window` mode: the window's lower bound minus its width (soft tissue and brain, not air).
    Otherwise the "robust range" rule `p2 + 0.1 (p98 - p2)`, which separates head from air in
    MRI and skull-stripped images alike. The percentiles come from every second voxel along each
    axis, starting from the same world-space end of each axis, so the same scan stored in another
    orientation gives the same threshold.
    """
    if config.normalization == "window":
        low, high = config.hu_window
        return float(low - (high - low))
    if min(data.shape) >= 8:
        directions = np.asarray(affine)[:3, :3]
        starts = []
        for axis, n in enumerate(data.shape):
            column = directions[:, axis]
            flipped = column[np.argmax(np.abs(column))] < 0
            starts.append((n - 1) % 2 if flipped else 0)
        sample = data[starts[0] :: 2, starts[1] :: 2, starts[2] :: 2]
    else:
        sample = data
    p2, p98 = np.percentile(sample, [2.0, 98.0])
    return float(p2 + 0.1 * (p98 - p2))


def _robust_bbox_center(mask: np.ndarray) -> np.ndarray | None:
    """Voxel centre of the box holding 99% of the mask along each axis (ignores stray voxels).

    The box edges are found the same way from both ends, so flipping an axis flips the box.
    """
    total = int(np.count_nonzero(mask))
    if total == 0:
        return None
    center = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = mask.sum(axis=other, dtype=np.int64)
        cut = 0.005 * total
        low = int(np.searchsorted(np.cumsum(profile), cut, side="right"))
        high = len(profile) - 1 - int(np.searchsorted(np.cumsum(profile[::-1]), cut, side="right"))
        center.append((low + high) / 2.0)
    return np.asarray(center)


def normalize(image: np.ndarray, config: PreprocessConfig, threshold: float) -> np.ndarray:
    """Normalise model-space intensities in place of a copy (see the module docstring)."""
    if config.normalization == "none":
        return image.astype(np.float32, copy=False)
    if config.normalization == "window":
        low, high = config.hu_window
        out = (np.clip(image, low, high) - low) / (high - low)
        return out.astype(np.float32, copy=False)
    foreground = image[image > threshold]
    if foreground.size < 16:
        foreground = image.ravel()
    low, high = np.percentile(foreground, list(config.clip_percentiles))
    clipped = np.clip(foreground, low, high)
    mean, std = float(clipped.mean()), float(clipped.std())
    std = std if std > 1e-6 * max(abs(high), abs(low), 1.0) else 1.0
    out = np.clip((image - mean) / std, -config.max_abs_z, config.max_abs_z)
    return out.astype(np.float32, copy=False)


@dataclasses.dataclass
class Preprocessed:
    """A scan on the model grid.

    Attributes:
        image: float32 array of `geometry.model_shape`, normalised.
        geometry: `Geometry` to map model-space arrays back onto the scan.
        scan: the `Scan` as read (stored grid and header, for outputs and overlays).
    """

    image: np.ndarray
    geometry: Geometry
    scan: Scan

    def to_original(self, volume: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Shortcut for `self.geometry.to_original`."""
        return self.geometry.to_original(volume, order=order, cval=cval)


def preprocess(scan: Scan, config: PreprocessConfig | None = None) -> Preprocessed:
    """Bring a scan onto the model grid: RAS+, `spacing`, `shape`, normalised intensities.

    Args:
        scan: a `Scan` from `io.load_scan`.
        config: `PreprocessConfig` or None (defaults).

    Returns:
        A `Preprocessed` with the model-space image and the `Geometry` to map back.

    Example:

    ```python
    item = preprocess(load_scan("scan.nii.gz"))
    heatmap = np.zeros(item.geometry.model_shape, "float32")
    back = item.to_original(heatmap)          # shape == scan shape
    save_nifti("heatmap.nii.gz", back, reference=item.scan)
    ```
    """
    config = config or PreprocessConfig()
    data = scan.data
    threshold = foreground_threshold(data, scan.affine, config)
    center_index = None
    if config.center == "foreground":
        center_index = _robust_bbox_center(data > threshold)
    if center_index is None:
        center_index = (np.asarray(data.shape, np.float64) - 1) / 2.0
    center_world = scan.affine[:3, :3] @ center_index + scan.affine[:3, 3]
    geometry = Geometry.centered(
        data.shape, scan.affine, center_world, config.spacing, config.shape
    )
    # Outside the stored field of view the model sees background, not an artificial zero.
    background = float(data.min())
    image = geometry.to_model(data, order=1, cval=background)
    image = normalize(image, config, threshold)
    return Preprocessed(image=image, geometry=geometry, scan=scan)


def load_and_preprocess(
    path: str | Path, config: PreprocessConfig | None = None, volume: int | None = None
) -> Preprocessed:
    """`load_scan` followed by `preprocess` (raises `UserError` for bad files)."""
    config = config or PreprocessConfig()
    return preprocess(load_scan(path, volume=volume, max_voxels=config.max_voxels), config)
