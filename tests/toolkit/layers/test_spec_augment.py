"""SpecAugment: standard layer checks and value tests of the masks."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import SpecAugment

# One shape for the value tests: JAX compiles each eager op once per shape.
SHAPE = (48, 80, 40)


def _runs(mask_row):
    """(start, width) of the runs of True in a 1-D boolean array."""
    runs, start = [], None
    for i, v in enumerate(list(mask_row) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_standard_layer_checks(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 30, 16)).astype("float32")
    run_layer_test(
        SpecAugment,
        dict(
            freq_mask_count=1,
            freq_mask_width=4,
            time_mask_count=2,
            time_mask_width=5,
            time_mask_max_ratio=0.5,
            mask_value=-1.0,
            seed=3,
        ),
        x,
        expected_output_shape=(2, 30, 16),
        tmp_path=tmp_path,
    )
    mask = np.ones((2, 30), bool)
    mask[1, 20:] = False
    run_layer_test(
        SpecAugment, dict(seed=1), [x, mask], expected_output_shape=(2, 30, 16), tmp_path=tmp_path
    )


def test_inference_is_identity():
    x = np.random.default_rng(1).normal(size=(3, 50, 20)).astype("float32")
    layer = SpecAugment(seed=0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)


def test_training_masks_are_exact_bands_within_bounds():
    batch, frames, channels = SHAPE
    x = np.random.default_rng(2).uniform(1.0, 2.0, size=(batch, frames, channels)).astype("float32")
    layer = SpecAugment(
        freq_mask_count=2, freq_mask_width=7, time_mask_count=3, time_mask_width=12,
        mask_value=-5.0, seed=11,
    )  # fmt: skip
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    masked = y == -5.0
    # Everything not masked is untouched; masked entries are exactly the mask value.
    np.testing.assert_array_equal(y[~masked], x[~masked])
    any_masked = 0
    for b in range(batch):
        time_rows = masked[b].all(axis=1)  # frames masked across every channel
        freq_cols = masked[b].all(axis=0)  # channels masked across every frame
        # Every masked entry is explained by a masked frame or a masked channel.
        np.testing.assert_array_equal(masked[b], time_rows[:, None] | freq_cols[None, :])
        if not freq_cols.all():
            runs = _runs(time_rows)
            assert len(runs) <= 3 and all(w <= 12 * 3 for _, w in runs)
            assert time_rows.sum() <= 3 * 12
        if not time_rows.all():
            runs = _runs(freq_cols)
            assert len(runs) <= 2 and freq_cols.sum() <= 2 * 7
        any_masked += masked[b].any()
    assert any_masked > batch // 2
    # Two masks of width <= 7 (resp. 12): a single run is at most 14 (resp. 36) wide when they touch.
    widths = [w for b in range(batch) for _, w in _runs(masked[b].all(axis=0))]
    assert max(widths) <= 14 and max(widths) > 3


def test_time_masks_stay_inside_true_length_and_padding_is_untouched():
    batch, frames, channels = SHAPE
    x = np.full((batch, frames, channels), 3.0, "float32")
    lengths = np.random.default_rng(3).integers(10, frames + 1, size=batch)
    mask = np.arange(frames)[None, :] < lengths[:, None]
    layer = SpecAugment(freq_mask_count=1, freq_mask_width=5, time_mask_count=2,
                        time_mask_width=30, time_mask_max_ratio=0.2, seed=5)  # fmt: skip
    y = keras.ops.convert_to_numpy(layer(x, padding_mask=mask, training=True))
    assert (y[~mask] == 3.0).all()  # padded frames unchanged, even inside frequency masks
    for b in range(batch):
        n = lengths[b]
        time_rows = (y[b, :n] == 0.0).all(axis=1)
        freq_cols = (y[b, :n] == 0.0).all(axis=0)
        if not freq_cols.all():
            assert time_rows.sum() <= 2 * int(np.floor(0.2 * n))


def test_seeded_and_varies_between_calls():
    x = np.ones(SHAPE, "float32")
    a = SpecAugment(seed=7)
    b = SpecAugment(seed=7)
    ya1 = keras.ops.convert_to_numpy(a(x, training=True))
    yb1 = keras.ops.convert_to_numpy(b(x, training=True))
    np.testing.assert_array_equal(ya1, yb1)
    ya2 = keras.ops.convert_to_numpy(a(x, training=True))
    assert not np.array_equal(ya1, ya2)


def test_compiles_with_static_shapes_in_a_jitted_fit():
    inputs = keras.Input((40, 8))
    mask = keras.Input((40,), dtype="bool")
    h = SpecAugment(freq_mask_width=3, time_mask_width=6, seed=0)(inputs, padding_mask=mask)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model([inputs, mask], out)
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    x = np.random.default_rng(0).normal(size=(8, 40, 8)).astype("float32")
    m = np.ones((8, 40), bool)
    history = model.fit([x, m], np.zeros((8, 1), "float32"), epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    np.testing.assert_allclose(model.predict([x, m], verbose=0), model([x, m]), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(freq_mask_count=-1), "freq_mask_count must be a non-negative integer"),
        (dict(time_mask_width=2.5), "time_mask_width must be a non-negative integer"),
        (dict(time_mask_max_ratio=1.5), "time_mask_max_ratio must be in"),
    ],
)
def test_argument_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpecAugment(**kwargs)
