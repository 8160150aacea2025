"""SpecAugment: random time and frequency masks on spectrogram features, in training only."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="toolkit")
class SpecAugment(keras.layers.Layer):
    """Time and frequency masking of Park et al. (2019), as a layer active only in training.

    For each example, `freq_mask_count` bands of `f ~ U{0, ..., freq_mask_width}` consecutive
    feature channels starting at `f0 ~ U{0, ..., F - f}`, and `time_mask_count` spans of
    `t ~ U{0, ..., W}` consecutive frames starting at `t0 ~ U{0, ..., L - t}`, are set to
    `mask_value`, where `L` is the example's true length (from `padding_mask`, else T) and
    `W = min(time_mask_width, floor(time_mask_max_ratio * L))`. Time masks therefore stay inside
    the real frames, and padded frames are returned unchanged. With `training` false (inference)
    the layer is the identity. Only `keras.ops` and `keras.random` are used, with a
    `SeedGenerator`: runs are repeatable for a seed and the layer compiles under XLA/jit with
    static shapes.

    Args:
        freq_mask_count: int. Number of frequency masks per example. Defaults to `2`.
        freq_mask_width: int. Largest frequency mask, in channels. Defaults to `27`
            (the paper's LibriSpeech setting for 80 mel bands).
        time_mask_count: int. Number of time masks per example. Defaults to `2`.
        time_mask_width: int. Largest time mask, in frames. Defaults to `40`.
        time_mask_max_ratio: float. Largest time mask as a fraction of the example's length
            (the paper's `p`). Defaults to `1.0`.
        mask_value: float. Value of masked entries. Defaults to `0.0` (the mean of normalised
            features).
        seed: int or None. Seed of the mask positions. Defaults to `None`.
        **kwargs: base `Layer` arguments (`name`, `dtype`).

    Call arguments:
        inputs: float tensor (B, T, F): T frames of F features.
        padding_mask: optional boolean tensor (B, T), True for real frames.
        training: bool. Masks are applied only when true.

    Returns:
        Tensor (B, T, F), same dtype as `inputs`.

    Example:

    >>> layer = SpecAugment(freq_mask_width=8, time_mask_width=10, seed=0)
    >>> x = keras.ops.ones((2, 100, 80))
    >>> y = layer(x, training=True)   # some bands and spans are 0.0
    >>> z = layer(x)                  # identity at inference

    References:
        Park et al., "SpecAugment: A Simple Data Augmentation Method for Automatic Speech
        Recognition", Interspeech 2019. https://arxiv.org/abs/1904.08779
    """

    def __init__(
        self,
        freq_mask_count=2,
        freq_mask_width=27,
        time_mask_count=2,
        time_mask_width=40,
        time_mask_max_ratio=1.0,
        mask_value=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (
            ("freq_mask_count", freq_mask_count),
            ("freq_mask_width", freq_mask_width),
            ("time_mask_count", time_mask_count),
            ("time_mask_width", time_mask_width),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"{name} must be a non-negative integer. Received: {name}={value!r}"
                )
        if not 0.0 <= time_mask_max_ratio <= 1.0:
            raise ValueError(
                "time_mask_max_ratio must be in [0, 1]. "
                f"Received: time_mask_max_ratio={time_mask_max_ratio}"
            )
        self.freq_mask_count = freq_mask_count
        self.freq_mask_width = freq_mask_width
        self.time_mask_count = time_mask_count
        self.time_mask_width = time_mask_width
        self.time_mask_max_ratio = float(time_mask_max_ratio)
        self.mask_value = float(mask_value)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="spec_augment_seed")
        self.supports_masking = True

    def _span_mask(self, batch, count, size, max_width, length):
        """Boolean (B, size): the union of `count` random spans inside `[0, length)` per example.

        `max_width` and `length` are float32 tensors of shape (B,).
        """
        u = keras.random.uniform((batch, count, 2), seed=self.seed_generator)
        max_width = ops.expand_dims(max_width, -1)  # (B,) -> (B, 1)
        length = ops.expand_dims(length, -1)  # (B,) -> (B, 1)
        width = ops.minimum(ops.floor(u[..., 0] * (max_width + 1.0)), max_width)  # (B, count)
        room = ops.maximum(length - width, 0.0)
        start = ops.minimum(ops.floor(u[..., 1] * (room + 1.0)), room)  # (B, count)
        positions = ops.cast(ops.arange(size), "float32")[None, None, :]  # (1, 1, size)
        inside = ops.logical_and(
            positions >= start[..., None], positions < (start + width)[..., None]
        )  # (B, count, size)
        return ops.any(inside, axis=1)  # (B, count, size) -> (B, size)

    def call(self, inputs, padding_mask=None, training=None):
        if not training or (self.freq_mask_count == 0 and self.time_mask_count == 0):
            return inputs
        shape = ops.shape(inputs)
        batch, frames, channels = shape[0], shape[1], shape[2]
        if padding_mask is not None:
            valid = ops.cast(padding_mask, "bool")
            lengths = ops.sum(ops.cast(valid, "float32"), axis=-1)  # (B, T) -> (B,)
        else:
            valid = None
            lengths = ops.ones((batch,), "float32") * ops.cast(frames, "float32")
        masked = ops.zeros((batch, frames, channels), "bool")
        if self.time_mask_count:
            max_width = ops.minimum(
                ops.cast(self.time_mask_width, "float32"),
                ops.floor(self.time_mask_max_ratio * lengths),
            )
            time = self._span_mask(batch, self.time_mask_count, frames, max_width, lengths)
            masked = ops.logical_or(masked, time[:, :, None])  # (B, T) -> (B, T, 1)
        if self.freq_mask_count:
            size = ops.ones((batch,), "float32") * ops.cast(channels, "float32")
            max_width = ops.minimum(ops.cast(self.freq_mask_width, "float32"), size)
            freq = self._span_mask(batch, self.freq_mask_count, channels, max_width, size)
            masked = ops.logical_or(masked, freq[:, None, :])  # (B, F) -> (B, 1, F)
        if valid is not None:
            masked = ops.logical_and(masked, valid[:, :, None])  # padded frames stay as they are
        fill = ops.cast(self.mask_value, inputs.dtype)
        return ops.where(masked, fill, inputs)

    def compute_output_shape(self, inputs_shape, padding_mask_shape=None):
        return tuple(inputs_shape)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "freq_mask_count": self.freq_mask_count,
                "freq_mask_width": self.freq_mask_width,
                "time_mask_count": self.time_mask_count,
                "time_mask_width": self.time_mask_width,
                "time_mask_max_ratio": self.time_mask_max_ratio,
                "mask_value": self.mask_value,
                "seed": self.seed,
            }
        )
        return config
