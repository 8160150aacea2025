"""Additive attention gate for 2D images and 3D volumes (Schlemper et al., 2019)."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

_METHODS = ("linear", "nearest")
# Up to this input length an axis is resampled by a matrix product, beyond it by gathers.
_MATRIX_MAX_LEN = 64


def _source_indices(in_len, out_len, method, align_corners):
    """Static gather indices (and linear weights) that resample one axis from in_len to out_len.

    Half-pixel convention (`align_corners=False`): output sample `o` sits at input coordinate
    `(o + 0.5) * in_len / out_len - 0.5`, so the grids' outer edges coincide (as in
    `tf.image.resize` and `jax.image.resize`). `align_corners=True`: `o * (in_len - 1) /
    (out_len - 1)`, so the first and last samples coincide. Coordinates are clamped to the input.
    """
    out = np.arange(out_len, dtype="float64")
    if align_corners:
        scale = (in_len - 1) / (out_len - 1) if out_len > 1 else 0.0
        src = out * scale
    else:
        src = (out + 0.5) * (in_len / out_len) - 0.5
    if method == "nearest":
        # The input cell that contains the output sample: integer factors repeat each value.
        index = np.floor(src + 0.5) if not align_corners else np.round(src)
        return np.clip(index, 0, in_len - 1).astype("int32"), None, None
    src = np.clip(src, 0.0, in_len - 1)
    lower = np.floor(src).astype("int32")
    upper = np.minimum(lower + 1, in_len - 1).astype("int32")
    frac = (src - lower).astype("float32")
    return lower, upper, frac


def resize_spatial(x, spatial_shape, method="linear", align_corners=False):
    """Resamples a channels-last batch (B, *spatial, C) to a new spatial shape.

    Separable interpolation: one pass of 1D linear (or nearest) interpolation per spatial axis,
    so 2D gives bilinear and 3D trilinear interpolation, for any (also non-integer) ratio. Uses
    `keras.ops` only and is differentiable with respect to `x`. There is no antialiasing when
    shrinking.

    Args:
        x: tensor (B, *spatial, C) with static spatial dimensions.
        spatial_shape: tuple of ints. Target spatial shape, one entry per spatial axis of `x`.
        method: string. `"linear"` or `"nearest"`. Defaults to `"linear"`.
        align_corners: bool. Defaults to `False` (half-pixel centres, see `_source_indices`).

    Returns:
        Tensor (B, *spatial_shape, C) in the dtype of `x`.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}. Received: method={method!r}")
    spatial_in = tuple(x.shape[1:-1])
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if len(spatial_shape) != len(spatial_in):
        raise ValueError(
            f"spatial_shape must have {len(spatial_in)} entries for an input of shape "
            f"{tuple(x.shape)}. Received: spatial_shape={spatial_shape}"
        )
    if any(s is None for s in spatial_in):
        raise ValueError(f"resize_spatial needs static spatial dimensions. Received: {x.shape}")
    letters = "abcdefgh"[: len(x.shape)]
    for axis, (in_len, out_len) in enumerate(zip(spatial_in, spatial_shape), start=1):
        if in_len == out_len:
            continue
        lower, upper, frac = _source_indices(in_len, out_len, method, align_corners)
        if method == "nearest":
            x = ops.take(x, lower, axis=axis)  # (..., in_len, ...) -> (..., out_len, ...)
        elif in_len <= _MATRIX_MAX_LEN:
            # Short axes (coarse maps): one matrix product per axis with the (out_len, in_len)
            # interpolation matrix, few ops (cheap for JAX's per-op compilation in eager mode).
            matrix = np.zeros((out_len, in_len), "float32")
            np.add.at(matrix, (np.arange(out_len), lower), 1.0 - frac)
            np.add.at(matrix, (np.arange(out_len), upper), frac)
            subscripts = f"{letters},z{letters[axis]}->{letters.replace(letters[axis], 'z')}"
            # e.g. "abcde,zb->azcde": (B, in_len, H, W, C) -> (B, out_len, H, W, C)
            x = ops.einsum(subscripts, x, ops.convert_to_tensor(matrix, dtype=x.dtype))
        else:
            # Long axes: two gathers and a lerp, linear cost in the axis length.
            low = ops.take(x, lower, axis=axis)  # (..., in_len, ...) -> (..., out_len, ...)
            high = ops.take(x, upper, axis=axis)  # (..., in_len, ...) -> (..., out_len, ...)
            weight_shape = [1] * len(x.shape)
            weight_shape[axis] = out_len
            weight = ops.convert_to_tensor(np.reshape(frac, weight_shape), dtype=x.dtype)
            x = low + (high - low) * weight
    return x


