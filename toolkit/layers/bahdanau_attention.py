"""Additive (Bahdanau) attention with learned query and key projections."""

from __future__ import annotations

import keras
from keras import ops

# Finite stand-in for -inf: a fully masked row then softmaxes to a uniform row, which the mask
# zeroes afterwards, instead of producing NaN from exp(-inf - -inf).
_MASK_VALUE = -1e9


def combine_sequence_masks(query_mask=None, value_mask=None):
    """Combines (B, T) and (B, S) boolean padding masks into one (B, T, S) mask, or `None`."""
    mask = None
    if value_mask is not None:
        mask = ops.expand_dims(ops.cast(value_mask, "bool"), axis=1)  # (B, S) -> (B, 1, S)
    if query_mask is not None:
        q = ops.expand_dims(ops.cast(query_mask, "bool"), axis=-1)  # (B, T) -> (B, T, 1)
        mask = q if mask is None else ops.logical_and(q, mask)
    return mask


def attend(scores, value, mask=None):
    """Softmax over the keys in float32, then the weighted sum of the values.

    Args:
        scores: (B, T, S) attention logits.
        value: (B, S, Dv) values.
        mask: optional boolean mask broadcastable to (B, T, S), True = attend.

    Returns:
        `(context, weights)`: context (B, T, Dv) and weights (B, T, S), both in the dtype of
        `value`. Rows with no key to attend to get zero weights and a zero context.
    """
    scores = ops.cast(scores, "float32")
    if mask is not None:
        scores = ops.where(mask, scores, _MASK_VALUE)
    weights = ops.softmax(scores, axis=-1)
    if mask is not None:
        weights = ops.where(mask, weights, 0.0)
    weights = ops.cast(weights, value.dtype)
    context = ops.matmul(weights, value)  # (B, T, S) @ (B, S, Dv) -> (B, T, Dv)
    return context, weights


def sequence_attention_output_spec(layer, query, value, return_attention_scores):
    """Output spec shared by the sequence attention layers (context, optional weights)."""
    context = keras.KerasTensor((*query.shape[:-1], value.shape[-1]), dtype=layer.compute_dtype)
    if not return_attention_scores:
        return context
    weights = keras.KerasTensor(
        (query.shape[0], query.shape[1], value.shape[1]), dtype=layer.compute_dtype
    )
    return context, weights


@keras.saving.register_keras_serializable(package="toolkit")
class BahdanauAttention(keras.layers.Layer):
    """Additive attention of Bahdanau et al. (2015), with its projections.

    Each query position t attends over the key positions s with the additive score

    `e[t, s] = v^T tanh(W_q q_t + W_k k_s (+ b))`,

    followed by `a[t, :] = softmax(e[t, :])` (in float32) and the context
    `c_t = sum_s a[t, s] v_s`. `W_q` (Dq -> units), `W_k` (Dk -> units) and `v` (units -> 1) are
    learned; Keras' `AdditiveAttention` has no projections and requires Dq == Dk.

    Efficient decoding: the key projection `W_k k` depends only on the encoder output, so an RNN
    decoder that calls this layer once per step (T = 1) should project the keys once per
    utterance with `project_keys(key)` and pass the result as `projected_key=` at every step;
    each step then costs O(S * units) instead of O(S * Dk * units).

    Args:
        units: int. Size of the hidden layer of the score (the rows of `W_q` and `W_k`).
        use_bias: bool. Whether to add a learned bias `b` inside the `tanh`. Defaults to `False`
            (the paper's formula).
        kernel_initializer: string or initializer. Initializer of `W_q`, `W_k` and `v`.
            Defaults to `"glorot_uniform"`.
        bias_initializer: string or initializer. Initializer of `b`. Defaults to `"zeros"`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        query: (B, T, Dq) queries, e.g. decoder states (T = 1 for one RNN decoder step).
        value: (B, S, Dv) values, e.g. encoder outputs.
        key: optional (B, S, Dk) keys. Defaults to `value`.
        query_mask: optional boolean (B, T), True = real position. Masked query rows output
            zeros and zero weights.
        value_mask: optional boolean (B, S), True = attend. Rows with every key masked output
            zeros (not NaN).
        projected_key: optional (B, S, units), the result of `project_keys(key)`. When given,
            `key` is not projected again.
        return_attention_scores: bool. Whether to also return the attention weights.

    Returns:
        The context (B, T, Dv), or `(context, weights)` with weights (B, T, S) when
        `return_attention_scores=True`.

    Example:

    >>> import numpy as np
    >>> layer = BahdanauAttention(units=16)
    >>> decoder_state = np.random.rand(2, 1, 8).astype("float32")
    >>> encoder_out = np.random.rand(2, 10, 12).astype("float32")
    >>> keys = layer.project_keys(encoder_out)  # once per utterance
    >>> context, weights = layer(
    ...     decoder_state, encoder_out, projected_key=keys, return_attention_scores=True
    ... )
    >>> tuple(context.shape), tuple(weights.shape)
    ((2, 1, 12), (2, 1, 10))

    References:
        - [Bahdanau et al., 2015. Neural Machine Translation by Jointly Learning to Align and
          Translate](https://arxiv.org/abs/1409.0473)
    """

    def __init__(
        self,
        units,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(units, int) or units <= 0:
            raise ValueError(f"units must be a positive integer. Received: units={units}")
        self.units = units
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.query_dense = keras.layers.Dense(
            units,
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            name="query_dense",
            dtype=self.dtype_policy,
        )
        self.key_dense = keras.layers.Dense(
            units,
            use_bias=use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            name="key_dense",
            dtype=self.dtype_policy,
        )
        self.score_dense = keras.layers.Dense(
            1,
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            name="score_dense",
            dtype=self.dtype_policy,
        )

    def build(self, query_shape, value_shape, key_shape=None):
        key_shape = value_shape if key_shape is None else key_shape
        if not self.query_dense.built:
            self.query_dense.build(query_shape)
        if not self.key_dense.built:
            self.key_dense.build(key_shape)
        if not self.score_dense.built:
            self.score_dense.build((*query_shape[:-1], self.units))
        self.built = True

    def project_keys(self, key):
        """Projects the keys once: (B, S, Dk) -> (B, S, units), to pass as `projected_key=`."""
        return self.key_dense(key)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        projected_key=None,
        return_attention_scores=False,
    ):
        if projected_key is None:
            projected_key = self.key_dense(value if key is None else key)
        projected_query = self.query_dense(query)
        hidden = ops.tanh(
            ops.expand_dims(projected_query, axis=2)  # (B, T, U) -> (B, T, 1, U)
            + ops.expand_dims(projected_key, axis=1)  # (B, S, U) -> (B, 1, S, U)
        )  # (B, T, S, U)
        scores = ops.squeeze(self.score_dense(hidden), axis=-1)  # (B, T, S, 1) -> (B, T, S)
        mask = combine_sequence_masks(query_mask, value_mask)
        context, weights = attend(scores, value, mask)
        if return_attention_scores:
            return context, weights
        return context

    def compute_output_shape(self, query_shape, value_shape, key_shape=None):
        return (*query_shape[:-1], value_shape[-1])

    def compute_output_spec(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        projected_key=None,
        return_attention_scores=False,
    ):
        return sequence_attention_output_spec(self, query, value, return_attention_scores)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
