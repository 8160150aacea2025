"""Upsampling of coarse attention maps and heatmaps to an input's spatial shape."""

from __future__ import annotations

import numpy as np
from keras import ops

from toolkit.layers.attention_gate import resize_spatial

_METHODS = ("linear", "nearest")


def upsample_map(coarse, target_shape, method="linear", align_corners=False):
    """Resamples a coarse 2D or 3D map (gate coefficients, pooling weights, a patch-grid
    rollout, Grad-CAM) to the spatial shape of the input it explains.

    The number of spatial axes r is `len(target_shape)` (2 or 3), and the layout of `coarse` is
    read from its rank:

    - rank r: a single map (*S);
    - rank r + 1: a batch of maps (B, *S);
    - rank r + 2: a batch of channels-last maps (B, *S, C) (a channel axis needs a batch axis).

    The output keeps that layout with S replaced by `target_shape`. Interpolation is separable
    (bilinear in 2D, trilinear in 3D) for any, also non-integer, ratio. With the default
    `align_corners=False` (half-pixel centres, as `tf.image.resize` and `jax.image.resize`) the
    outer edges of both grids coincide: coarse cell i covers the input voxels
    `[i * f, (i + 1) * f)` for an integer factor f, which is exactly the patch of a ViT patch
    grid or the receptive block of a stride-f feature map, and its value lands at that block's
    centre. Beyond the outermost cell centres the map is held constant (edge clamping), so a
    constant map stays constant. `align_corners=True` instead maps the first and last samples of
    both grids onto each other.

    Args:
        coarse: NumPy array or tensor, see the layouts above.
        target_shape: tuple of 2 or 3 ints. Spatial shape to upsample to (no batch or channel
            entries).
        method: string. `"linear"` or `"nearest"` (repeats each cell, useful for masks and to
            show the patch grid). Defaults to `"linear"`.
        align_corners: bool. Grid alignment convention, see above. Defaults to `False`.

    Returns:
        The upsampled map in the layout of `coarse`: a NumPy array when `coarse` is a NumPy
        array, otherwise a tensor. Linear interpolation computes in float32.

    Example:

    >>> import numpy as np
    >>> coarse = np.zeros((4, 4, 4), "float32"); coarse[1, 2, 3] = 1.0
    >>> fine = upsample_map(coarse, (12, 12, 12))  # cell i covers voxels [3 i, 3 i + 3)
    >>> fine.shape, tuple(int(i) for i in np.unravel_index(fine.argmax(), fine.shape))
    ((12, 12, 12), (4, 7, 10))
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}. Received: method={method!r}")
    target_shape = tuple(int(s) for s in target_shape)
    rank = len(target_shape)
    if rank not in (2, 3) or any(s <= 0 for s in target_shape):
        raise ValueError(
            "target_shape must hold 2 or 3 positive sizes (the spatial shape only). "
            f"Received: target_shape={target_shape}"
        )
    as_numpy = isinstance(coarse, np.ndarray)
    x = ops.convert_to_tensor(coarse)
    ndim = len(x.shape)
    if ndim == rank:
        x = x[None, ..., None]  # (*S) -> (1, *S, 1)
    elif ndim == rank + 1:
        x = x[..., None]  # (B, *S) -> (B, *S, 1)
    elif ndim != rank + 2:
        raise ValueError(
            f"coarse must have rank {rank} (*S), {rank + 1} (B, *S) or {rank + 2} (B, *S, C) "
            f"for a target_shape of {rank} axes. Received: coarse.shape={tuple(x.shape)}"
        )
    if method == "linear":
        x = ops.cast(x, "float32")
    x = resize_spatial(x, target_shape, method=method, align_corners=align_corners)
    if ndim == rank:
        x = x[0, ..., 0]  # (1, *T, 1) -> (*T)
    elif ndim == rank + 1:
        x = x[..., 0]  # (B, *T, 1) -> (B, *T)
    return ops.convert_to_numpy(x) if as_numpy else x
