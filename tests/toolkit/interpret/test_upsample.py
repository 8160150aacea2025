"""Tests of upsample_map: layouts, constants, peaks, conventions, references."""

import keras
import numpy as np
import pytest

from toolkit.interpret import upsample_map


def _interp_reference(x, shape, align_corners=False):
    """Separable linear interpolation with np.interp (edge clamping) on a map without batch."""
    for axis, out_len in enumerate(shape):
        in_len = x.shape[axis]
        if align_corners:
            src = np.arange(out_len) * (in_len - 1) / max(out_len - 1, 1)
        else:
            src = (np.arange(out_len) + 0.5) * in_len / out_len - 0.5
        x = np.apply_along_axis(lambda v, s=src, n=in_len: np.interp(s, np.arange(n), v), axis, x)
    return x


@pytest.mark.parametrize(
    "coarse_shape, target, expected_shape",
    [
        ((3, 4), (9, 10), (9, 10)),
        ((2, 3, 4), (9, 10), (2, 9, 10)),
        ((2, 3, 4, 5), (7, 9, 11), (2, 7, 9, 11)),
        ((2, 3, 4, 5, 2), (7, 9, 11), (2, 7, 9, 11, 2)),
        ((3, 4, 5), (7, 9, 11), (7, 9, 11)),
    ],
)
def test_constant_map_stays_constant(coarse_shape, target, expected_shape):
    fine = upsample_map(np.full(coarse_shape, 0.37, "float32"), target)
    assert isinstance(fine, np.ndarray) and fine.shape == expected_shape
    np.testing.assert_allclose(fine, 0.37, rtol=1e-6)


def test_peak_stays_at_corresponding_location():
    coarse = np.zeros((4, 5, 6), "float32")
    coarse[1, 3, 2] = 1.0
    # Odd integer factors: the peak lands exactly on the centre voxel of its block.
    fine = upsample_map(coarse, (12, 15, 18))
    assert np.unravel_index(np.argmax(fine), fine.shape) == (4, 10, 7)
    assert fine.max() == pytest.approx(1.0)
    # Even and non-integer factors: the peak stays inside the block the cell covers.
    for target in [(16, 20, 24), (10, 13, 15)]:
        fine = upsample_map(coarse, target)
        peak = np.unravel_index(np.argmax(fine), fine.shape)
        for p, idx, n_in, n_out in zip(peak, (1, 3, 2), coarse.shape, target):
            assert idx * n_out / n_in <= p < (idx + 1) * n_out / n_in, (peak, target)


def test_matches_numpy_reference_both_conventions():
    coarse = np.random.default_rng(0).random((3, 4, 5)).astype("float32")
    for align in (False, True):
        fine = upsample_map(coarse, (7, 9, 13), align_corners=align)
        np.testing.assert_allclose(fine, _interp_reference(coarse, (7, 9, 13), align), atol=1e-6)
    aligned = upsample_map(coarse, (7, 9, 13), align_corners=True)
    np.testing.assert_allclose(
        aligned[[0, -1]][:, [0, -1]][..., [0, -1]],
        coarse[[0, -1]][:, [0, -1]][..., [0, -1]],
        rtol=1e-6,
    )


def test_long_axes_use_the_gather_path_with_the_same_result():
    # Axes longer than 64 are resampled by gathers, shorter ones by an interpolation matrix.
    coarse = np.random.default_rng(2).random((70, 5)).astype("float32")
    for align in (False, True):
        fine = upsample_map(coarse, (101, 9), align_corners=align)
        np.testing.assert_allclose(fine, _interp_reference(coarse, (101, 9), align), atol=1e-6)


def test_matches_jax_image_resize_trilinear():
    jax = pytest.importorskip("jax")
    coarse = np.random.default_rng(1).random((2, 3, 4, 5, 2)).astype("float32")
    expected = np.asarray(jax.image.resize(coarse, (2, 7, 10, 11, 2), method="linear"))
    fine = upsample_map(coarse, (7, 10, 11))
    np.testing.assert_allclose(fine, expected, atol=1e-5)


def test_nearest_repeats_cells():
    coarse = np.arange(12, dtype="int32").reshape(3, 4)
    fine = upsample_map(coarse, (6, 12), method="nearest")
    np.testing.assert_array_equal(fine, np.repeat(np.repeat(coarse, 2, axis=0), 3, axis=1))
    assert fine.dtype == np.int32


def test_tensor_in_tensor_out():
    coarse = keras.ops.ones((2, 3, 3))
    fine = upsample_map(coarse, (6, 6))
    assert not isinstance(fine, np.ndarray)
    assert tuple(fine.shape) == (2, 6, 6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fine), 1.0)


@pytest.mark.parametrize(
    "shape, target, kwargs, message",
    [
        ((3, 3), (6,), {}, "target_shape must hold 2 or 3"),
        ((3, 3), (6, 0), {}, "target_shape must hold 2 or 3"),
        ((3,), (6, 6), {}, "coarse must have rank 2"),
        ((3, 3), (6, 6), {"method": "cubic"}, "method must be one of"),
    ],
)
def test_bad_arguments_raise(shape, target, kwargs, message):
    with pytest.raises(ValueError, match=message):
        upsample_map(np.zeros(shape, "float32"), target, **kwargs)
