"""Attention-based multiple-instance pooling (Ilse et al., 2018), gated or not."""

from __future__ import annotations

import keras
from keras import ops

# Finite stand-in for -inf: a fully masked bag softmaxes to a uniform row, which the mask then
# zeroes, instead of producing NaN.
_MASK_VALUE = -1e9


@keras.saving.register_keras_serializable(package="toolkit")
class GatedAttentionPooling(keras.layers.Layer):
    """Attention-based deep multiple-instance pooling of Ilse et al. (2018).

    Pools a bag of K instance embeddings h_k (the positions of a sequence, or every pixel/voxel
    of a feature map) into one vector with learned weights:

    `e_k = w^T (tanh(V h_k) * sigmoid(U h_k))` (gated) or `e_k = w^T tanh(V h_k)` (not gated),
    `a_k = softmax_k(e_k)` (in float32), `z = sum_k a_k h_k`.

    `V` and `U` map C -> `intermediate_dim` (with biases if `use_bias`), `w` maps to one logit.
    The weights `a` are the layer's native heatmap: returned with the spatial shape of the input,
    they sum to 1 over the valid positions. Dropout, when set, acts on the hidden attention
    features during training (not on `a`), so the weights always sum to 1.

    Args:
        intermediate_dim: int. Size of the hidden attention space (L in the paper).
        gated: bool. Whether to use the gated form (the sigmoid branch `U`). Defaults to `True`.
        dropout: float. Dropout rate on the hidden attention features during training.
            Defaults to `0.0`.
        use_bias: bool. Whether `V`, `U` and `w` have biases. Defaults to `True`.
        kernel_initializer: string or initializer. Defaults to `"glorot_uniform"`.
        bias_initializer: string or initializer. Defaults to `"zeros"`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: (B, K, C) instances, or a channels-last map (B, *S, C) such as (B, H, W, C) or
            (B, D, H, W, C) whose K = prod(S) positions are the instances.
        mask: optional boolean (B, K) or (B, *S), True = valid instance. Masked positions get
            weight 0; a fully masked bag gives a zero vector and zero weights.
        training: bool. Whether dropout is active.
        return_attention_scores: bool. Whether to also return the weights.

    Returns:
        The pooled vector (B, C), or `(pooled, weights)` with weights (B, K) or (B, *S) (the
        input's shape without channels) when `return_attention_scores=True`.

    Example:

    >>> import numpy as np
    >>> pool = GatedAttentionPooling(intermediate_dim=16)
    >>> feature_map = np.random.rand(2, 4, 6, 5, 8).astype("float32")
    >>> pooled, weights = pool(feature_map, return_attention_scores=True)
    >>> tuple(pooled.shape), tuple(weights.shape)
    ((2, 8), (2, 4, 6, 5))

    References:
        - [Ilse et al., 2018. Attention-based Deep Multiple Instance
          Learning](https://arxiv.org/abs/1802.04712)
    """

    def __init__(
        self,
        intermediate_dim,
        gated=True,
        dropout=0.0,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(intermediate_dim, int) or intermediate_dim <= 0:
            raise ValueError(
                "intermediate_dim must be a positive integer. "
                f"Received: intermediate_dim={intermediate_dim}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")
        self.intermediate_dim = intermediate_dim
        self.gated = bool(gated)
        self.dropout = dropout
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.supports_masking = True

        def dense(units, activation, name):
            return keras.layers.Dense(
                units,
                activation=activation,
                use_bias=use_bias,
                kernel_initializer=self.kernel_initializer,
                bias_initializer=self.bias_initializer,
                dtype=self.dtype_policy,
                name=name,
            )

        self._attention_v = dense(intermediate_dim, "tanh", "attention_v")
        self._attention_u = dense(intermediate_dim, "sigmoid", "attention_u") if gated else None
        self._attention_w = dense(1, None, "attention_w")
        self._dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, inputs_shape):
        if len(inputs_shape) < 3 or inputs_shape[-1] is None:
            raise ValueError(
                "GatedAttentionPooling expects (B, K, C) or (B, *S, C) with a known C. "
                f"Received: inputs_shape={inputs_shape}"
            )
        instance_shape = (None, None, inputs_shape[-1])
        self._attention_v.build(instance_shape)
        if self._attention_u is not None:
            self._attention_u.build(instance_shape)
        self._attention_w.build((None, None, self.intermediate_dim))
        self.built = True

    def call(self, inputs, mask=None, training=None, return_attention_scores=False):
        spatial_shape = ops.shape(inputs)[:-1]  # (B, *S) or (B, K)
        channels = inputs.shape[-1]
        x = ops.reshape(inputs, (ops.shape(inputs)[0], -1, channels))  # (B, *S, C) -> (B, K, C)
        hidden = self._attention_v(x)  # (B, K, C) -> (B, K, L)
        if self._attention_u is not None:
            hidden = hidden * self._attention_u(x)
        hidden = self._dropout_layer(hidden, training=training)
        logits = ops.squeeze(self._attention_w(hidden), axis=-1)  # (B, K, 1) -> (B, K)
        logits = ops.cast(logits, "float32")
        if mask is not None:
            mask = ops.reshape(ops.cast(mask, "bool"), ops.shape(logits))  # (B, *S) -> (B, K)
            logits = ops.where(mask, logits, _MASK_VALUE)
        weights = ops.softmax(logits, axis=-1)
        if mask is not None:
            weights = ops.where(mask, weights, 0.0)
        weights = ops.cast(weights, x.dtype)
        pooled = ops.einsum("bk,bkc->bc", weights, x)  # (B, K) x (B, K, C) -> (B, C)
        if return_attention_scores:
            return pooled, ops.reshape(weights, spatial_shape)  # (B, K) -> (B, *S)
        return pooled

    def compute_mask(self, inputs, mask=None):
        # The instance axis is pooled away: nothing left to mask.
        return None

    def compute_output_shape(self, inputs_shape):
        return (inputs_shape[0], inputs_shape[-1])

    def compute_output_spec(self, inputs, mask=None, training=None, return_attention_scores=False):
        pooled = keras.KerasTensor((inputs.shape[0], inputs.shape[-1]), dtype=self.compute_dtype)
        if not return_attention_scores:
            return pooled
        return pooled, keras.KerasTensor(inputs.shape[:-1], dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "gated": self.gated,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
