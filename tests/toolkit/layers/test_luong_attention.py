"""Tests for `LuongAttention`: NumPy references for the dot, general and concat scores."""

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import LuongAttention

RNG = np.random.default_rng(1)


def _numpy_scores(layer, query, key):
    if layer.score_mode == "dot":
        return query @ key.transpose(0, 2, 1)
    if layer.score_mode == "general":
        w_a = np.asarray(layer.query_dense.kernel)  # (Dq, Dk)
        return np.einsum("btq,qk,bsk->bts", query, w_a, key)
    # concat: v^T tanh(W_a [q; k]) with W_a = [W_q; W_k] stacked over the input axis.
    w_a = np.concatenate(
        [np.asarray(layer.query_dense.kernel), np.asarray(layer.key_dense.kernel)], axis=0
    )
    v = np.asarray(layer.score_dense.kernel)[:, 0]
    t, s = query.shape[1], key.shape[1]
    pairs = np.concatenate(
        [
            np.repeat(query[:, :, None, :], s, axis=2),
            np.repeat(key[:, None, :, :], t, axis=1),
        ],
        axis=-1,
    )  # (B, T, S, Dq + Dk)
    return np.tanh(pairs @ w_a) @ v


def _numpy_attend(scores, value, mask):
    row_max = np.max(np.where(mask, scores, -1e30), axis=-1, keepdims=True)
    exp = np.where(mask, np.exp(np.where(mask, scores - row_max, 0.0)), 0.0)
    denom = exp.sum(-1, keepdims=True)
    weights = np.divide(exp, denom, out=np.zeros_like(exp), where=denom > 0)
    return weights @ value, weights


def _inputs(score_mode):
    dk = 4 if score_mode == "dot" else 7
    query = RNG.normal(size=(2, 3, 4)).astype("float32")
    value = RNG.normal(size=(2, 5, 6)).astype("float32")
    key = RNG.normal(size=(2, 5, dk)).astype("float32")
    return query, value, key


@pytest.mark.parametrize("score_mode", ["dot", "general", "concat"])
def test_layer_battery(score_mode, tmp_path):
    query, value, key = _inputs(score_mode)
    run_layer_test(
        LuongAttention,
        {"score_mode": score_mode, "units": 5 if score_mode == "concat" else None},
        [query, value, key],
        expected_output_shape=(2, 3, 6),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("score_mode", ["dot", "general", "concat"])
def test_matches_numpy_reference_with_masks(score_mode):
    query, value, key = _inputs(score_mode)
    layer = LuongAttention(score_mode=score_mode)
    query_mask = np.array([[True, False, True], [True, True, True]])
    value_mask = np.array([[True, False, True, True, False], [False] * 5])
    context, weights = layer(
        query,
        value,
        key,
        query_mask=query_mask,
        value_mask=value_mask,
        return_attention_scores=True,
    )
    mask = query_mask[:, :, None] & value_mask[:, None, :]
    ref_context, ref_weights = _numpy_attend(_numpy_scores(layer, query, key), value, mask)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, atol=1e-5)
    np.testing.assert_allclose(np.asarray(context), ref_context, atol=1e-5)
    # Fully masked rows (second sequence, masked query row) are zeros, not NaN.
    assert np.all(np.asarray(context)[1] == 0.0)
    assert np.all(np.asarray(context)[0, 1] == 0.0)
    np.testing.assert_allclose(np.asarray(weights)[0, [0, 2]].sum(-1), 1.0, atol=1e-6)


def test_concat_units_default_to_query_size_and_key_defaults_to_value():
    query = RNG.normal(size=(2, 3, 4)).astype("float32")
    value = RNG.normal(size=(2, 5, 6)).astype("float32")
    layer = LuongAttention(score_mode="concat")
    context = layer(query, value)
    assert tuple(layer.query_dense.kernel.shape) == (4, 4)
    assert tuple(layer.key_dense.kernel.shape) == (6, 4)
    mask = np.ones((2, 3, 5), bool)
    ref_context, _ = _numpy_attend(_numpy_scores(layer, query, value), value, mask)
    np.testing.assert_allclose(np.asarray(context), ref_context, atol=1e-5)


def test_dot_has_no_weights_and_general_projects_query():
    query, value, key = _inputs("general")
    general = LuongAttention(score_mode="general")
    general(query, value, key)
    assert tuple(general.query_dense.kernel.shape) == (4, 7)
    dot = LuongAttention()
    dot(query, value, value[..., :4])
    assert dot.trainable_weights == []


def test_symbolic_weights_shape():
    query = keras.Input((None, 4))
    value = keras.Input((9, 4))
    context, weights = LuongAttention()(query, value, return_attention_scores=True)
    assert tuple(context.shape) == (None, None, 4)
    assert tuple(weights.shape) == (None, None, 9)


def test_dot_rejects_mismatched_sizes():
    query, value, key = _inputs("general")
    with pytest.raises(ValueError, match="same size"):
        LuongAttention(score_mode="dot")(query, value, key)


def test_rejects_unknown_score_mode():
    with pytest.raises(ValueError, match="score_mode must be one of"):
        LuongAttention(score_mode="additive")
