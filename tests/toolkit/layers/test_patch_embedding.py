"""Tests of PatchEmbedding: layer battery in 2D/3D, NumPy reference, grid bookkeeping."""

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import PatchEmbedding


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _reference(layer, x):
    """Flatten each patch (row-major grid), project with the conv kernel, add the embeddings."""
    kernel = _np(layer._projection.kernel)  # (*p, C, E)
    rank = x.ndim - 2
    patch = kernel.shape[:rank]
    b, c = x.shape[0], x.shape[-1]
    grid = tuple(s // p for s, p in zip(x.shape[1:-1], patch))
    blocks = x.reshape((b,) + tuple(v for pair in zip(grid, patch) for v in pair) + (c,))
    order = [0] + [1 + 2 * i for i in range(rank)] + [2 + 2 * i for i in range(rank)]
    blocks = blocks.transpose(order + [blocks.ndim - 1])  # (B, *grid, *p, C)
    tokens = blocks.reshape(b, int(np.prod(grid)), -1) @ kernel.reshape(-1, kernel.shape[-1])
    tokens = tokens + _np(layer._projection.bias)
    if layer.use_class_token:
        cls = np.broadcast_to(_np(layer.class_token), (b, 1, tokens.shape[-1]))
        tokens = np.concatenate([cls, tokens], axis=1)
    if layer.use_position_embedding:
        tokens = tokens + _np(layer.position_embedding)[None]
    return tokens


@pytest.mark.parametrize(
    "init_kwargs, shape, expected",
    [
        ({"patch_size": 4, "hidden_dim": 6}, (2, 8, 12, 3), (2, 6, 6)),
        (
            {"patch_size": (4, 4, 2), "hidden_dim": 6, "use_class_token": True},
            (2, 8, 8, 4, 1),
            (2, 9, 6),
        ),
    ],
    ids=["2d", "3d_class_token"],
)
def test_layer_battery(init_kwargs, shape, expected, tmp_path):
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    run_layer_test(
        PatchEmbedding, init_kwargs, x, expected_output_shape=expected, tmp_path=tmp_path
    )


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({"patch_size": 2}, (2, 4, 6, 3)),
        ({"patch_size": (2, 3), "use_class_token": True}, (1, 4, 9, 2)),
        ({"patch_size": (2, 2, 3), "use_class_token": True}, (2, 4, 6, 6, 2)),
        ({"patch_size": 2, "use_position_embedding": False}, (2, 4, 4, 4, 1)),
    ],
)
def test_matches_numpy_reference(kwargs, shape):
    x = np.random.default_rng(1).normal(size=shape).astype("float32")
    layer = PatchEmbedding(hidden_dim=5, bias_initializer="random_normal", **kwargs)
    out = _np(layer(x))
    np.testing.assert_allclose(out, _reference(layer, x), rtol=1e-5, atol=1e-5)
    assert out.shape[1] == int(np.prod(layer.grid_shape)) + int(layer.use_class_token)
    assert (layer.position_embedding is None) != layer.use_position_embedding


def test_grid_shape_maps_tokens_back_to_patch_locations():
    layer = PatchEmbedding(
        patch_size=(2, 4, 3), hidden_dim=4, use_class_token=True, use_position_embedding=False
    )
    x = np.zeros((1, 6, 8, 9, 1), "float32")
    x[0, 2:4, 4:8, 6:9] = 1.0  # only the patch at grid position (1, 1, 2) is non-zero
    tokens = _np(layer(x))
    assert layer.grid_shape == (3, 2, 3) == layer.compute_grid_shape(x.shape)
    assert layer.num_patches == 18
    bias = _np(layer._projection.bias)
    per_patch = np.abs(tokens[0, 1:] - bias).sum(-1)  # (P,), the class token dropped
    heatmap = per_patch.reshape(layer.grid_shape)
    assert np.unravel_index(np.argmax(heatmap), heatmap.shape) == (1, 1, 2)
    assert np.count_nonzero(heatmap > 1e-6) == 1


def test_compute_output_shape_without_build():
    layer = PatchEmbedding(patch_size=4, hidden_dim=8, use_class_token=True)
    assert layer.compute_output_shape((None, 16, 16, 8, 2)) == (None, 33, 8)
    assert layer.compute_grid_shape((None, 16, 16, 8, 2)) == (4, 4, 2)


@pytest.mark.parametrize(
    "kwargs, shape, message",
    [
        ({"patch_size": 4, "hidden_dim": 2}, (1, 10, 8, 1), "divisible by the patch size"),
        ({"patch_size": (2, 2), "hidden_dim": 2}, (1, 4, 4, 4, 1), "patch_size has 2 entries"),
        ({"patch_size": 2, "hidden_dim": 2}, (1, 4, 1), r"\(B, H, W, C\) or \(B, D, H, W, C\)"),
    ],
)
def test_bad_inputs_raise(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        PatchEmbedding(**kwargs)(np.zeros(shape, "float32"))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        PatchEmbedding(patch_size=0, hidden_dim=4)
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        PatchEmbedding(patch_size=2, hidden_dim=-1)
    with pytest.raises(ValueError, match="known once the layer is built"):
        PatchEmbedding(patch_size=2, hidden_dim=4).grid_shape  # noqa: B018
