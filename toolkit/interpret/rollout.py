"""Attention rollout (Abnar & Zuidema, 2020) over the layers of a Transformer."""

from __future__ import annotations

import numpy as np
from keras import ops

_HEAD_FUSIONS = ("mean", "max", "min")


def attention_rollout(weights_list, head_fusion="mean", add_residual=True):
    """Joint attention from the input tokens to every layer's output, by attention rollout.

    Each layer l gives attention weights W_l (B, N, T, T) (heads fused by `head_fusion`) or
    (B, T, T). With `add_residual=True` the residual connection is accounted for as in the paper,
    `A_l = 0.5 W_l + 0.5 I`, and each row is renormalised to sum to 1 (rows of zeros, such as
    fully masked queries, become identity rows). The rollout is the product

    `R = A_L A_(L-1) ... A_1`,

    so `R[b, i, j]` is how much output token i of the last layer draws on input token j. For a
    class-token model, `R[:, 0, 1:]` reshaped to the patch grid is the usual heatmap. With
    `add_residual=False` the raw (fused) weights are multiplied as they are.

    Works on NumPy arrays and on backend tensors through `keras.ops`; computes in float32.

    Args:
        weights_list: list of per-layer attention weights, first layer first, each
            (B, N, T, T) or (B, T, T), all with the same B and T.
        head_fusion: string. How to merge the N heads: `"mean"`, `"max"` or `"min"`. Defaults
            to `"mean"`.
        add_residual: bool. Whether to add the identity for the residual connections and
            renormalise the rows. Defaults to `True`.

    Returns:
        The joint attention (B, T, T) in float32: a NumPy array when every element of
        `weights_list` is a NumPy array, otherwise a tensor.

    Example:

    >>> import numpy as np
    >>> layers = [np.full((1, 2, 3, 3), 1.0 / 3.0, "float32") for _ in range(4)]
    >>> attention_rollout(layers).shape
    (1, 3, 3)

    References:
        - [Abnar & Zuidema, 2020. Quantifying Attention Flow in
          Transformers](https://arxiv.org/abs/2005.00928)
    """
    if head_fusion not in _HEAD_FUSIONS:
        raise ValueError(
            f"head_fusion must be one of {_HEAD_FUSIONS}. Received: head_fusion={head_fusion!r}"
        )
    weights_list = list(weights_list)
    if not weights_list:
        raise ValueError("weights_list must hold the weights of at least one layer.")
    as_numpy = all(isinstance(w, np.ndarray) for w in weights_list)
    rollout = None
    expected = None
    for index, weights in enumerate(weights_list):
        weights = ops.cast(ops.convert_to_tensor(weights), "float32")
        shape = tuple(weights.shape)
        if len(shape) == 4:
            reduce = {"mean": ops.mean, "max": ops.max, "min": ops.min}[head_fusion]
            weights = reduce(weights, axis=1)  # (B, N, T, T) -> (B, T, T)
        elif len(shape) != 3:
            raise ValueError(
                "Each attention weight must be (B, N, T, T) or (B, T, T). "
                f"Received: shape {shape} for layer {index}"
            )
        square = tuple(weights.shape)
        if square[-1] != square[-2] or (expected is not None and square != expected):
            raise ValueError(
                "Every layer's weights must be square self-attention (B, T, T) with the same B "
                f"and T. Received: shape {shape} for layer {index}"
            )
        expected = square
        if add_residual:
            weights = 0.5 * weights + 0.5 * ops.eye(square[-1], dtype="float32")
            row_sum = ops.sum(weights, axis=-1, keepdims=True)
            weights = weights / ops.maximum(row_sum, 1e-12)
        # (B, T, T) @ (B, T, T) -> (B, T, T): later layers multiply from the left.
        rollout = weights if rollout is None else ops.matmul(weights, rollout)
    return ops.convert_to_numpy(rollout) if as_numpy else rollout
