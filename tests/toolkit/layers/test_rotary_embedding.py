"""Tests for `RotaryEmbedding`: NumPy reference, relative-position property, start offsets."""

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import RotaryEmbedding

RNG = np.random.default_rng(2)


def _numpy_rope(x, max_wavelength=10000.0, scaling_factor=1.0, start=0):
    """Rotates feature pairs (i, i + H/2) of x (B, T, ..., H) by position * theta_i."""
    length, dim = x.shape[1], x.shape[-1]
    half = dim // 2
    theta = max_wavelength ** (-np.arange(half) * 2.0 / dim)  # (H/2,)
    positions = (np.arange(length) + start) / scaling_factor
    angles = positions[:, None] * theta[None, :]  # (T, H/2)
    angles = angles.reshape((1, length) + (1,) * (x.ndim - 3) + (half,))
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_layer_battery(tmp_path):
    run_layer_test(
        RotaryEmbedding,
        {"max_wavelength": 1000, "scaling_factor": 2.0},
        RNG.normal(size=(2, 5, 3, 8)).astype("float32"),
        expected_output_shape=(2, 5, 3, 8),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("shape", [(2, 6, 3, 8), (2, 6, 10)])
@pytest.mark.parametrize("scaling_factor", [1.0, 4.0])
def test_matches_numpy_reference(shape, scaling_factor):
    x = RNG.normal(size=shape).astype("float32")
    out = RotaryEmbedding(max_wavelength=500, scaling_factor=scaling_factor)(x)
    expected = _numpy_rope(x, 500.0, scaling_factor)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    # A rotation keeps the norm of every feature pair, hence of every vector.
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(out), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )


def test_dot_product_depends_only_on_relative_position():
    rope = RotaryEmbedding()
    q = RNG.normal(size=(1, 1, 1, 16)).astype("float32")
    k = RNG.normal(size=(1, 1, 1, 16)).astype("float32")

    def score(m, n):
        rq = np.asarray(rope(q, start_index=m))
        rk = np.asarray(rope(k, start_index=n))
        return float(np.sum(rq * rk))

    for offset in (0, 3, -5):
        scores = [score(m, m - offset) for m in (7, 20, 45, 100)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    # ...and it does depend on the offset (the property is not vacuous).
    assert abs(score(10, 10) - score(10, 7)) > 1e-3


@pytest.mark.parametrize("start_index", [1, 9])
def test_start_index_gives_rows_of_full_rotation(start_index):
    rope = RotaryEmbedding()
    x = RNG.normal(size=(2, 12, 2, 8)).astype("float32")
    full = np.asarray(rope(x))
    for start in (start_index, keras.ops.convert_to_tensor(start_index, "int32")):
        step = np.asarray(rope(x[:, start_index : start_index + 1], start_index=start))
        np.testing.assert_allclose(step, full[:, start_index : start_index + 1], atol=1e-5)


def test_rejects_odd_feature_size():
    with pytest.raises(ValueError, match="even size"):
        RotaryEmbedding()(np.zeros((1, 2, 3, 5), "float32"))
