"""Tests of the `ScaledDotProductAttention` layer: shared layer checks and a NumPy reference."""

import keras
import numpy as np
import pytest
from keras import ops

from tests.layer_testing import run_layer_test
from toolkit.layers import ScaledDotProductAttention


def reference(q, k, v, query_mask=None, value_mask=None, causal=False, scale=None):
    """NumPy scores -> softmax -> weighted sum; returns (context (B, T, Dv), weights (B, T, S))."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("btd,bsd->bts", q, k) * scale
    valid = np.ones(scores.shape, bool)
    if value_mask is not None:
        valid &= value_mask[:, None, :]
    if causal:
        t, s = scores.shape[1:]
        valid &= np.arange(s)[None, :] <= np.arange(t)[:, None] + s - t
    scores = np.where(valid, scores, -np.inf)
    row_max = np.max(scores, -1, keepdims=True)
    e = np.where(valid, np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    weights = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
    if query_mask is not None:
        weights = weights * query_mask[:, :, None]
    return np.einsum("bts,bsd->btd", weights, v), weights


def _data(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, 5, 8)).astype("float32")
    k = rng.normal(size=(2, 7, 8)).astype("float32")
    v = rng.normal(size=(2, 7, 3)).astype("float32")
    query_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    value_mask = np.array([[1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], bool)
    return q, k, v, query_mask, value_mask


def test_layer_checks_plain(tmp_path):
    q, k, v, _, _ = _data()
    run_layer_test(
        ScaledDotProductAttention,
        {"dropout": 0.1, "seed": 3},
        [q, v, k],
        expected_output_shape=(2, 5, 3),
        tmp_path=tmp_path,
    )


def test_layer_checks_with_masks_and_causal(tmp_path):
    q, k, v, query_mask, value_mask = _data()
    run_layer_test(
        ScaledDotProductAttention,
        {"scale": 0.5, "attention_implementation": "chunked"},
        [q, v, k, query_mask, value_mask],
        call_kwargs={"use_causal_mask": True},
        expected_output_shape=(2, 5, 3),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("impl", ["explicit", "fused", "chunked"])
def test_matches_numpy_with_masks(impl):
    q, k, v, query_mask, value_mask = _data()
    layer = ScaledDotProductAttention(attention_implementation=impl)
    context = layer(q, v, k, query_mask=query_mask, value_mask=value_mask, use_causal_mask=True)
    expected, _ = reference(q, k, v, query_mask, value_mask, causal=True)
    np.testing.assert_allclose(ops.convert_to_numpy(context), expected, atol=1e-5)
    # Batch 1 has no visible key: zeros. Batch 0 query rows 3, 4 are padding: zeros.
    np.testing.assert_array_equal(ops.convert_to_numpy(context)[1], 0.0)
    np.testing.assert_array_equal(ops.convert_to_numpy(context)[0, 3:], 0.0)


def test_weights_match_numpy():
    q, k, v, query_mask, value_mask = _data(1)
    layer = ScaledDotProductAttention(scale=0.3)
    context, weights = layer(
        q, v, k, query_mask=query_mask, value_mask=value_mask, return_attention_scores=True
    )
    expected, expected_w = reference(q, k, v, query_mask, value_mask, scale=0.3)
    assert tuple(weights.shape) == (2, 5, 7)
    np.testing.assert_allclose(ops.convert_to_numpy(weights), expected_w, atol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(context), expected, atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(weights)[0, :3].sum(-1), 1.0, atol=1e-5)


def test_key_defaults_to_value():
    q, _, v, _, _ = _data()
    v = np.random.default_rng(2).normal(size=(2, 7, 8)).astype("float32")
    out = ScaledDotProductAttention()(q, v)
    np.testing.assert_allclose(ops.convert_to_numpy(out), reference(q, v, v)[0], atol=1e-5)


def test_dropout_only_in_training():
    q, k, v, _, _ = _data()
    layer = ScaledDotProductAttention(dropout=0.5, seed=1)
    inference = ops.convert_to_numpy(layer(q, v, k, training=False))
    np.testing.assert_allclose(inference, reference(q, k, v)[0], atol=1e-5)
    training = ops.convert_to_numpy(layer(q, v, k, training=True))
    assert np.abs(training - inference).max() > 1e-3


def test_invalid_arguments():
    with pytest.raises(ValueError, match="attention_implementation must be one of"):
        ScaledDotProductAttention(attention_implementation="flash")
    with pytest.raises(ValueError, match="dropout must be in"):
        ScaledDotProductAttention(dropout=1.5)
    with pytest.raises(ValueError, match="scale must be positive"):
        ScaledDotProductAttention(scale=-1.0)


def test_symbolic_weights_shape():
    q = keras.Input((None, 8))
    v = keras.Input((6, 3))
    k = keras.Input((6, 8))
    context, weights = ScaledDotProductAttention()(q, v, k, return_attention_scores=True)
    assert tuple(context.shape) == (None, None, 3)
    assert tuple(weights.shape) == (None, None, 6)
