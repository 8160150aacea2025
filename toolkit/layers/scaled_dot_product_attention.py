"""Scaled dot-product attention as a layer: no projections, one head."""

from __future__ import annotations

import keras
from keras import ops

from toolkit.layers.multi_head_attention import padding_and_attention_mask
from toolkit.ops.attention import IMPLEMENTATIONS, scaled_dot_product_attention


@keras.saving.register_keras_serializable(package="toolkit")
class ScaledDotProductAttention(keras.layers.Layer):
    """Scaled dot-product attention of Vaswani et al. (2017), without projections.

    The layer form of `toolkit.ops.scaled_dot_product_attention` for one head: the scores
    `e[t, s] = scale * q_t . k_s` (scale `1 / sqrt(D)` by default), the weights
    `a[t, :] = softmax(e[t, :])` in float32, and the context `c_t = sum_s a[t, s] v_s`. It has no
    weights; use `MultiHeadAttention` for learned projections and several heads.

    Masks are boolean, True = attend, combined with logical AND. Padded queries (`query_mask`)
    output zeros and zero weights; queries with no visible key output zeros, never NaN.

    Args:
        scale: float or `None`. Score scale. Defaults to `None`, meaning `1 / sqrt(D)`.
        dropout: float. Dropout rate on the weights during training. Defaults to `0.0`.
        attention_implementation: string. `"auto"`, `"explicit"`, `"fused"` or `"chunked"`, see
            `toolkit.ops.scaled_dot_product_attention`. Defaults to `"auto"`.
        seed: int or `None`. Seed of the dropout. Defaults to `None`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        query: (B, T, D) queries.
        value: (B, S, Dv) values.
        key: optional (B, S, D) keys. Defaults to `value` (then Dv == D).
        query_mask: optional boolean (B, T), True = real position.
        value_mask: optional boolean (B, S), True = attend.
        attention_mask: optional boolean (B, T, S), True = attend.
        use_causal_mask: bool. Bottom-right aligned causal mask (query t sees keys
            s <= t + S - T). Defaults to `False`.
        training: bool or `None`. Whether dropout is active.
        return_attention_scores: bool. Whether to also return the weights. Defaults to `False`.

    Returns:
        The context (B, T, Dv), or `(context, weights)` with weights (B, T, S).

    Example:

    >>> import numpy as np
    >>> layer = ScaledDotProductAttention()
    >>> q = np.random.rand(2, 4, 8).astype("float32")
    >>> v = np.random.rand(2, 6, 8).astype("float32")
    >>> context, weights = layer(q, v, return_attention_scores=True)
    >>> tuple(context.shape), tuple(weights.shape)
    ((2, 4, 8), (2, 4, 6))

    References:
        - [Vaswani et al., 2017. Attention Is All You Need](https://arxiv.org/abs/1706.03762)
    """

    def __init__(
        self, scale=None, dropout=0.0, attention_implementation="auto", seed=None, **kwargs
    ):
        super().__init__(**kwargs)
        if scale is not None and not float(scale) > 0.0:
            raise ValueError(f"scale must be positive or None. Received: scale={scale}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")
        if attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation must be one of {IMPLEMENTATIONS}. "
                f"Received: attention_implementation={attention_implementation!r}"
            )
        self.scale = scale
        self.dropout = dropout
        self.attention_implementation = attention_implementation
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        attention_mask=None,
        use_causal_mask=False,
        training=None,
        return_attention_scores=False,
    ):
        key = value if key is None else key
        mask = padding_and_attention_mask(value_mask, attention_mask)
        result = scaled_dot_product_attention(
            query[:, :, None, :],  # (B, T, D) -> (B, T, 1, D)
            key[:, :, None, :],  # (B, S, D) -> (B, S, 1, D)
            value[:, :, None, :],  # (B, S, Dv) -> (B, S, 1, Dv)
            mask=mask,
            is_causal=use_causal_mask,
            scale=self.scale,
            return_weights=return_attention_scores,
            implementation=self.attention_implementation,
            dropout_rate=self.dropout,
            training=bool(training) and self.dropout > 0.0,
            seed=self.seed_generator,
        )
        context, weights = result if return_attention_scores else (result, None)
        context = context[:, :, 0, :]  # (B, T, 1, Dv) -> (B, T, Dv)
        if query_mask is not None:
            context = context * ops.cast(query_mask, context.dtype)[:, :, None]  # (B, T, 1)
        if not return_attention_scores:
            return context
        weights = weights[:, 0]  # (B, 1, T, S) -> (B, T, S)
        if query_mask is not None:
            weights = weights * ops.cast(query_mask, weights.dtype)[:, :, None]
        return context, weights

    def compute_output_shape(self, query_shape, value_shape, key_shape=None, *args, **kwargs):
        return (*tuple(query_shape)[:-1], value_shape[-1])

    def compute_output_spec(
        self, query, value, key=None, *args, return_attention_scores=False, **kwargs
    ):
        context = keras.KerasTensor(
            self.compute_output_shape(query.shape, value.shape), self.compute_dtype
        )
        if not return_attention_scores:
            return context
        weights = keras.KerasTensor(
            (query.shape[0], query.shape[1], value.shape[1]), self.compute_dtype
        )
        return context, weights

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "scale": self.scale,
                "dropout": self.dropout,
                "attention_implementation": self.attention_implementation,
                "seed": self.seed,
            }
        )
        return config
