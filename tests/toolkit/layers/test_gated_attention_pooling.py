"""Tests of GatedAttentionPooling: layer battery, NumPy references, weights and masks."""

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import GatedAttentionPooling


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _reference(layer, x, mask=None):
    """Ilse et al.: a = softmax(w^T (tanh(V h) * sigmoid(U h))), z = sum_k a_k h_k (NumPy)."""
    b, c = x.shape[0], x.shape[-1]
    h = x.reshape(b, -1, c)
    hidden = np.tanh(h @ _np(layer._attention_v.kernel) + _np(layer._attention_v.bias))
    if layer.gated:
        u = h @ _np(layer._attention_u.kernel) + _np(layer._attention_u.bias)
        hidden = hidden * (1.0 / (1.0 + np.exp(-u)))
    logits = (hidden @ _np(layer._attention_w.kernel))[..., 0] + _np(layer._attention_w.bias)
    weights = np.zeros_like(logits)
    valid = np.ones_like(logits, bool) if mask is None else mask.reshape(b, -1)
    for i in range(b):
        if valid[i].any():
            e = np.exp(logits[i, valid[i]] - logits[i, valid[i]].max())
            weights[i, valid[i]] = e / e.sum()
    pooled = np.einsum("bk,bkc->bc", weights, h)
    return pooled, weights.reshape(x.shape[:-1])


@pytest.mark.parametrize(
    "shape, gated",
    [((2, 7, 5), False), ((2, 4, 6, 5), True), ((2, 4, 3, 2, 5), True)],
    ids=["bag_not_gated", "2d", "3d"],
)
def test_layer_battery(shape, gated, tmp_path):
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    run_layer_test(
        GatedAttentionPooling,
        {"intermediate_dim": 6, "gated": gated, "dropout": 0.1},
        x,
        expected_output_shape=(2, 5),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("shape", [(3, 9, 4), (2, 3, 4, 2, 4)], ids=["bag", "3d"])
def test_matches_numpy_reference(gated, shape):
    x = np.random.default_rng(2).normal(size=shape).astype("float32")
    layer = GatedAttentionPooling(8, gated=gated, bias_initializer="random_normal")
    pooled, weights = layer(x, return_attention_scores=True)
    expected_pooled, expected_weights = _reference(layer, x)
    assert weights.shape == shape[:-1]
    np.testing.assert_allclose(_np(weights), expected_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(pooled), expected_pooled, rtol=1e-5, atol=1e-5)
    sums = _np(weights).reshape(shape[0], -1).sum(axis=-1)
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    assert (layer._attention_u is not None) == gated


def test_spatial_map_equals_flattened_bag():
    x = np.random.default_rng(3).normal(size=(2, 3, 4, 5, 6)).astype("float32")
    layer = GatedAttentionPooling(5)
    pooled_map, w_map = layer(x, return_attention_scores=True)
    pooled_bag, w_bag = layer(x.reshape(2, -1, 6), return_attention_scores=True)
    np.testing.assert_allclose(_np(pooled_map), _np(pooled_bag), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(w_map).reshape(2, -1), _np(w_bag), rtol=1e-6)


def test_mask_zeroes_weights_and_fully_masked_gives_zeros():
    x = np.random.default_rng(4).normal(size=(3, 2, 3, 4)).astype("float32")
    mask = np.ones((3, 2, 3), bool)
    mask[0, 1, :] = False  # half of the first map is padding
    mask[2] = False  # the third map is entirely masked
    layer = GatedAttentionPooling(4, bias_initializer="random_normal")
    pooled, weights = layer(x, mask=mask, return_attention_scores=True)
    pooled, weights = _np(pooled), _np(weights)
    expected_pooled, expected_weights = _reference(layer, x, mask)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled, expected_pooled, rtol=1e-5, atol=1e-5)
    assert np.all(weights[0, 1] == 0.0)
    np.testing.assert_allclose(weights[:2].reshape(2, -1).sum(-1), 1.0, rtol=1e-5)
    assert np.all(weights[2] == 0.0) and np.all(pooled[2] == 0.0)
    assert np.all(np.isfinite(pooled))
    # Masked positions have no influence on the result.
    changed = x.copy()
    changed[0, 1] = 100.0
    again = _np(layer(changed, mask=mask))
    np.testing.assert_allclose(again[0], pooled[0], rtol=1e-5, atol=1e-6)


def test_keras_mask_from_masking_layer():
    x = np.random.default_rng(5).normal(size=(2, 6, 3)).astype("float32")
    x[0, 4:] = 0.0  # padding that keras.layers.Masking turns into a mask
    inputs = keras.Input((6, 3))
    pooling = GatedAttentionPooling(4)
    outputs = pooling(keras.layers.Masking(0.0)(inputs), return_attention_scores=True)
    model = keras.Model(inputs, outputs)
    _, weights = model(x)
    weights = _np(weights)
    assert np.all(weights[0, 4:] == 0.0) and np.all(weights[1] > 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def test_dropout_in_training_keeps_weights_normalised():
    x = np.random.default_rng(6).normal(size=(2, 10, 4)).astype("float32")
    layer = GatedAttentionPooling(16, dropout=0.5)
    _, w_train = layer(x, training=True, return_attention_scores=True)
    _, w_eval = layer(x, training=False, return_attention_scores=True)
    np.testing.assert_allclose(_np(w_train).sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(_np(w_train), _np(w_eval))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"intermediate_dim": 0}, "intermediate_dim must be a positive integer"),
        ({"intermediate_dim": 4, "dropout": 1.0}, "dropout must be in"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedAttentionPooling(**kwargs)
