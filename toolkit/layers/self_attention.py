"""Single-head self-attention with learned projections (query = key = value = the input)."""

from __future__ import annotations

import keras

from toolkit.layers.multi_head_attention import MultiHeadAttention
from toolkit.ops.attention import IMPLEMENTATIONS


@keras.saving.register_keras_serializable(package="toolkit")
class SelfAttention(keras.layers.Layer):
    """Single-head self-attention: a sequence attends to itself.

    For inputs x (B, T, D) it computes `q = x W_q`, `k = x W_k`, `v = x W_v` (each D -> key_dim),
    `a = softmax(q k^T / sqrt(key_dim))` in float32 and `y = (a v) W_o` (key_dim -> D), so the
    output has the input's shape and can be added back as a residual.

    Why projections: without them the scores `x_t . x_s` are symmetric and each position mostly
    attends to itself, which is rarely what a model wants; the projection-free operation is
    `ScaledDotProductAttention` called as `layer(x, x)`. For several heads, grouped-query heads or
    a decoding cache use `MultiHeadAttention`; this layer is `MultiHeadAttention` with one head
    whose weights are returned as (B, T, T).

    Masks are boolean, True = attend. `padding_mask` (B, T) hides padded keys and zeroes the
    output and weights of padded queries; `attention_mask` (B, T, T) is combined with it by
    logical AND. With `use_causal_mask=True` position t only attends to positions <= t; with
    `sliding_window=W` only to the last W positions (implies causality).

    Args:
        key_dim: int or `None`. Size of the query/key/value projections. Defaults to `None`,
            meaning D.
        use_causal_mask: bool. Whether each position only attends to earlier ones. Defaults to
            `False`.
        dropout: float. Dropout rate on the attention weights during training. Defaults to `0.0`.
        use_bias: bool. Whether the projections have biases. Defaults to `True`.
        sliding_window: int or `None`. Causal local attention over the last W positions.
            Defaults to `None`.
        attention_implementation: string. `"auto"`, `"explicit"`, `"fused"` or `"chunked"`.
            Defaults to `"auto"`.
        seed: int or `None`. Seed of the dropout. Defaults to `None`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: (B, T, D) tensor.
        padding_mask: optional boolean (B, T), True = real position.
        attention_mask: optional boolean (B, T, T), True = attend.
        training: bool or `None`. Whether dropout is active.
        return_attention_scores: bool. Whether to also return the weights. Defaults to `False`.

    Returns:
        The output (B, T, D), or `(output, weights)` with weights (B, T, T).

    Example:

    >>> import numpy as np
    >>> layer = SelfAttention(key_dim=16, use_causal_mask=True)
    >>> x = np.random.rand(2, 5, 8).astype("float32")
    >>> y, w = layer(x, return_attention_scores=True)
    >>> tuple(y.shape), tuple(w.shape)
    ((2, 5, 8), (2, 5, 5))

    References:
        - [Vaswani et al., 2017. Attention Is All You Need](https://arxiv.org/abs/1706.03762)
    """

    def __init__(
        self,
        key_dim=None,
        use_causal_mask=False,
        dropout=0.0,
        use_bias=True,
        sliding_window=None,
        attention_implementation="auto",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if key_dim is not None and (
            isinstance(key_dim, bool) or not isinstance(key_dim, int) or key_dim < 1
        ):
            raise ValueError(
                f"key_dim must be a positive int or None. Received: key_dim={key_dim!r}"
            )
        if attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation must be one of {IMPLEMENTATIONS}. "
                f"Received: attention_implementation={attention_implementation!r}"
            )
        self.key_dim = key_dim
        self.use_causal_mask = use_causal_mask
        self.dropout = dropout
        self.use_bias = use_bias
        self.sliding_window = sliding_window
        self.attention_implementation = attention_implementation
        self.seed = seed
        self.attention = None

    def build(self, inputs_shape):
        model_dim = inputs_shape[-1]
        self.attention = MultiHeadAttention(
            num_heads=1,
            key_dim=self.key_dim or model_dim,
            dropout=self.dropout,
            use_bias=self.use_bias,
            output_dim=model_dim,
            sliding_window=self.sliding_window,
            attention_implementation=self.attention_implementation,
            seed=self.seed,
            name="attention",
            dtype=self.dtype_policy,
        )
        self.attention.build(inputs_shape, inputs_shape)
        self.built = True

    def call(
        self,
        inputs,
        padding_mask=None,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
    ):
        result = self.attention(
            inputs,
            inputs,
            query_mask=padding_mask,
            value_mask=padding_mask,
            attention_mask=attention_mask,
            use_causal_mask=self.use_causal_mask,
            training=training,
            return_attention_scores=return_attention_scores,
        )
        if not return_attention_scores:
            return result
        output, weights = result
        return output, weights[:, 0]  # (B, 1, T, T) -> (B, T, T)

    def compute_output_shape(self, inputs_shape, *args, **kwargs):
        return tuple(inputs_shape)

    def compute_output_spec(self, inputs, *args, return_attention_scores=False, **kwargs):
        output = keras.KerasTensor(inputs.shape, self.compute_dtype)
        if not return_attention_scores:
            return output
        weights = keras.KerasTensor(
            (inputs.shape[0], inputs.shape[1], inputs.shape[1]), self.compute_dtype
        )
        return output, weights

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "key_dim": self.key_dim,
                "use_causal_mask": self.use_causal_mask,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "sliding_window": self.sliding_window,
                "attention_implementation": self.attention_implementation,
                "seed": self.seed,
            }
        )
        return config
