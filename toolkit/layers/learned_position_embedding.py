"""Learned absolute position embedding (BERT/GPT style)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="toolkit")
class LearnedPositionEmbedding(keras.layers.Layer):
    """A trainable vector per position, returned for the caller to add.

    Holds a (sequence_length, D) table P and returns `P[start_index : start_index + T]` broadcast
    to the input's shape (B, T, D). Following the keras-hub convention the embeddings are **not**
    added to the input: use `x + layer(x)`.

    Args:
        sequence_length: int. The largest number of positions (rows of the table). Inputs with
            `start_index + T > sequence_length` are an error.
        initializer: string or initializer. Initializer of the table. Defaults to
            `"glorot_uniform"`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: (B, T, D) tensor; only its shape is used (D fixes the table width at build).
        start_index: int or scalar integer tensor. Position of the first of the T steps, for
            cached decoding. Defaults to `0`.

    Returns:
        (B, T, D) position embeddings, in the compute dtype.

    Example:

    >>> import numpy as np
    >>> x = np.zeros((2, 5, 8), "float32")
    >>> embedding = LearnedPositionEmbedding(sequence_length=64)
    >>> y = x + embedding(x)
    >>> step = embedding(x[:, :1], start_index=3)  # equals embedding(x)[:, 3:4]
    >>> tuple(y.shape), tuple(step.shape)
    ((2, 5, 8), (2, 1, 8))

    References:
        - [Devlin et al., 2019. BERT: Pre-training of Deep Bidirectional Transformers for
          Language Understanding](https://arxiv.org/abs/1810.04805)
    """

    def __init__(self, sequence_length, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(sequence_length, int) or sequence_length <= 0:
            raise ValueError(
                "sequence_length must be a positive integer. "
                f"Received: sequence_length={sequence_length}"
            )
        self.sequence_length = sequence_length
        self.initializer = keras.initializers.get(initializer)

    def build(self, inputs_shape):
        dim = inputs_shape[-1]
        if dim is None:
            raise ValueError(
                f"The last axis of the input must be known. Received: input shape={inputs_shape}"
            )
        self.position_embeddings = self.add_weight(
            name="position_embeddings",
            shape=(self.sequence_length, dim),
            initializer=self.initializer,
            trainable=True,
        )
        self.built = True

    def call(self, inputs, start_index=0):
        shape = ops.shape(inputs)
        length, dim = shape[-2], shape[-1]
        if (
            isinstance(length, int)
            and isinstance(start_index, int)
            and start_index + length > self.sequence_length
        ):
            raise ValueError(
                f"start_index + T must be at most sequence_length={self.sequence_length}. "
                f"Received: start_index={start_index}, T={length}"
            )
        table = ops.cast(self.position_embeddings, self.compute_dtype)
        rows = ops.slice(table, (start_index, 0), (length, dim))  # (T, D)
        return ops.broadcast_to(rows, shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sequence_length": self.sequence_length,
                "initializer": keras.initializers.serialize(self.initializer),
            }
        )
        return config
