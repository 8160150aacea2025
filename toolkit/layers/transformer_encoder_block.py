"""Transformer encoder block: self-attention and feed-forward with residuals and LayerNorm."""

from __future__ import annotations

import keras

from toolkit.layers.feed_forward import FeedForward
from toolkit.layers.multi_head_attention import MultiHeadAttention


def _check_block_arguments(num_heads, key_dim, intermediate_dim, num_key_value_heads, dropout):
    for name, value in (
        ("num_heads", num_heads),
        ("key_dim", key_dim),
        ("intermediate_dim", intermediate_dim),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer. Received: {name}={value}")
    if num_key_value_heads is not None and (
        not isinstance(num_key_value_heads, int)
        or num_key_value_heads <= 0
        or num_heads % num_key_value_heads
    ):
        raise ValueError(
            "num_key_value_heads must be a positive divisor of num_heads. "
            f"Received: num_key_value_heads={num_key_value_heads}, num_heads={num_heads}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")


@keras.saving.register_keras_serializable(package="toolkit")
class TransformerEncoderBlock(keras.layers.Layer):
    """One Transformer encoder layer: multi-head self-attention, then a feed-forward network.

    Pre-norm (`normalize_first=True`, the default; stable without learning-rate warm-up):

    `x = x + Dropout(MHA(LN(x)))`, then `x = x + Dropout(FFN(LN(x)))`.

    Post-norm (`normalize_first=False`, Vaswani et al.):

    `x = LN(x + Dropout(MHA(x)))`, then `x = LN(x + Dropout(FFN(x)))`.

    A stack of pre-norm blocks needs one final LayerNorm after the last block; that belongs to
    the model. The attention is `toolkit.layers.MultiHeadAttention` (grouped-query attention
    with `num_key_value_heads`, optional sliding window); its output has the input's width D.

    Args:
        num_heads: int. Number of attention heads N.
        key_dim: int. Size H of each query/key/value head.
        intermediate_dim: int. Hidden width of the feed-forward network.
        num_key_value_heads: int or `None`. Number of key/value heads for grouped-query
            attention; must divide `num_heads`. Defaults to `None` (= `num_heads`).
        dropout: float. Rate of the attention-probability dropout and of the dropout on both
            residual branches. Defaults to `0.0`.
        activation: string. Feed-forward activation: `"gelu"`, `"relu"` or `"swiglu"`.
            Defaults to `"gelu"`.
        normalize_first: bool. Pre-norm if `True`, post-norm if `False`. Defaults to `True`.
        layer_norm_epsilon: float. Epsilon of the layer normalisations. Defaults to `1e-5`.
        use_bias: bool. Whether the attention and feed-forward projections have biases.
            Defaults to `True`.
        sliding_window: int or `None`. If set, each position attends only to keys within this
            distance (see `MultiHeadAttention`). Defaults to `None`.
        attention_implementation: string. `"auto"`, `"explicit"`, `"fused"` or `"chunked"`,
            passed to `MultiHeadAttention`. Defaults to `"auto"`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: (B, T, D) sequence.
        padding_mask: optional boolean (B, T), True = real position. Padded positions are
            neither attended to nor attend (their attention output is zero).
        attention_mask: optional boolean (B, T, T), True = attend; combined with the padding
            mask by logical AND.
        training: bool. Whether dropout is active.
        return_attention_scores: bool. Whether to also return the attention weights.

    Returns:
        The output (B, T, D), or `(output, weights)` with weights (B, N, T, T) when
        `return_attention_scores=True`.

    Example:

    >>> import numpy as np
    >>> block = TransformerEncoderBlock(num_heads=4, key_dim=8, intermediate_dim=64)
    >>> x = np.random.rand(2, 10, 32).astype("float32")
    >>> mask = np.arange(10)[None, :] < np.array([[10], [6]])
    >>> y, weights = block(x, padding_mask=mask, return_attention_scores=True)
    >>> tuple(y.shape), tuple(weights.shape)
    ((2, 10, 32), (2, 4, 10, 10))

    References:
        - [Vaswani et al., 2017. Attention Is All You Need](https://arxiv.org/abs/1706.03762)
        - [Xiong et al., 2020. On Layer Normalization in the Transformer
          Architecture](https://arxiv.org/abs/2002.04745)
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        intermediate_dim,
        num_key_value_heads=None,
        dropout=0.0,
        activation="gelu",
        normalize_first=True,
        layer_norm_epsilon=1e-5,
        use_bias=True,
        sliding_window=None,
        attention_implementation="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_block_arguments(num_heads, key_dim, intermediate_dim, num_key_value_heads, dropout)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.intermediate_dim = intermediate_dim
        self.num_key_value_heads = num_key_value_heads
        self.dropout = dropout
        self.activation = activation
        self.normalize_first = normalize_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_bias = use_bias
        self.sliding_window = sliding_window
        self.attention_implementation = attention_implementation
        self.self_attention = MultiHeadAttention(
            num_heads=num_heads,
            key_dim=key_dim,
            num_key_value_heads=num_key_value_heads,
            dropout=dropout,
            use_bias=use_bias,
            sliding_window=sliding_window,
            attention_implementation=attention_implementation,
            name="self_attention",
            dtype=self.dtype_policy,
        )
        self.self_attention_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="self_attention_norm", dtype=self.dtype_policy
        )
        self.self_attention_dropout = keras.layers.Dropout(
            dropout, name="self_attention_dropout", dtype=self.dtype_policy
        )
        self.feed_forward = FeedForward(
            intermediate_dim,
            activation=activation,
            use_bias=use_bias,
            name="feed_forward",
            dtype=self.dtype_policy,
        )
        self.feed_forward_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="feed_forward_norm", dtype=self.dtype_policy
        )
        self.feed_forward_dropout = keras.layers.Dropout(
            dropout, name="feed_forward_dropout", dtype=self.dtype_policy
        )

    def build(self, inputs_shape):
        self.self_attention.build(inputs_shape, inputs_shape)
        self.self_attention_norm.build(inputs_shape)
        self.feed_forward.build(inputs_shape)
        self.feed_forward_norm.build(inputs_shape)
        self.built = True

    def call(
        self,
        inputs,
        padding_mask=None,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
    ):
        x = inputs
        residual = x
        if self.normalize_first:
            x = self.self_attention_norm(x)
        attended = self.self_attention(
            x,
            x,
            query_mask=padding_mask,
            value_mask=padding_mask,
            attention_mask=attention_mask,
            training=training,
            return_attention_scores=return_attention_scores,
        )
        weights = None
        if return_attention_scores:
            attended, weights = attended
        x = residual + self.self_attention_dropout(attended, training=training)
        if not self.normalize_first:
            x = self.self_attention_norm(x)

        residual = x
        if self.normalize_first:
            x = self.feed_forward_norm(x)
        x = residual + self.feed_forward_dropout(self.feed_forward(x), training=training)
        if not self.normalize_first:
            x = self.feed_forward_norm(x)
        if return_attention_scores:
            return x, weights
        return x

    def compute_output_shape(self, inputs_shape):
        return tuple(inputs_shape)

    def compute_output_spec(
        self,
        inputs,
        padding_mask=None,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
    ):
        output = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        if not return_attention_scores:
            return output
        batch, length = inputs.shape[0], inputs.shape[1]
        weights = keras.KerasTensor(
            (batch, self.num_heads, length, length), dtype=self.compute_dtype
        )
        return output, weights

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_key_value_heads": self.num_key_value_heads,
                "dropout": self.dropout,
                "activation": self.activation,
                "normalize_first": self.normalize_first,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "use_bias": self.use_bias,
                "sliding_window": self.sliding_window,
                "attention_implementation": self.attention_implementation,
            }
        )
        return config
