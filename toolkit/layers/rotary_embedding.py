"""Rotary position embedding (RoPE) for queries and keys."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="toolkit")
class RotaryEmbedding(keras.layers.Layer):
    """Rotary position embedding of Su et al. (2021), applied to queries or keys.

    The H features of each head are split into two halves (x1, x2) (the "rotate half" layout of
    GPT-NeoX, LLaMA and keras-hub) and feature pair (x1[i], x2[i]) at position p is rotated by
    the angle `p * theta_i`, with `theta_i = max_wavelength^(-2i / H)` and p divided by
    `scaling_factor`:

    `out1 = x1 cos(p theta_i) - x2 sin(p theta_i)`,
    `out2 = x2 cos(p theta_i) + x1 sin(p theta_i)`.

    Because rotations compose, the dot product of a rotated query at position m and a rotated
    key at position n depends only on m - n, which is why RoPE is applied to queries and keys
    (not to values) just before the attention scores. Angles are computed in float32.

    Args:
        max_wavelength: float. The longest wavelength of the rotations. Defaults to `10000`.
        scaling_factor: float. Positions are divided by this factor (linear position
            interpolation to stretch a trained context). Defaults to `1.0`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: (B, T, N, H) per-head queries or keys, or (B, T, D); the sequence axis is 1 and
            the rotated feature axis is the last one, whose size must be even.
        start_index: int or scalar integer tensor. Position of the first of the T steps, for
            cached decoding. Defaults to `0`.

    Returns:
        The rotated tensor, with the shape and dtype of `inputs`.

    Example:

    >>> import numpy as np
    >>> rope = RotaryEmbedding()
    >>> query = np.random.rand(2, 6, 4, 16).astype("float32")  # (B, T, N, H)
    >>> rotated = rope(query)
    >>> step = rope(query[:, 5:6], start_index=5)  # equals rotated[:, 5:6]
    >>> tuple(rotated.shape)
    (2, 6, 4, 16)

    References:
        - [Su et al., 2021. RoFormer: Enhanced Transformer with Rotary Position
          Embedding](https://arxiv.org/abs/2104.09864)
    """

    def __init__(self, max_wavelength=10000, scaling_factor=1.0, **kwargs):
        super().__init__(**kwargs)
        if max_wavelength <= 1:
            raise ValueError(
                f"max_wavelength must be greater than 1. Received: max_wavelength={max_wavelength}"
            )
        if scaling_factor <= 0:
            raise ValueError(
                f"scaling_factor must be positive. Received: scaling_factor={scaling_factor}"
            )
        self.max_wavelength = max_wavelength
        self.scaling_factor = scaling_factor

    def build(self, inputs_shape):
        if len(inputs_shape) < 3:
            raise ValueError(
                f"RotaryEmbedding expects (B, T, ..., H) inputs. Received: shape={inputs_shape}"
            )
        if inputs_shape[-1] is not None and inputs_shape[-1] % 2:
            raise ValueError(
                f"The rotated (last) axis must have an even size. Received: shape={inputs_shape}"
            )
        self.built = True

    def call(self, inputs, start_index=0):
        shape = ops.shape(inputs)
        rank = len(inputs.shape)
        length, dim = shape[1], shape[-1]
        positions = ops.cast(ops.arange(length), "float32") + ops.cast(start_index, "float32")
        positions = positions / self.scaling_factor
        exponents = ops.cast(ops.arange(0, dim, 2), "float32") / ops.cast(dim, "float32")
        inverse_frequencies = 1.0 / ops.power(float(self.max_wavelength), exponents)  # (H/2,)
        # (T, 1) * (1, H/2) -> (T, H/2)
        angles = ops.expand_dims(positions, 1) * ops.expand_dims(inverse_frequencies, 0)
        angles = ops.concatenate([angles, angles], axis=-1)  # (T, H/2) -> (T, H)
        angles = ops.expand_dims(angles, 0)  # (T, H) -> (1, T, H)
        for _ in range(rank - 3):
            angles = ops.expand_dims(angles, -2)  # (1, T, H) -> (1, T, 1, H) for heads
        cos = ops.cast(ops.cos(angles), inputs.dtype)
        sin = ops.cast(ops.sin(angles), inputs.dtype)
        x1, x2 = ops.split(inputs, 2, axis=-1)  # (..., H) -> 2 x (..., H/2)
        rotated_half = ops.concatenate([-x2, x1], axis=-1)  # (..., H)
        return inputs * cos + rotated_half * sin

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"max_wavelength": self.max_wavelength, "scaling_factor": self.scaling_factor}
        )
        return config
