"""Tests of AttentionGate: layer battery in 2D/3D, NumPy references, resampling of the gate."""

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import AttentionGate
from toolkit.layers.attention_gate import resize_spatial


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _interp_reference(x, spatial_shape):
    """Half-pixel linear interpolation with edge clamping, one np.interp pass per axis."""
    for axis, out_len in enumerate(spatial_shape, start=1):
        in_len = x.shape[axis]
        src = (np.arange(out_len) + 0.5) * in_len / out_len - 0.5
        x = np.apply_along_axis(lambda v, s=src, n=in_len: np.interp(s, np.arange(n), v), axis, x)
    return x


def _gate_reference(layer, x, g):
    """alpha = sigmoid(psi(relu(W_x x + W_g g + b_g)) + b_psi) computed with NumPy."""
    rank = x.ndim - 2
    k_theta = _np(layer._theta_x.kernel)  # (*f, Cx, I)
    factors = k_theta.shape[:rank]
    b, c = x.shape[0], x.shape[-1]
    grid = tuple(s // f for s, f in zip(x.shape[1:-1], factors))
    # Cut x into non-overlapping blocks: (B, g1, f1, g2, f2, ..., C).
    blocks = x.reshape((b,) + tuple(v for pair in zip(grid, factors) for v in pair) + (c,))
    order = [0] + [1 + 2 * i for i in range(rank)] + [2 + 2 * i for i in range(rank)]
    blocks = blocks.transpose(order + [blocks.ndim - 1])  # (B, *grid, *f, C)
    theta = blocks.reshape(b, *grid, -1) @ k_theta.reshape(-1, k_theta.shape[-1])
    k_phi = _np(layer._phi_g.kernel).reshape(g.shape[-1], -1)
    phi = g @ k_phi + _np(layer._phi_g.bias)
    hidden = np.maximum(theta + phi, 0.0)
    logits = hidden @ _np(layer._psi.kernel).reshape(-1, 1) + _np(layer._psi.bias)
    alpha = _interp_reference(_sigmoid(logits), x.shape[1:-1])
    return x * alpha, alpha


@pytest.mark.parametrize(
    "features_shape, gating_shape",
    [((2, 8, 8, 3), (2, 4, 4, 5)), ((2, 8, 6, 4, 3), (2, 4, 3, 2, 5))],
    ids=["2d", "3d"],
)
def test_layer_battery(features_shape, gating_shape, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=features_shape).astype("float32")
    g = rng.normal(size=gating_shape).astype("float32")
    run_layer_test(
        AttentionGate,
        {"intermediate_dim": 4},
        [x, g],
        expected_output_shape=features_shape,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize(
    "features_shape, gating_shape",
    [
        ((2, 6, 5, 3), (2, 6, 5, 4)),  # same resolution, 2D
        ((2, 4, 6, 5, 3), (2, 4, 6, 5, 2)),  # same resolution, 3D
        ((2, 8, 6, 3), (2, 4, 3, 4)),  # factor 2, 2D
        ((1, 8, 9, 4, 2), (1, 2, 3, 2, 3)),  # factors (4, 3, 2), 3D
    ],
)
def test_matches_numpy_reference(features_shape, gating_shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=features_shape).astype("float32")
    g = rng.normal(size=gating_shape).astype("float32")
    layer = AttentionGate(intermediate_dim=5, bias_initializer="random_normal")
    gated, alpha = layer(x, g, return_attention_scores=True)
    expected_gated, expected_alpha = _gate_reference(layer, x, g)
    assert alpha.shape == (*features_shape[:-1], 1)
    np.testing.assert_allclose(_np(alpha), expected_alpha, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(gated), expected_gated, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_np(alpha), _np(alpha).mean()), "coefficients should vary in space"


def _set_highlight_weights(layer):
    """W_x = 0, W_g = 1, psi = 1, biases 0: alpha = sigmoid(relu(g)) on the coarse grid."""
    layer._theta_x.kernel.assign(np.zeros(layer._theta_x.kernel.shape, "float32"))
    layer._phi_g.kernel.assign(np.ones(layer._phi_g.kernel.shape, "float32"))
    layer._phi_g.bias.assign(np.zeros(layer._phi_g.bias.shape, "float32"))
    layer._psi.kernel.assign(np.ones(layer._psi.kernel.shape, "float32"))
    layer._psi.bias.assign(np.zeros(layer._psi.bias.shape, "float32"))


def test_gating_highlight_peaks_in_region_after_resampling():
    x = np.ones((1, 16, 16, 16, 2), "float32")
    g = np.zeros((1, 4, 4, 4, 1), "float32")
    g[0, 1, 2, 3, 0] = 6.0  # one coarse cell = fine block [4:8, 8:12, 12:16]
    layer = AttentionGate(intermediate_dim=1)
    layer.build(x.shape, g.shape)
    _set_highlight_weights(layer)
    gated, alpha = layer(x, g, return_attention_scores=True)
    alpha = _np(alpha)[0, ..., 0]
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
    peak = np.unravel_index(np.argmax(alpha), alpha.shape)
    assert 4 <= peak[0] < 8 and 8 <= peak[1] < 12 and 12 <= peak[2] < 16, peak
    assert alpha[4:8, 8:12, 12:16].mean() > 0.7
    # Linear interpolation only reaches the neighbouring cell centres (block centre +- 4 voxels):
    # beyond them every coefficient is sigmoid(0) = 0.5.
    np.testing.assert_allclose(alpha[..., :9], 0.5, atol=1e-6)
    np.testing.assert_allclose(alpha[:1], 0.5, atol=1e-6)
    np.testing.assert_allclose(_np(gated)[0, ..., 1], alpha, rtol=1e-6)


def test_odd_sizes_from_same_padded_pooling():
    layer = AttentionGate(intermediate_dim=3)
    x = np.random.default_rng(2).normal(size=(2, 7, 5, 9, 2)).astype("float32")
    g = np.random.default_rng(3).normal(size=(2, 4, 3, 3, 4)).astype("float32")
    gated, alpha = layer(x, g, return_attention_scores=True)
    assert gated.shape == x.shape and alpha.shape == (2, 7, 5, 9, 1)
    assert tuple(layer._theta_x.kernel_size) == (2, 2, 3)
    a = _np(alpha)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_mixed_precision_coefficients_in_range():
    layer = AttentionGate(intermediate_dim=4, dtype="mixed_bfloat16")
    x = np.random.default_rng(4).normal(size=(1, 8, 8, 3)).astype("float32")
    g = np.random.default_rng(5).normal(size=(1, 2, 2, 3)).astype("float32")
    gated, alpha = layer(x, g, return_attention_scores=True)
    assert keras.backend.standardize_dtype(alpha.dtype) == "bfloat16"
    a = _np(keras.ops.cast(alpha, "float32"))
    assert a.min() >= 0.0 and a.max() <= 1.0


@pytest.mark.parametrize(
    "features_shape, gating_shape, message",
    [
        ((1, 5, 5, 2), (1, 4, 4, 2), "downsampled by an integer factor"),
        ((1, 4, 4, 2), (1, 8, 8, 2), "downsampled by an integer factor"),
        ((1, 8, 8, 2), (1, 4, 4, 4, 2), "same rank"),
        ((1, 8, 2), (1, 4, 2), "same rank"),
    ],
)
def test_bad_shapes_raise(features_shape, gating_shape, message):
    layer = AttentionGate(intermediate_dim=2)
    with pytest.raises(ValueError, match=message):
        layer(np.zeros(features_shape, "float32"), np.zeros(gating_shape, "float32"))


def test_bad_intermediate_dim_raises():
    with pytest.raises(ValueError, match="intermediate_dim must be a positive integer"):
        AttentionGate(intermediate_dim=0)


def test_resize_spatial_matches_reference_non_integer_ratio():
    x = np.random.default_rng(6).normal(size=(2, 3, 5, 4, 2)).astype("float32")
    out = _np(resize_spatial(keras.ops.convert_to_tensor(x), (7, 11, 4)))
    np.testing.assert_allclose(out, _interp_reference(x, (7, 11, 4)), rtol=1e-5, atol=1e-6)


def test_built_gate_serves_other_sizes_at_the_same_factor():
    layer = AttentionGate(intermediate_dim=3)
    rng = np.random.default_rng(7)
    layer(rng.normal(size=(1, 8, 8, 2)).astype("float32"), np.zeros((1, 4, 4, 3), "float32"))
    x = rng.normal(size=(2, 12, 6, 2)).astype("float32")
    g = rng.normal(size=(2, 6, 3, 3)).astype("float32")
    gated, alpha = layer(x, g, return_attention_scores=True)
    assert gated.shape == x.shape and alpha.shape == (2, 12, 6, 1)
    np.testing.assert_allclose(_np(gated), _gate_reference(layer, x, g)[0], rtol=1e-5, atol=1e-5)
