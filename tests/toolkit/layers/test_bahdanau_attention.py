"""Tests for `BahdanauAttention` against a NumPy reference of score, softmax and weighted sum."""

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import BahdanauAttention

RNG = np.random.default_rng(0)


def _inputs(batch=2, t=3, s=5, dq=4, dk=7, dv=6):
    query = RNG.normal(size=(batch, t, dq)).astype("float32")
    value = RNG.normal(size=(batch, s, dv)).astype("float32")
    key = RNG.normal(size=(batch, s, dk)).astype("float32")
    return query, value, key


def _numpy_reference(layer, query, key, value, query_mask, value_mask):
    w_q = np.asarray(layer.query_dense.kernel)
    w_k = np.asarray(layer.key_dense.kernel)
    v = np.asarray(layer.score_dense.kernel)[:, 0]
    projected_key = key @ w_k
    if layer.use_bias:
        projected_key = projected_key + np.asarray(layer.key_dense.bias)
    # Step 1: additive scores e[b, t, s] = v . tanh(W_q q_t + W_k k_s).
    hidden = np.tanh((query @ w_q)[:, :, None, :] + projected_key[:, None, :, :])
    scores = hidden @ v
    # Step 2: masked softmax; rows without any key get zeros.
    mask = query_mask[:, :, None] & value_mask[:, None, :]
    scores = np.where(mask, scores, -np.inf)
    row_max = np.max(np.where(mask, scores, -1e30), axis=-1, keepdims=True)
    exp = np.where(mask, np.exp(scores - row_max), 0.0)
    denom = exp.sum(-1, keepdims=True)
    weights = np.divide(exp, denom, out=np.zeros_like(exp), where=denom > 0)
    # Step 3: weighted sum of the values.
    return weights @ value, weights


def test_layer_battery(tmp_path):
    query, value, _ = _inputs()
    run_layer_test(
        BahdanauAttention,
        {"units": 8, "use_bias": True},
        [query, value],
        expected_output_shape=(2, 3, 6),
        tmp_path=tmp_path,
    )


def test_layer_battery_with_separate_key(tmp_path):
    query, value, key = _inputs()
    run_layer_test(
        BahdanauAttention,
        {"units": 8},
        [query, value, key],
        expected_output_shape=(2, 3, 6),
        tmp_path=tmp_path,
        run_mixed_precision=False,
    )


@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_numpy_reference_with_masks(use_bias):
    query, value, key = _inputs()
    layer = BahdanauAttention(units=8, use_bias=use_bias)
    if use_bias:
        layer.build(query.shape, value.shape, key.shape)
        layer.key_dense.bias.assign(RNG.normal(size=(8,)).astype("float32"))
    query_mask = np.array([[True, True, False], [True, True, True]])
    # The second sequence has every key masked: its rows must be zeros, not NaN.
    value_mask = np.array([[True, True, True, False, False], [False] * 5])
    context, weights = layer(
        query,
        value,
        key,
        query_mask=query_mask,
        value_mask=value_mask,
        return_attention_scores=True,
    )
    ref_context, ref_weights = _numpy_reference(layer, query, key, value, query_mask, value_mask)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, atol=1e-5)
    np.testing.assert_allclose(np.asarray(context), ref_context, atol=1e-5)
    assert np.all(np.asarray(context)[1] == 0.0)
    assert np.all(np.asarray(context)[0, 2] == 0.0)  # masked query row
    np.testing.assert_allclose(np.asarray(weights)[0, :2].sum(-1), 1.0, atol=1e-6)
    assert np.all(np.asarray(weights)[0, :, 3:] == 0.0)


def test_without_masks_matches_reference_and_key_defaults_to_value():
    query, value, _ = _inputs(dk=6)
    layer = BahdanauAttention(units=5)
    context = layer(query, value)
    ones_q = np.ones(query.shape[:2], bool)
    ones_v = np.ones(value.shape[:2], bool)
    ref_context, _ = _numpy_reference(layer, query, value, value, ones_q, ones_v)
    np.testing.assert_allclose(np.asarray(context), ref_context, atol=1e-5)


def test_decoder_step_with_precomputed_keys_equals_full_call():
    query, value, key = _inputs(t=4)
    layer = BahdanauAttention(units=8, use_bias=True)
    value_mask = np.array([[True] * 5, [True, True, True, False, False]])
    full, full_weights = layer(
        query, value, key, value_mask=value_mask, return_attention_scores=True
    )
    projected = layer.project_keys(key)
    assert tuple(projected.shape) == (2, 5, 8)
    for t in range(4):
        step, step_weights = layer(
            query[:, t : t + 1],
            value,
            projected_key=projected,
            value_mask=value_mask,
            return_attention_scores=True,
        )
        np.testing.assert_allclose(np.asarray(step), np.asarray(full)[:, t : t + 1], atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(step_weights), np.asarray(full_weights)[:, t : t + 1], atol=1e-6
        )


def test_symbolic_weights_shape():
    query = keras.Input((None, 4))
    value = keras.Input((9, 6))
    context, weights = BahdanauAttention(units=3)(query, value, return_attention_scores=True)
    assert tuple(context.shape) == (None, None, 6)
    assert tuple(weights.shape) == (None, None, 9)


@pytest.mark.parametrize("units", [0, -2, 2.5])
def test_rejects_bad_units(units):
    with pytest.raises(ValueError, match="units must be a positive integer"):
        BahdanauAttention(units=units)
