"""Tests for `TransformerEncoderBlock`: structure, padding masks, weights, pre/post-norm."""

import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import TransformerEncoderBlock

RNG = np.random.default_rng(4)
B, T, D, N, H = 2, 6, 16, 4, 8


def _x(length=T):
    return RNG.normal(size=(B, length, D)).astype("float32")


def _manual_block(block, x, padding_mask=None):
    """The block's formula composed from its own sublayers (pre- or post-norm)."""

    def attention(h):
        return block.self_attention(h, h, query_mask=padding_mask, value_mask=padding_mask)

    if block.normalize_first:
        x = x + attention(block.self_attention_norm(x))
        return x + block.feed_forward(block.feed_forward_norm(x))
    x = block.self_attention_norm(x + attention(x))
    return block.feed_forward_norm(x + block.feed_forward(x))


@pytest.mark.parametrize(
    "init_kwargs",
    [
        {"num_heads": N, "key_dim": H, "intermediate_dim": 32, "dropout": 0.1},
        {
            "num_heads": N,
            "key_dim": H,
            "intermediate_dim": 32,
            "num_key_value_heads": 2,
            "activation": "swiglu",
            "normalize_first": False,
            "layer_norm_epsilon": 1e-6,
            "use_bias": False,
        },
    ],
)
def test_layer_battery(init_kwargs, tmp_path):
    run_layer_test(
        TransformerEncoderBlock,
        init_kwargs,
        _x(),
        expected_output_shape=(B, T, D),
        tmp_path=tmp_path,
        atol=1e-4,
        # One fit step per block class is enough to show gradients reach every weight.
        run_training=init_kwargs.get("normalize_first", True),
    )


@pytest.mark.parametrize("normalize_first", [True, False])
def test_matches_composition_of_sublayers(normalize_first):
    block = TransformerEncoderBlock(N, H, 32, normalize_first=normalize_first)
    x = _x()
    mask = np.array([[True] * T, [True] * 4 + [False] * 2])
    out = np.asarray(block(x, padding_mask=mask))
    np.testing.assert_allclose(out, np.asarray(_manual_block(block, x, mask)), atol=1e-5)


def test_post_norm_differs_from_pre_norm_with_the_same_weights():
    x = _x()
    pre = TransformerEncoderBlock(N, H, 32)
    post = TransformerEncoderBlock(N, H, 32, normalize_first=False)
    pre(x)
    post(x)
    post.set_weights(pre.get_weights())
    out_pre, out_post = np.asarray(pre(x)), np.asarray(post(x))
    assert np.max(np.abs(out_pre - out_post)) > 1e-2
    # Post-norm ends with a LayerNorm (zero mean per position); pre-norm does not.
    np.testing.assert_allclose(out_post.mean(-1), 0.0, atol=1e-5)
    assert np.max(np.abs(out_pre.mean(-1))) > 1e-3


def test_padded_keys_do_not_change_unpadded_outputs():
    block = TransformerEncoderBlock(N, H, 32, num_key_value_heads=2)
    x = _x()
    mask = np.array([[True] * T, [True] * 4 + [False] * 2])
    noisy = x.copy()
    noisy[1, 4:] = RNG.normal(size=(2, D)) * 10.0
    out, weights = block(x, padding_mask=mask, return_attention_scores=True)
    out_noisy = block(noisy, padding_mask=mask)
    np.testing.assert_allclose(np.asarray(out)[1, :4], np.asarray(out_noisy)[1, :4], atol=1e-5)
    # ...and equal the unpadded sequence processed alone.
    alone = block(x[1:, :4])
    np.testing.assert_allclose(np.asarray(out)[1, :4], np.asarray(alone)[0], atol=1e-5)
    weights = np.asarray(weights)
    assert weights.shape == (B, N, T, T)
    assert np.all(weights[1, :, :, 4:] == 0.0)
    np.testing.assert_allclose(weights[1, :, :4].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(weights[0].sum(-1), 1.0, atol=1e-5)


def test_attention_mask_is_combined_with_padding_mask():
    block = TransformerEncoderBlock(N, H, 32)
    x = _x()
    causal = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    padding = np.array([[True] * T, [True] * 5 + [False]])
    _, weights = block(x, padding_mask=padding, attention_mask=causal, return_attention_scores=True)
    weights = np.asarray(weights)
    allowed = causal[:, None] & padding[:, None, None, :] & padding[:, None, :, None]
    assert np.all(weights[~np.broadcast_to(allowed, weights.shape)] == 0.0)
    np.testing.assert_allclose(weights[0].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_heads": 0, "key_dim": 8, "intermediate_dim": 8}, "num_heads must be"),
        ({"num_heads": 4, "key_dim": 8, "intermediate_dim": -1}, "intermediate_dim must be"),
        (
            {"num_heads": 4, "key_dim": 8, "intermediate_dim": 8, "num_key_value_heads": 3},
            "num_key_value_heads must be a positive divisor",
        ),
        ({"num_heads": 4, "key_dim": 8, "intermediate_dim": 8, "dropout": 1.5}, "dropout"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerEncoderBlock(**kwargs)
