"""Tests for `SinusoidalPositionEncoding`: the formula, start offsets, dtypes."""

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import SinusoidalPositionEncoding


def _numpy_encoding(length, dim, max_wavelength=10000.0, start=0):
    positions = np.arange(start, start + length, dtype="float64")[:, None]
    i = np.arange(dim // 2 + dim % 2, dtype="float64")[None, :]
    angles = positions / max_wavelength ** (2 * i / dim)
    encoding = np.zeros((length, dim))
    encoding[:, 0::2] = np.sin(angles)[:, : (dim + 1) // 2]
    encoding[:, 1::2] = np.cos(angles)[:, : dim // 2]
    return encoding


def test_layer_battery(tmp_path):
    run_layer_test(
        SinusoidalPositionEncoding,
        {"max_wavelength": 500},
        np.zeros((2, 7, 6), "float32"),
        expected_output_shape=(2, 7, 6),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("dim,max_wavelength", [(8, 10000), (6, 100), (5, 10000)])
def test_matches_formula(dim, max_wavelength):
    x = np.random.default_rng(0).normal(size=(3, 20, dim)).astype("float32")
    out = np.asarray(SinusoidalPositionEncoding(max_wavelength=max_wavelength)(x))
    expected = _numpy_encoding(20, dim, max_wavelength)
    assert out.shape == (3, 20, dim)
    for b in range(3):  # broadcast over the batch, independent of the input values
        np.testing.assert_allclose(out[b], expected, atol=2e-5)


@pytest.mark.parametrize("start_index", [0, 5, 37])
def test_start_index_gives_rows_of_full_encoding(start_index):
    layer = SinusoidalPositionEncoding()
    full = np.asarray(layer(np.zeros((2, 50, 8), "float32")))
    for start in (start_index, keras.ops.convert_to_tensor(start_index, "int32")):
        step = np.asarray(layer(np.zeros((2, 1, 8), "float32"), start_index=start))
        np.testing.assert_allclose(step, full[:, start_index : start_index + 1], atol=1e-6)
    chunk = np.asarray(layer(np.zeros((2, 4, 8), "float32"), start_index=start_index))
    np.testing.assert_allclose(chunk, full[:, start_index : start_index + 4], atol=1e-6)


def test_bfloat16_policy_keeps_float32_angles():
    # Position 1001 is not representable in bfloat16; angles must still be computed in float32.
    x = np.zeros((1, 1, 8), "float32")
    layer = SinusoidalPositionEncoding(dtype="mixed_bfloat16")
    out = layer(x, start_index=1001)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    expected = _numpy_encoding(1, 8, start=1001)
    np.testing.assert_allclose(np.asarray(keras.ops.cast(out, "float32"))[0], expected, atol=1e-2)


def test_rejects_bad_wavelength():
    with pytest.raises(ValueError, match="max_wavelength must be greater than 1"):
        SinusoidalPositionEncoding(max_wavelength=1)
