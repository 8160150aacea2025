"""Fixed sinusoidal position encoding of Vaswani et al. (2017)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="toolkit")
class SinusoidalPositionEncoding(keras.layers.Layer):
    """Fixed sine/cosine position encoding, returned for the caller to add.

    For position p and feature index i of a D-dimensional model:

    `PE[p, 2i] = sin(p / max_wavelength^(2i / D))`,
    `PE[p, 2i + 1] = cos(p / max_wavelength^(2i / D))`.

    Following the keras-hub convention, the layer returns the encodings broadcast to the
    input's shape (B, T, D) and does **not** add them: use `x + layer(x)`. The angles are
    computed in float32 whatever the dtype policy, because positions above 256 are not exact
    in bfloat16; only the result is cast to the compute dtype.

    Args:
        max_wavelength: float. The longest wavelength of the sinusoids (the base of the
            geometric progression of frequencies). Defaults to `10000`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: (B, T, D) tensor; only its shape is used.
        start_index: int or scalar integer tensor. Position of the first of the T steps, for
            cached decoding where one step at position k gives row k of the full encoding.
            Defaults to `0`.

    Returns:
        (B, T, D) position encodings, in the compute dtype.

    Example:

    >>> import numpy as np
    >>> x = np.zeros((2, 5, 8), "float32")
    >>> encoding = SinusoidalPositionEncoding()
    >>> y = x + encoding(x)
    >>> step = encoding(x[:, :1], start_index=3)  # equals encoding(x)[:, 3:4]
    >>> tuple(y.shape), tuple(step.shape)
    ((2, 5, 8), (2, 1, 8))

    References:
        - [Vaswani et al., 2017. Attention Is All You Need](https://arxiv.org/abs/1706.03762)
    """

    def __init__(self, max_wavelength=10000, **kwargs):
        super().__init__(**kwargs)
        if max_wavelength <= 1:
            raise ValueError(
                f"max_wavelength must be greater than 1. Received: max_wavelength={max_wavelength}"
            )
        self.max_wavelength = max_wavelength
        self.built = True

    def call(self, inputs, start_index=0):
        shape = ops.shape(inputs)
        length, dim = shape[-2], shape[-1]
        positions = ops.cast(ops.arange(length), "float32") + ops.cast(start_index, "float32")
        # Feature pairs (2i, 2i + 1) share the frequency max_wavelength^(-2i / D).
        exponents = ops.cast(2 * (ops.arange(dim) // 2), "float32") / ops.cast(dim, "float32")
        inverse_timescales = ops.power(
            ops.cast(1.0 / self.max_wavelength, "float32"), exponents
        )  # (D,)
        # (T, 1) * (1, D) -> (T, D)
        angles = ops.expand_dims(positions, 1) * ops.expand_dims(inverse_timescales, 0)
        is_odd = ops.arange(dim) % 2 == 1
        encoding = ops.where(is_odd, ops.cos(angles), ops.sin(angles))  # (T, D)
        return ops.broadcast_to(ops.cast(encoding, self.compute_dtype), shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"max_wavelength": self.max_wavelength})
        return config