@keras.saving.register_keras_serializable(package="toolkit")
class AttentionGate(keras.layers.Layer):
    """Additive attention gate of Schlemper et al. (2019) for images and volumes.

    A coarse gating signal `g` (deeper features with more context) decides which positions of a
    finer feature map `x` pass on. With the features brought to the gating grid by a strided
    convolution, as in the paper,

    `q = psi^T relu(W_x * x + W_g g + b_g) + b_psi`, `alpha = sigmoid(q)`,

    where `W_x` is a convolution with kernel = stride = the downsampling factor f between the
    two grids (no bias), `W_g` and `psi` are 1x1 convolutions. The coefficients `alpha`, computed
    on the coarse grid (cheap in 3D), are resampled to the grid of `x` by (bi/tri)linear
    interpolation with half-pixel centres, so they stay in [0, 1], and the output is
    `x_hat = alpha * x` (one coefficient per position, shared by all channels).

    Works channels-last in 2D (B, H, W, C) and 3D (B, D, H, W, C); the rank is inferred in
    `build()`. The factor f is inferred per spatial axis from the two static shapes as
    `ceil(size_x / size_g)` and must satisfy `ceil(size_x / f) == size_g` (so 2x, 3x, ...
    downsampling, equal grids (f = 1) and odd sizes such as 7 -> 4 from "same"-padded pooling all
    work); other pairs of shapes raise a `ValueError`. The factor is fixed when the layer is
    built (it is the stride of `W_x`); later calls may use other sizes with the same factor.

    Args:
        intermediate_dim: int. Channels of the joint space where `W_x x` and `W_g g` are added
            (F_int in the paper).
        kernel_initializer: string or initializer. Initializer of the three kernels. Defaults to
            `"glorot_uniform"`.
        bias_initializer: string or initializer. Initializer of `b_g` and `b_psi`. Defaults to
            `"zeros"`.
        kernel_regularizer: optional regularizer of the three kernels. Defaults to `None`.
        bias_regularizer: optional regularizer of the biases. Defaults to `None`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        features: (B, *S_x, Cx) feature map to gate, S_x = (H, W) or (D, H, W).
        gating: (B, *S_g, Cg) gating signal on a grid as coarse as or coarser than `features`.
        return_attention_scores: bool. Whether to also return the coefficients.

    Returns:
        The gated features (B, *S_x, Cx), or `(gated, coefficients)` with coefficients
        (B, *S_x, 1) in [0, 1] when `return_attention_scores=True`.

    Example:

    >>> import numpy as np
    >>> gate = AttentionGate(intermediate_dim=8)
    >>> skip = np.random.rand(2, 16, 16, 16, 4).astype("float32")
    >>> coarse = np.random.rand(2, 8, 8, 8, 6).astype("float32")
    >>> gated, alpha = gate(skip, coarse, return_attention_scores=True)
    >>> tuple(gated.shape), tuple(alpha.shape)
    ((2, 16, 16, 16, 4), (2, 16, 16, 16, 1))

    References:
        - [Schlemper et al., 2019. Attention gated networks: Learning to leverage salient
          regions in medical images](https://arxiv.org/abs/1808.08114)
        - [Oktay et al., 2018. Attention U-Net: Learning Where to Look for the
          Pancreas](https://arxiv.org/abs/1804.03999)
    """

    def __init__(
        self,
        intermediate_dim,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(intermediate_dim, int) or intermediate_dim <= 0:
            raise ValueError(
                "intermediate_dim must be a positive integer. "
                f"Received: intermediate_dim={intermediate_dim}"
            )
        self.intermediate_dim = intermediate_dim
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

    @staticmethod
    def _factors(features_shape, gating_shape):
        rank = len(features_shape)
        if rank not in (4, 5) or len(gating_shape) != rank:
            raise ValueError(
                "AttentionGate expects features and gating of the same rank, 4 (B, H, W, C) or "
                f"5 (B, D, H, W, C). Received: features_shape={features_shape}, "
                f"gating_shape={gating_shape}"
            )
        x_sp, g_sp = tuple(features_shape[1:-1]), tuple(gating_shape[1:-1])
        if any(s is None for s in x_sp + g_sp):
            raise ValueError(
                "AttentionGate needs static spatial dimensions. Received: "
                f"features_shape={features_shape}, gating_shape={gating_shape}"
            )
        factors = []
        for size_x, size_g in zip(x_sp, g_sp):
            factor = math.ceil(size_x / size_g) if size_g > 0 else 0
            if size_g > size_x or factor < 1 or math.ceil(size_x / factor) != size_g:
                raise ValueError(
                    "The gating grid must be the features' grid downsampled by an integer "
                    "factor (ceil(size_x / f) == size_g). Received: "
                    f"features_shape={features_shape}, gating_shape={gating_shape}"
                )
            factors.append(factor)
        return tuple(factors)

    def _conv(self, filters, kernel_size, strides, use_bias, name):
        conv_cls = keras.layers.Conv2D if self._rank == 2 else keras.layers.Conv3D
        return conv_cls(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, features_shape, gating_shape):
        factors = self._factors(features_shape, gating_shape)
        self._rank = len(factors)
        self._features_spatial = tuple(features_shape[1:-1])
        self._theta_x = self._conv(self.intermediate_dim, factors, factors, False, "theta_x")
        self._phi_g = self._conv(self.intermediate_dim, 1, 1, True, "phi_g")
        self._psi = self._conv(1, 1, 1, True, "psi")
        self._theta_x.build(features_shape)
        self._phi_g.build(gating_shape)
        self._psi.build((*gating_shape[:-1], self.intermediate_dim))
        self.built = True

    def call(self, features, gating, return_attention_scores=False):
        theta = self._theta_x(features)  # (B, *S_x, Cx) -> (B, *S_g, I)
        phi = self._phi_g(gating)  # (B, *S_g, Cg) -> (B, *S_g, I)
        logits = self._psi(ops.relu(theta + phi))  # (B, *S_g, I) -> (B, *S_g, 1)
        alpha = ops.sigmoid(ops.cast(logits, "float32"))
        # Interpolating probabilities (not logits) keeps every coefficient inside [0, 1].
        # The features' own static shape: a built gate also serves other sizes at the same ratio.
        spatial = tuple(features.shape[1:-1])
        if any(s is None for s in spatial):
            spatial = self._features_spatial
        alpha = resize_spatial(alpha, spatial)  # (B, *S_g, 1) -> (B, *S_x, 1)
        alpha = ops.cast(alpha, features.dtype)
        gated = features * alpha
        if return_attention_scores:
            return gated, alpha
        return gated

    def compute_output_shape(self, features_shape, gating_shape):
        return tuple(features_shape)

    def compute_output_spec(self, features, gating, return_attention_scores=False):
        gated = keras.KerasTensor(features.shape, dtype=self.compute_dtype)
        if not return_attention_scores:
            return gated
        alpha = keras.KerasTensor((*features.shape[:-1], 1), dtype=self.compute_dtype)
        return gated, alpha

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            }
        )
        return config
