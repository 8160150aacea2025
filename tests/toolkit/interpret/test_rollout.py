"""Tests of attention_rollout against a NumPy reference and its identity property."""

import keras
import numpy as np
import pytest

from toolkit.interpret import attention_rollout


def _random_attention(rng, shape):
    logits = rng.normal(size=shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype("float32")


def _reference(weights_list, head_fusion, add_residual):
    """Loop over batch elements: A_l = norm(0.5 W_l + 0.5 I), R = A_L ... A_1."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion]
    batch = weights_list[0].shape[0]
    result = []
    for b in range(batch):
        joint = None
        for w in weights_list:
            a = fuse(w[b], axis=0) if w.ndim == 4 else w[b]
            a = a.astype("float64")
            if add_residual:
                a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
                a = a / a.sum(-1, keepdims=True)
            joint = a if joint is None else a @ joint
        result.append(joint)
    return np.stack(result)


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("add_residual", [True, False])
def test_matches_numpy_reference(head_fusion, add_residual):
    rng = np.random.default_rng(0)
    weights = [_random_attention(rng, (2, 3, 5, 5)) for _ in range(4)]
    got = attention_rollout(weights, head_fusion=head_fusion, add_residual=add_residual)
    assert isinstance(got, np.ndarray) and got.shape == (2, 5, 5)
    np.testing.assert_allclose(got, _reference(weights, head_fusion, add_residual), rtol=1e-5)


def test_rows_stay_distributions_with_mean_fusion():
    rng = np.random.default_rng(1)
    weights = [_random_attention(rng, (2, 4, 6, 6)) for _ in range(3)]
    got = attention_rollout(weights)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
    assert np.all(got >= 0.0)


def test_identity_attention_gives_identity():
    eye = np.broadcast_to(np.eye(7, dtype="float32"), (2, 4, 7, 7)).copy()
    for add_residual in (True, False):
        got = attention_rollout([eye] * 5, add_residual=add_residual)
        np.testing.assert_allclose(got, np.broadcast_to(np.eye(7), (2, 7, 7)), atol=1e-6)


def test_single_layer_is_half_residual_mix():
    w = _random_attention(np.random.default_rng(2), (1, 4, 4))
    got = attention_rollout([w])
    np.testing.assert_allclose(got, 0.5 * w + 0.5 * np.eye(4), rtol=1e-6)
    assert not np.allclose(got, w)


def test_tensors_in_tensor_out_and_mixed_ranks():
    rng = np.random.default_rng(3)
    per_head = _random_attention(rng, (2, 2, 4, 4))
    fused = _random_attention(rng, (2, 4, 4))
    got = attention_rollout([keras.ops.convert_to_tensor(per_head), fused])
    assert not isinstance(got, np.ndarray)
    expected = _reference([per_head, fused], "mean", True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, rtol=1e-5)


def test_zero_rows_become_identity_rows():
    w = _random_attention(np.random.default_rng(4), (1, 3, 3))
    w[0, 2] = 0.0  # a fully masked query row
    got = attention_rollout([w])
    np.testing.assert_allclose(got[0, 2], [0.0, 0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    "weights, kwargs, message",
    [
        ([], {}, "at least one layer"),
        ([np.ones((1, 3, 3))], {"head_fusion": "sum"}, "head_fusion must be one of"),
        ([np.ones((1, 3, 4))], {}, "square self-attention"),
        ([np.ones((1, 3, 3)), np.ones((1, 4, 4))], {}, "same B and T"),
        ([np.ones((3, 3))], {}, r"\(B, N, T, T\) or \(B, T, T\)"),
    ],
)
def test_bad_inputs_raise(weights, kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention_rollout(weights, **kwargs)
