"""Position-wise feed-forward network of a Transformer block (GELU, ReLU or SwiGLU)."""

from __future__ import annotations

import keras
from keras import ops

_ACTIVATIONS = ("gelu", "relu", "swiglu")


@keras.saving.register_keras_serializable(package="toolkit")
class FeedForward(keras.layers.Layer):
    """Two-layer position-wise feed-forward network, optionally gated (SwiGLU).

    Applied independently at every position of x (B, T, D):

    - `"gelu"` / `"relu"`: `FFN(x) = act(x W1 + b1) W3 + b3` (exact erf GELU);
    - `"swiglu"`: `FFN(x) = ((x W1 + b1) * swish(x W2 + b2)) W3 + b3`, where
      `swish(z) = z * sigmoid(z)`; this has one extra (D, intermediate_dim) matrix, so
      LLaMA-style models use about 2/3 of the usual intermediate size for the same parameters.

    Dropout, when enabled, acts on the hidden activations (before W3). The residual connection,
    normalisation and output dropout belong to the enclosing block.

    Args:
        intermediate_dim: int. Width of the hidden layer.
        activation: string. One of `"gelu"`, `"relu"` or `"swiglu"`. Defaults to `"gelu"`.
        dropout: float. Dropout rate on the hidden activations. Defaults to `0.0`.
        output_dim: int or `None`. Output width. Defaults to `None`: the input's width D.
        use_bias: bool. Whether the dense layers have biases. Defaults to `True`.
        kernel_initializer: string or initializer. Defaults to `"glorot_uniform"`.
        bias_initializer: string or initializer. Defaults to `"zeros"`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: (B, T, D) tensor (any rank works: the dense layers act on the last axis).
        training: bool. Whether dropout is active.

    Returns:
        (B, T, output_dim or D) tensor.

    Example:

    >>> import numpy as np
    >>> ffn = FeedForward(intermediate_dim=32, activation="swiglu")
    >>> tuple(ffn(np.random.rand(2, 5, 8).astype("float32")).shape)
    (2, 5, 8)

    References:
        - [Vaswani et al., 2017. Attention Is All You Need](https://arxiv.org/abs/1706.03762)
        - [Shazeer, 2020. GLU Variants Improve Transformer](https://arxiv.org/abs/2002.05202)
    """

    def __init__(
        self,
        intermediate_dim,
        activation="gelu",
        dropout=0.0,
        output_dim=None,
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
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {_ACTIVATIONS}. Received: activation={activation!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")
        if output_dim is not None and (not isinstance(output_dim, int) or output_dim <= 0):
            raise ValueError(
                f"output_dim must be a positive integer or None. Received: output_dim={output_dim}"
            )
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.dropout = dropout
        self.output_dim = output_dim
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.intermediate_dense = self._dense(intermediate_dim, "intermediate_dense")
        self.gate_dense = (
            self._dense(intermediate_dim, "gate_dense") if activation == "swiglu" else None
        )
        self.dropout_layer = keras.layers.Dropout(dropout, name="dropout", dtype=self.dtype_policy)
        self.output_dense = None

    def _dense(self, units, name):
        return keras.layers.Dense(
            units,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            name=name,
            dtype=self.dtype_policy,
        )

    def build(self, inputs_shape):
        self.intermediate_dense.build(inputs_shape)
        if self.gate_dense is not None:
            self.gate_dense.build(inputs_shape)
        self.output_dense = self._dense(self.output_dim or inputs_shape[-1], "output_dense")
        self.output_dense.build((*inputs_shape[:-1], self.intermediate_dim))
        self.built = True

    def call(self, inputs, training=None):
        hidden = self.intermediate_dense(inputs)  # (B, T, D) -> (B, T, I)
        if self.activation == "swiglu":
            hidden = hidden * ops.silu(self.gate_dense(inputs))
        elif self.activation == "gelu":
            hidden = ops.gelu(hidden, approximate=False)
        else:
            hidden = ops.relu(hidden)
        hidden = self.dropout_layer(hidden, training=training)
        return self.output_dense(hidden)  # (B, T, I) -> (B, T, output_dim or D)

    def compute_output_shape(self, inputs_shape):
        return (*inputs_shape[:-1], self.output_dim or inputs_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "activation": self.activation,
                "dropout": self.dropout,
                "output_dim": self.output_dim,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
