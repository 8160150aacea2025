"""Models: shapes, native-map layers in the graph, self-contained `.keras` files, validation."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import keras
import numpy as np
import pytest

from pipelines.medimg.model import (
    ForegroundMask,
    ModelConfig,
    ScanPreprocessing,
    build_model,
    model_metadata,
    preprocess_config_of,
)
from pipelines.medimg.preprocess import PreprocessConfig
from tests.layer_testing import run_layer_test
from toolkit.layers import AttentionGate, GatedAttentionPooling, TransformerEncoderBlock

PREPROCESS = PreprocessConfig(spacing=(5.0, 5.0, 5.0), shape=(16, 24, 16), max_abs_z=6.0)
SMALL = {
    "attention-gated": ModelConfig(filters=[4, 8, 8, 16], gate_dim=4, pooling_dim=8),
    "vit": ModelConfig(
        name="vit", patch_size=8, hidden_dim=16, num_layers=2, num_heads=2, intermediate_dim=32
    ),
}


@pytest.mark.parametrize("name", ["attention-gated", "vit"])
def test_model_maps_volumes_to_probabilities_and_reloads_in_safe_mode(tmp_path, name):
    model = build_model(SMALL[name], PREPROCESS, metadata={"threshold": 0.4})
    images = np.random.default_rng(0).normal(size=(2, 16, 24, 16, 1)).astype(np.float32)
    probabilities = np.asarray(model.predict(images, verbose=0))
    assert probabilities.shape == (2, 1)
    assert np.all((probabilities > 0) & (probabilities < 1))
    assert model.get_layer("logit").output.shape == (None, 1)

    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)  # no custom_objects
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), probabilities, atol=1e-6)
    assert preprocess_config_of(reloaded) == PREPROCESS
    metadata = model_metadata(reloaded)
    assert metadata["architecture"] == name and metadata["threshold"] == 0.4
    assert metadata["class_names"] == ["normal", "lesion"]
    assert metadata["model_config"] == dataclasses.asdict(SMALL[name])
    # The parameters are plain JSON inside the archive, readable without Keras.
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    text = json.dumps(config)
    assert '"max_abs_z": 6.0' in text and '"spacing": [5.0, 5.0, 5.0]' in text


def test_attention_gated_model_gates_each_stage_with_deeper_ones_on_its_own_grid():
    model = build_model(SMALL["attention-gated"], PREPROCESS)
    gates = [layer for layer in model.layers if isinstance(layer, AttentionGate)]
    pools = [layer for layer in model.layers if isinstance(layer, GatedAttentionPooling)]
    assert [g.name for g in gates] == ["gate_0", "gate_1", "gate_2"]
    assert [p.name for p in pools] == ["pool_0", "pool_1", "pool_2", "pool_3"]
    # Stage grids halve: 16x24x16 -> stem 8x12x8 -> 4x6x4 -> 2x3x2 -> coarsest 1x2x1; one
    # coefficient per cell of the gated stage.
    assert tuple(gates[0].output[1].shape) == (None, 8, 12, 8, 1)
    assert tuple(gates[1].output[1].shape) == (None, 4, 6, 4, 1)
    assert tuple(gates[2].output[1].shape) == (None, 2, 3, 2, 1)
    assert tuple(pools[1].output[1].shape) == (None, 4, 6, 4)
    assert tuple(model.get_layer("stage3_b_relu").output.shape) == (None, 1, 2, 1, 16)
    # Gate 1's gating signal: stage 2 (8 channels) and the coarsest stage 3 (16), upsampled
    # to stage 1's grid (2x3x2 -> 4x6x4 and 1x2x1 -> 4x8x4, cropped to 4x6x4).
    assert tuple(model.get_layer("gating_1").output.shape) == (None, 4, 6, 4, 24)
    # The classifier reads the pooled features of stages 0-3 and the peak of each gate.
    assert model.get_layer("pooled").output.shape[-1] == 4 + 8 + 8 + 16 + 3


def test_vit_returns_attention_of_every_block():
    model = build_model(SMALL["vit"], PREPROCESS)
    blocks = [layer for layer in model.layers if isinstance(layer, TransformerEncoderBlock)]
    assert len(blocks) == 2
    # 2 x 3 x 2 patches of 8 voxels plus the class token; 2 heads.
    assert tuple(blocks[0].output[1].shape) == (None, 2, 13, 13)


def test_scan_preprocessing_layer_is_the_identity_and_round_trips(tmp_path):
    run_layer_test(
        ScanPreprocessing,
        init_kwargs={"preprocess": {"shape": [4, 4, 4]}, "metadata": {"threshold": 0.3}},
        input_data=np.ones((2, 4, 4, 4, 1), np.float32),
        expected_output_shape=(2, 4, 4, 4, 1),
        tmp_path=tmp_path,
        run_training=False,
    )
    x = np.random.default_rng(0).normal(size=(1, 4, 4, 4, 1)).astype(np.float32)
    np.testing.assert_array_equal(ScanPreprocessing({"shape": [4, 4, 4]})(x), x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"filters": [8]}, "filters needs at least two"),
        ({"gated_stages": [3]}, "gated_stages must be indices"),
        ({"gated_stages": [1, 1]}, "duplicates"),
        ({"num_heads": 3}, "divide hidden_dim"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"pooling_dim": 0}, "pooling_dim must be positive"),
    ],
)
def test_invalid_model_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_grid_must_fit_the_architecture():
    with pytest.raises(ValueError, match="divisible by model.patch_size"):
        build_model(dataclasses.replace(SMALL["vit"], patch_size=5), PREPROCESS)
    with pytest.raises(ValueError, match="too small"):
        build_model(ModelConfig(filters=[4, 4, 4, 4, 4, 4]), PREPROCESS)


def test_foreground_mask_matches_a_numpy_reference(tmp_path):
    rng = np.random.default_rng(2)
    volume = np.full((2, 8, 12, 8, 1), -3.0, np.float32)
    volume[0, 1:6, 2:11, 3:8] = rng.normal(1.0, 0.5, size=(5, 9, 5, 1))
    volume[1, 4:8, :, :] = 2.0
    mask = np.asarray(ForegroundMask(4)(volume))
    low = volume.min(axis=(1, 2, 3, 4), keepdims=True)
    high = volume.max(axis=(1, 2, 3, 4), keepdims=True)
    voxels = (volume > low + 0.1 * (high - low))[..., 0]
    share = voxels.reshape(2, 2, 4, 3, 4, 2, 4).mean(axis=(2, 4, 6))  # 4x4x4 blocks
    np.testing.assert_array_equal(mask, share >= 0.5)
    assert mask.shape == (2, 2, 3, 2) and mask[0].any() and not mask[0].all()
    run_layer_test(
        ForegroundMask,
        init_kwargs={"factor": 2, "fraction": 0.2, "coverage": 0.25},
        input_data=volume,
        expected_output_shape=(2, 4, 6, 4),
        tmp_path=tmp_path,
        run_training=False,
        run_mixed_precision=False,
    )
    with pytest.raises(ValueError, match="coverage"):
        ForegroundMask(2, coverage=0.0)


def test_attention_pooling_never_looks_at_air_or_padding():
    from pipelines.medimg.heatmaps import heatmap_model

    model = build_model(SMALL["attention-gated"], PREPROCESS)
    volume = np.full((1, 16, 24, 16, 1), -2.0, np.float32)
    volume[0, 4:12, 4:20, 4:12] = np.random.default_rng(0).normal(1.0, 0.3, (8, 16, 8, 1))
    raw = heatmap_model(model).predict_on_batch(volume)
    weights = np.asarray(raw["pool/pool_1"])[0]  # 4 x 6 x 4 cells of 4 voxels
    inside = np.zeros((4, 6, 4), bool)
    inside[1:3, 1:5, 1:3] = True
    assert np.all(weights[~inside] == 0.0)
    assert weights[inside].sum() == pytest.approx(1.0, abs=1e-5)
