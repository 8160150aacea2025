"""Heatmaps: Grad-CAM against a hand-computed model, its sign, batching, native maps, rollout."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipelines.medimg.heatmaps import (
    grad_cam,
    heatmap_model,
    native_heatmaps,
    normalize_maps,
    resolve_jit,
)
from pipelines.medimg.model import ModelConfig, build_model
from pipelines.medimg.preprocess import PreprocessConfig
from toolkit.interpret import upsample_map

SHAPE = (8, 8, 8)


def linear_model(weight):
    """features = x (1x1x1 conv, kernel 1) -> mean over voxels -> logit = weight * mean."""
    inputs = keras.Input((*SHAPE, 1))
    features = keras.layers.Conv3D(1, 1, use_bias=False, name="features")(inputs)
    pooled = keras.layers.GlobalAveragePooling3D()(features)
    logit = keras.layers.Dense(1, name="logit")(pooled)
    output = keras.layers.Activation("sigmoid")(logit)
    model = keras.Model(inputs, output)
    model.get_layer("features").set_weights([np.ones((1, 1, 1, 1, 1), np.float32)])
    model.get_layer("logit").set_weights([np.full((1, 1), weight, np.float32), np.zeros(1)])
    return model


def images_with_bright_voxels():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 0.2, size=(3, *SHAPE, 1)).astype(np.float32)
    peaks = [(1, 2, 3), (6, 5, 0), (4, 4, 7)]
    for b, peak in enumerate(peaks):
        images[(b, *peak, 0)] = 1.0
    return images, peaks


def test_grad_cam_matches_the_hand_computed_map():
    # dS/dA = w / 512 everywhere, so the channel weight is w / 512 and the map is (w / 512) x.
    model = linear_model(3.0)
    images, _ = images_with_bright_voxels()
    probabilities, maps = grad_cam(model, images, relu=False, normalize=False)
    np.testing.assert_allclose(maps, 3.0 / 512 * images[..., 0], rtol=1e-5, atol=1e-8)
    expected = 1 / (1 + np.exp(-3.0 * images.mean(axis=(1, 2, 3, 4))))
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)


def test_grad_cam_keeps_the_sign_most_important_voxel_is_highest():
    images, peaks = images_with_bright_voxels()
    _, positive = grad_cam(linear_model(2.0), images)
    for b, peak in enumerate(peaks):
        assert np.unravel_index(positive[b].argmax(), SHAPE) == peak
        assert positive[b][peak] == pytest.approx(1.0)
    # A voxel that speaks against the lesion class is negative, not flipped into a peak.
    _, signed = grad_cam(linear_model(-2.0), images, relu=False, normalize=False)
    for b, peak in enumerate(peaks):
        assert np.unravel_index(signed[b].argmin(), SHAPE) == peak
        assert signed[b][peak] < 0
    # ... and is the most important voxel for the other class.
    _, negative_class = grad_cam(linear_model(-2.0), images, class_index=0)
    for b, peak in enumerate(peaks):
        assert np.unravel_index(negative_class[b].argmax(), SHAPE) == peak
    # With the ReLU, evidence against the class is dropped: the map is all zero.
    _, relu = grad_cam(linear_model(-2.0), images, normalize=False)
    assert np.all(relu == 0.0)


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(3)  # untrained weights: the same maps in every run
    preprocess = PreprocessConfig(shape=(16, 24, 16))
    gated = build_model(ModelConfig(filters=[4, 8, 8, 16], gate_dim=4, pooling_dim=8), preprocess)
    vit = build_model(
        ModelConfig(
            name="vit", patch_size=8, hidden_dim=16, num_layers=2, num_heads=2, intermediate_dim=32
        ),
        preprocess,
    )
    images = np.random.default_rng(1).normal(size=(3, 16, 24, 16, 1)).astype(np.float32)
    return {"attention-gated": gated, "vit": vit}, images


@pytest.mark.parametrize("name", ["attention-gated", "vit"])
@pytest.mark.parametrize("method", ["native", "gradcam"])
def test_maps_are_batched_per_scan_in_unit_range(models, name, method):
    model = models[0][name]
    images = models[1]
    compute = native_heatmaps if method == "native" else grad_cam
    probabilities, maps = compute(model, images, batch_size=2)
    assert maps.shape == (3, 16, 24, 16)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    peaks = maps.reshape(3, -1).max(axis=1)
    if method == "gradcam":
        # Grad-CAM keeps positive evidence only: an untrained model may have none for a scan
        # (an all-zero map); every other map is scaled to a maximum of 1.
        assert np.any(peaks > 0)
        peaks = peaks[peaks > 0]
    np.testing.assert_allclose(peaks, 1.0, atol=1e-5)
    np.testing.assert_allclose(
        probabilities, np.asarray(model.predict(images, verbose=0)).reshape(-1), atol=1e-5
    )
    # Batching does not mix scans: one scan alone gives the same map.
    _, single = compute(model, images[1:2], batch_size=1)
    np.testing.assert_allclose(single[0], maps[1], atol=1e-4)


def test_native_map_of_the_gated_model_is_pooling_times_gates(models):
    model, images = models[0]["attention-gated"], models[1]
    raw = heatmap_model(model).predict_on_batch(images)
    assert set(raw) == {"probability", "gate/gate_0", "gate/gate_1", "gate/gate_2", "pool/pool_0",
                        "pool/pool_1", "pool/pool_2", "pool/pool_3"}  # fmt: skip
    expected = 0.0
    for stage in (0, 1, 2):
        weights = np.asarray(raw[f"pool/pool_{stage}"])
        np.testing.assert_allclose(weights.reshape(3, -1).sum(axis=1), 1.0, atol=1e-5)
        weights = weights / weights.reshape(3, -1).max(axis=1).reshape(3, 1, 1, 1)
        alpha = np.asarray(raw[f"gate/gate_{stage}"])[..., 0]
        expected = expected + upsample_map(weights * alpha, (16, 24, 16))
    _, maps = native_heatmaps(model, images)
    np.testing.assert_allclose(maps, normalize_maps(expected / 3), atol=1e-5)


def test_native_map_of_the_vit_is_the_class_token_rollout(models):
    model, images = models[0]["vit"], models[1]
    raw = heatmap_model(model).predict_on_batch(images)
    rollout = np.eye(13)[None].repeat(3, axis=0)  # 2 x 3 x 2 patches + the class token
    for name in ("attention/block_0", "attention/block_1"):
        weights = np.asarray(raw[name]).mean(axis=1)  # (B, N, T, T) -> (B, T, T)
        step = 0.5 * weights + 0.5 * np.eye(13)
        rollout = step / step.sum(axis=-1, keepdims=True) @ rollout
    grid = rollout[:, 0, 1:].reshape(3, 2, 3, 2)
    _, maps = native_heatmaps(model, images)
    np.testing.assert_allclose(maps, normalize_maps(upsample_map(grid, (16, 24, 16))), atol=1e-5)


def test_normalize_maps_and_jit_setting():
    maps = np.stack([np.arange(8.0).reshape(2, 2, 2), np.full((2, 2, 2), 3.0)])
    scaled = normalize_maps(maps)
    np.testing.assert_allclose(scaled[0], np.arange(8.0).reshape(2, 2, 2) / 7.0)
    assert np.all(scaled[1] == 0.0)
    assert resolve_jit("false") is False and resolve_jit(True) is True
    assert resolve_jit("auto") is (keras.backend.backend() != "tensorflow")
