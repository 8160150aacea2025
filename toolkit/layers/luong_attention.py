"""Multiplicative (Luong) global attention with the dot, general and concat scores."""

from __future__ import annotations

import keras
from keras import ops

from toolkit.layers.bahdanau_attention import (
    attend,
    combine_sequence_masks,
    sequence_attention_output_spec,
)

_SCORE_MODES = ("dot", "general", "concat")


@keras.saving.register_keras_serializable(package="toolkit")
class LuongAttention(keras.layers.Layer):
    """Global attention of Luong et al. (2015) with its three score functions.

    For a query q_t and keys k_s the score is one of

    - `"dot"`: `e[t, s] = q_t . k_s` (requires Dq == Dk; no weights);
    - `"general"`: `e[t, s] = q_t W_a k_s` with W_a of shape (Dq, Dk);
    - `"concat"`: `e[t, s] = v_a^T tanh(W_a [q_t; k_s])`, computed as
      `v_a^T tanh(W_q q_t + W_k k_s)` (the same thing, without materialising the
      concatenation for every (t, s) pair);

    then `a[t, :] = softmax(e[t, :])` (in float32) and the context `c_t = sum_s a[t, s] v_s`.
    The scores are not scaled, as in the paper. The paper's attentional hidden state
    `tanh(W_c [c_t; h_t])` and its local (windowed) variant belong to the decoder model and are
    not part of this layer.

    For `"general"` the query is projected (`q_t W_a`) rather than the keys, so one decoder step
    (T = 1) costs O(Dq * Dk + S * Dk) with nothing to precompute.

    Args:
        score_mode: string. One of `"dot"`, `"general"` or `"concat"`. Defaults to `"dot"`.
        units: int or `None`. Hidden size of the `"concat"` score (rows of W_a). Defaults to
            `None`, which uses the query's feature size Dq. Ignored by the other scores.
        kernel_initializer: string or initializer. Initializer of W_a and v_a. Defaults to
            `"glorot_uniform"`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        query: (B, T, Dq) queries (decoder states).
        value: (B, S, Dv) values (encoder outputs).
        key: optional (B, S, Dk) keys. Defaults to `value`.
        query_mask: optional boolean (B, T), True = real position. Masked query rows output
            zeros and zero weights.
        value_mask: optional boolean (B, S), True = attend. Rows with every key masked output
            zeros (not NaN).
        return_attention_scores: bool. Whether to also return the attention weights.

    Returns:
        The context (B, T, Dv), or `(context, weights)` with weights (B, T, S) when
        `return_attention_scores=True`.

    Example:

    >>> import numpy as np
    >>> layer = LuongAttention(score_mode="general")
    >>> decoder_states = np.random.rand(2, 4, 8).astype("float32")
    >>> encoder_out = np.random.rand(2, 10, 6).astype("float32")
    >>> context, weights = layer(decoder_states, encoder_out, return_attention_scores=True)
    >>> tuple(context.shape), tuple(weights.shape)
    ((2, 4, 6), (2, 4, 10))

    References:
        - [Luong et al., 2015. Effective Approaches to Attention-based Neural Machine
          Translation](https://arxiv.org/abs/1508.04025)
    """

    def __init__(self, score_mode="dot", units=None, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if score_mode not in _SCORE_MODES:
            raise ValueError(
                f"score_mode must be one of {_SCORE_MODES}. Received: score_mode={score_mode!r}"
            )
        if units is not None and (not isinstance(units, int) or units <= 0):
            raise ValueError(f"units must be a positive integer or None. Received: units={units}")
        self.score_mode = score_mode
        self.units = units
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def _dense(self, size, name):
        return keras.layers.Dense(
            size,
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            name=name,
            dtype=self.dtype_policy,
        )

    def build(self, query_shape, value_shape, key_shape=None):
        key_shape = value_shape if key_shape is None else key_shape
        query_dim, key_dim = query_shape[-1], key_shape[-1]
        if self.score_mode == "dot" and query_dim != key_dim:
            raise ValueError(
                "score_mode='dot' needs queries and keys of the same size. Received: "
                f"query feature size {query_dim}, key feature size {key_dim}"
            )
        if self.score_mode == "general":
            self.query_dense = self._dense(key_dim, "query_dense")
            self.query_dense.build(query_shape)
        elif self.score_mode == "concat":
            units = self.units or query_dim
            self.query_dense = self._dense(units, "query_dense")
            self.query_dense.build(query_shape)
            self.key_dense = self._dense(units, "key_dense")
            self.key_dense.build(key_shape)
            self.score_dense = self._dense(1, "score_dense")
            self.score_dense.build((*query_shape[:-1], units))
        self.built = True

    def _scores(self, query, key):
        if self.score_mode == "concat":
            hidden = ops.tanh(
                ops.expand_dims(self.query_dense(query), axis=2)  # (B, T, U) -> (B, T, 1, U)
                + ops.expand_dims(self.key_dense(key), axis=1)  # (B, S, U) -> (B, 1, S, U)
            )  # (B, T, S, U)
            return ops.squeeze(self.score_dense(hidden), axis=-1)  # (B, T, S, 1) -> (B, T, S)
        if self.score_mode == "general":
            query = self.query_dense(query)  # (B, T, Dq) -> (B, T, Dk)
        # (B, T, Dk) @ (B, Dk, S) -> (B, T, S)
        return ops.matmul(query, ops.transpose(key, (0, 2, 1)))

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        return_attention_scores=False,
    ):
        scores = self._scores(query, value if key is None else key)
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
        return_attention_scores=False,
    ):
        return sequence_attention_output_spec(self, query, value, return_attention_scores)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "score_mode": self.score_mode,
                "units": self.units,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
