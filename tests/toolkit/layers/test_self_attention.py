"""Tests of the `SelfAttention` layer: shared layer checks and a NumPy reference."""

import keras
import numpy as np
import pytest
from keras import ops

from tests.layer_testing import run_layer_test
from toolkit.layers import SelfAttention


def _numpy_self_attention(layer, x, padding_mask=None, causal=False, window=None):
    """Projections, scores, softmax, weighted sum and output projection in NumPy."""
    mha = layer.attention
    w = {v.path.split("/")[-2] + "/" + v.name: ops.convert_to_numpy(v) for v in mha.weights}
    q = np.einsum("btd,dh->bth", x, w["query/kernel"][:, 0]) + w["query/bias"][0]
    k = np.einsum("btd,dh->bth", x, w["key/kernel"][:, 0]) + w["key/bias"][0]
    v = np.einsum("btd,dh->bth", x, w["value/kernel"][:, 0]) + w["value/bias"][0]
    scores = np.einsum("bth,bsh->bts", q, k) / np.sqrt(q.shape[-1])
    t = x.shape[1]
    valid = np.ones(scores.shape, bool)
    if padding_mask is not None:
        valid &= padding_mask[:, None, :]
    pos = np.arange(t)
    if causal or window:
        valid &= pos[None, :] <= pos[:, None]
    if window:
        valid &= pos[None, :] > pos[:, None] - window
    scores = np.where(valid, scores, -1e30)
    e = np.exp(scores - scores.max(-1, keepdims=True)) * valid
    weights = e / np.maximum(e.sum(-1, keepdims=True), 1e-30)
    if padding_mask is not None:
        weights = weights * padding_mask[:, :, None]
    out = np.einsum("bts,bsh->bth", weights, v)
    out = np.einsum("bth,hd->btd", out, w["attention_output/kernel"][0])
    out = out + w["attention_output/bias"]
    if padding_mask is not None:
        out = out * padding_mask[:, :, None]
    return out, weights


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=(2, 6, 8)).astype("float32")


def test_layer_checks(tmp_path):
    run_layer_test(
        SelfAttention,
        {"key_dim": 4, "use_causal_mask": True, "dropout": 0.1, "seed": 2},
        [_x()],
        expected_output_shape=(2, 6, 8),
        tmp_path=tmp_path,
    )


def test_layer_checks_with_padding_mask_and_window(tmp_path):
    mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
    run_layer_test(
        SelfAttention,
        {"sliding_window": 3, "use_bias": False, "attention_implementation": "chunked"},
        [_x(), mask],
        expected_output_shape=(2, 6, 8),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, 2)])
def test_matches_numpy(causal, window):
    x = _x(1)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
    layer = SelfAttention(key_dim=4, use_causal_mask=causal, sliding_window=window)
    out, weights = layer(x, padding_mask=mask, return_attention_scores=True)
    expected, expected_w = _numpy_self_attention(layer, x, mask, causal, window)
    assert tuple(weights.shape) == (2, 6, 6)
    np.testing.assert_allclose(ops.convert_to_numpy(weights), expected_w, atol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(out), expected, atol=1e-5)
    np.testing.assert_array_equal(ops.convert_to_numpy(out)[0, 4:], 0.0)


def test_key_dim_defaults_to_input_size():
    layer = SelfAttention()
    layer(_x())
    assert tuple(layer.attention.query_dense.kernel.shape) == (8, 1, 8)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="key_dim must be a positive int"):
        SelfAttention(key_dim=0)
    with pytest.raises(ValueError, match="attention_implementation must be one of"):
        SelfAttention(attention_implementation="nope")


def test_symbolic_shapes():
    x = keras.Input((None, 8))
    y, w = SelfAttention(key_dim=4)(x, return_attention_scores=True)
    assert tuple(y.shape) == (None, None, 8)
    assert tuple(w.shape) == (None, None, None)
