"""Lesion masks supervising the attention maps: targets, losses, training model, and the effect."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipelines.common.callbacks import ForwardingCallback
from pipelines.medimg.model import ModelConfig, build_model
from pipelines.medimg.preprocess import PreprocessConfig
from pipelines.medimg.train import (
    AugmentConfig,
    VolumeBatches,
    Volumes,
    augment_volume,
    compile_for_training,
    mask_loss,
    mask_on_grid,
    masks_on_grids,
    pooling_mask_loss,
    resolve_config,
)
from toolkit.errors import UserError

SMALL = ModelConfig(filters=[4, 8, 8, 16], gate_dim=4, pooling_dim=8, dropout=0.0)
PREPROCESS = PreprocessConfig(shape=(16, 24, 16))


def test_mask_on_grid_marks_every_cell_touched_by_the_lesion():
    mask = np.zeros((5, 7, 4), np.uint8)
    mask[4, 0, 0] = 1  # last row of an odd axis: the padded cell (2, 0, 0)
    mask[1, 6, 3] = 1  # cell (0, 3, 1)
    out = mask_on_grid(mask, (3, 4, 2))
    expected = np.zeros((3, 4, 2), np.uint8)
    expected[2, 0, 0] = expected[0, 3, 1] = 1
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(mask_on_grid(mask, mask.shape), mask)


def test_masks_on_grids_equals_max_pooling_each_grid():
    rng = np.random.default_rng(3)
    mask = (rng.random((12, 10, 9)) < 0.02).astype(np.uint8)
    shapes = [(6, 5, 5), (3, 3, 3), (12, 10, 9), (1, 1, 1)]
    for shape, got in zip(shapes, masks_on_grids(mask, shapes)):
        factors = [-(-n // m) for n, m in zip(mask.shape, shape)]
        padded = np.zeros([f * m for f, m in zip(factors, shape)], np.uint8)
        padded[: mask.shape[0], : mask.shape[1], : mask.shape[2]] = mask
        blocks = padded.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2])
        np.testing.assert_array_equal(got, blocks.max(axis=(1, 3, 5)), err_msg=str(shape))
    assert not masks_on_grids(np.zeros((4, 4, 4)), [(2, 2, 2)])[0].any()


def test_pooling_mask_loss_is_the_cross_entropy_with_the_spread_mask():
    weights = np.full((2, 2, 2, 2), 1 / 8, np.float32)
    weights[1] = 0.0
    weights[1, 0, 0, 0], weights[1, 1, 1, 1] = 0.75, 0.25
    mask = np.zeros((2, 2, 2, 2), np.float32)
    mask[0, 0, 0, 0] = mask[0, 1, 0, 0] = 1  # two lesion cells in scan 0
    got = keras.ops.convert_to_numpy(pooling_mask_loss(mask, weights))
    np.testing.assert_allclose(got, [np.log(8), 0.0], rtol=1e-6)  # scan 1: no lesion, no loss
    mask[1, 0, 0, 0] = 1
    got = keras.ops.convert_to_numpy(pooling_mask_loss(mask, weights))
    np.testing.assert_allclose(got, [np.log(8), -np.log(0.75)], rtol=1e-6)


def test_mask_loss_matches_weighted_cross_entropy():
    rng = np.random.default_rng(0)
    y_true = (rng.random((2, 3, 4, 2, 1)) < 0.2).astype("float32")
    y_pred = rng.uniform(0.01, 0.99, size=y_true.shape).astype("float32")
    weight = 1 + 29 * y_true
    cross = -(y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred))
    expected = (weight * cross).reshape(2, -1).mean(axis=1)
    got = keras.ops.convert_to_numpy(mask_loss(30.0)(y_true, y_pred))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_per_scan_mask_loss_weighs_small_and_large_lesions_alike():
    # 100 cells; scan 0 has a 2-cell lesion, scan 1 a 20-cell one, scan 2 none. Every lesion
    # cell has p = 0.5 and every background cell p = 0.1, so each scan's loss is the mean
    # background cross-entropy plus 0.3 x log 2, whatever the lesion's size.
    y_true = np.zeros((3, 10, 10, 1, 1), np.float32)
    y_true[0, 0, :2] = 1
    y_true[1, :2, :] = 1
    y_pred = np.where(y_true > 0, 0.5, 0.1).astype(np.float32)
    got = keras.ops.convert_to_numpy(mask_loss(lesion_weight=0.3)(y_true, y_pred))
    background = -np.log(0.9) * np.array([98, 80, 100]) / 100
    np.testing.assert_allclose(got, background + np.array([0.3, 0.3, 0.0]) * np.log(2), rtol=1e-5)
    # A lesion cell never weighs less than a background cell: 0.3 x 100 / 50 < 1.
    y_true[1, :5, :] = 1
    y_pred = np.where(y_true > 0, 0.5, 0.1).astype(np.float32)
    got = keras.ops.convert_to_numpy(mask_loss(lesion_weight=0.3)(y_true, y_pred))
    np.testing.assert_allclose(got[1], (50 * -np.log(0.9) + 50 * np.log(2)) / 100, rtol=1e-5)


def test_masks_follow_the_flips_and_rotations_of_their_volume():
    cube = np.zeros((16, 16, 16), np.float32)
    cube[3:9, 5:12, 4:10] = 1.0
    config = AugmentConfig(
        flip_axes=[0, 1], flip_probability=1.0, rotation_degrees=8.0, rotation_probability=1.0,
        intensity_scale=0.0, intensity_shift=0.0,
    )  # fmt: skip
    rng = np.random.default_rng(5)
    volume, mask = augment_volume(cube, rng, config, mask=cube.astype(np.uint8))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert not np.array_equal(mask, cube)  # it moved
    # The same voxels: the mask is the rotated cube's nearest-neighbour copy.
    agree = np.mean((volume > 0.5) == (mask == 1))
    assert agree > 0.99
    alone = augment_volume(cube, np.random.default_rng(5), config)
    np.testing.assert_array_equal(alone, volume)  # the mask changes nothing else


def test_batches_carry_mask_targets_with_weights_for_known_masks():
    images = np.zeros((3, 8, 8, 8), np.float16)
    masks = np.zeros((3, 8, 8, 8), np.uint8)
    masks[0, 1:3, 5:7, 0:2] = 1
    labels = np.array([1, 0, 1])
    has_mask = np.array([True, False, False])  # scan 2: a lesion without a mask file
    volumes = Volumes(images, labels, masks, has_mask, [])
    grids = {"gate_1": (4, 4, 4, 1), "pool_1": (4, 4, 4)}
    batches = VolumeBatches(volumes, batch_size=3, seed=0, mask_grids=grids)
    x, y, w = batches[0]
    order = list(batches.order)
    assert set(y) == {"probability", "gate_1", "pool_1"} and y["gate_1"].shape == (3, 4, 4, 4, 1)
    for row, scan in enumerate(order):
        expected = mask_on_grid(masks[scan], (4, 4, 4))
        np.testing.assert_array_equal(y["gate_1"][row, ..., 0], expected)
        np.testing.assert_array_equal(y["pool_1"][row], expected)
        assert w["gate_1"][row] == w["pool_1"][row] == (0.0 if scan == 2 else 1.0)
        assert y["probability"][row] == labels[scan]


def _planted(n, rng, shape=(16, 24, 16)):
    """Noise volumes; odd scans hold a bright 4-voxel cube at a random place (and its mask)."""
    images = rng.normal(size=(n, *shape)).astype(np.float16)
    masks = np.zeros((n, *shape), np.uint8)
    labels = np.arange(n) % 2
    for i in np.flatnonzero(labels):
        corner = [int(rng.integers(2, s - 6)) for s in shape]
        box = tuple(slice(c, c + 4) for c in corner)
        images[i][box] += 4.0
        masks[i][box] = 1
    return Volumes(images, labels, masks, np.ones(n, bool), [])


def test_supervised_gates_learn_to_point_at_the_lesions():
    keras.utils.set_random_seed(1)
    volumes = _planted(24, np.random.default_rng(0))
    config = resolve_config(None, ["optim.learning_rate=0.01", "jit_compile=false"])
    model = build_model(SMALL, PREPROCESS)
    fit_model, gates = compile_for_training(model, volumes, config)
    assert sorted(gates) == ["gate_0", "gate_1", "gate_2", "pool_0", "pool_1", "pool_2", "pool_3"]
    assert fit_model is not model
    assert fit_model.optimizer is model.optimizer
    grids = {name: tuple(t.shape[1:]) for name, t in gates.items()}
    batches = VolumeBatches(volumes, batch_size=4, seed=0, mask_grids=grids)
    gate_model = keras.Model(model.inputs, gates["gate_1"])

    def lesion_share():  # mean coefficient inside the lesion cells / mean elsewhere
        x = volumes.images[1::2].astype("float32")[..., None]
        alpha = np.asarray(gate_model.predict(x, verbose=0))[..., 0]
        cells = np.stack([mask_on_grid(m, alpha.shape[1:]) for m in volumes.masks[1::2]]) > 0
        return alpha[cells].mean() / alpha[~cells].mean()

    before = lesion_share()
    fit_model.fit(batches, epochs=12, verbose=0)
    after = lesion_share()
    print(f"lesion/background coefficient ratio: {before:.2f} -> {after:.2f}")
    assert after > 3.0 and after > 2 * before, (before, after)


def test_no_supervision_without_lesion_masks_weight_or_gates():
    volumes = _planted(4, np.random.default_rng(1))
    config = resolve_config(None, ["jit_compile=false"])
    unmasked = Volumes(volumes.images, volumes.labels, volumes.masks, np.zeros(4, bool), [])
    model = build_model(SMALL, PREPROCESS)
    fit_model, gates = compile_for_training(model, unmasked, config)
    assert fit_model is model and gates == {}
    off = resolve_config(None, ["optim.mask_loss_weight=0", "jit_compile=false"])
    assert compile_for_training(build_model(SMALL, PREPROCESS), volumes, off)[1] == {}
    vit = ModelConfig(name="vit", patch_size=8, hidden_dim=16, num_layers=1, num_heads=2,
                      intermediate_dim=16)  # fmt: skip
    assert compile_for_training(build_model(vit, PREPROCESS), volumes, config)[1] == {}


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.mask_loss_weight=-1", "mask_loss_weight"),
        ("optim.mask_positive_weight=0", "mask_positive_weight"),
        ("optim.mask_lesion_weight=0", "mask_lesion_weight"),
        ("optim.mask_weighting=per-voxel", "mask_weighting must be one of"),
    ],
)
def test_bad_mask_loss_settings_are_rejected(override, message):
    with pytest.raises(UserError, match=message):
        resolve_config(None, [override])


def test_forwarding_callback_shows_the_inner_callback_another_model():
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, self.model.name))

    inputs = keras.Input((3,))
    inner = keras.Model(inputs, keras.layers.Dense(1, name="out")(inputs), name="classifier")
    outer = keras.Model(inputs, {"out": inner.outputs[0]}, name="fit_model")
    outer.compile(optimizer="sgd", loss={"out": "mse"})
    x = np.zeros((4, 3), np.float32)
    outer.fit(x, {"out": np.zeros((4, 1))}, epochs=2, verbose=0,
              callbacks=[ForwardingCallback(Record(), inner)])  # fmt: skip
    assert seen == [(0, "classifier"), (1, "classifier")]
