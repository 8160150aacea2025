"""Tests for `TransformerDecoderBlock`: cached decoding equals the full pass, masks, weights."""

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import TransformerDecoderBlock

RNG = np.random.default_rng(5)
B, T, S, D, DE, N, H = 2, 5, 7, 16, 12, 4, 8


def _inputs():
    decoder = RNG.normal(size=(B, T, D)).astype("float32")
    encoder = RNG.normal(size=(B, S, DE)).astype("float32")
    return decoder, encoder


ENCODER_MASK = np.array([[True] * S, [True] * 4 + [False] * 3])


@pytest.mark.parametrize(
    "init_kwargs",
    [
        {"num_heads": N, "key_dim": H, "intermediate_dim": 32, "dropout": 0.1},
        {
            "num_heads": N,
            "key_dim": H,
            "intermediate_dim": 32,
            "num_key_value_heads": 1,
            "activation": "relu",
            "normalize_first": False,
            "layer_norm_epsilon": 1e-6,
        },
    ],
)
def test_layer_battery(init_kwargs, tmp_path):
    decoder, encoder = _inputs()
    run_layer_test(
        TransformerDecoderBlock,
        init_kwargs,
        [decoder, encoder],
        expected_output_shape=(B, T, D),
        tmp_path=tmp_path,
        atol=1e-4,
        # One fit step per block class is enough to show gradients reach every weight.
        run_training=init_kwargs.get("normalize_first", True),
    )


def _manual_block(block, x, encoder, encoder_mask):
    """The block's formula composed from its own sublayers (pre- or post-norm)."""

    def self_attention(h):
        return block.self_attention(h, h, use_causal_mask=True)

    def cross_attention(h):
        return block.cross_attention(h, encoder, value_mask=encoder_mask)

    if block.normalize_first:
        x = x + self_attention(block.self_attention_norm(x))
        x = x + cross_attention(block.cross_attention_norm(x))
        return x + block.feed_forward(block.feed_forward_norm(x))
    x = block.self_attention_norm(x + self_attention(x))
    x = block.cross_attention_norm(x + cross_attention(x))
    return block.feed_forward_norm(x + block.feed_forward(x))


@pytest.mark.parametrize("normalize_first", [True, False])
def test_matches_composition_of_sublayers(normalize_first):
    decoder, encoder = _inputs()
    block = TransformerDecoderBlock(N, H, 32, normalize_first=normalize_first)
    out = block(decoder, encoder, encoder_padding_mask=ENCODER_MASK)
    expected = _manual_block(block, decoder, encoder, ENCODER_MASK)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_post_norm_differs_from_pre_norm_with_the_same_weights():
    decoder, encoder = _inputs()
    pre = TransformerDecoderBlock(N, H, 32)
    post = TransformerDecoderBlock(N, H, 32, normalize_first=False)
    pre(decoder, encoder)
    post(decoder, encoder)
    post.set_weights(pre.get_weights())
    out_pre = np.asarray(pre(decoder, encoder))
    out_post = np.asarray(post(decoder, encoder))
    assert np.max(np.abs(out_pre - out_post)) > 1e-2
    np.testing.assert_allclose(out_post.mean(-1), 0.0, atol=1e-5)


def test_weights_shapes_causality_and_encoder_padding():
    decoder, encoder = _inputs()
    block = TransformerDecoderBlock(N, H, 32, num_key_value_heads=2)
    out, self_weights, cross_weights = block(
        decoder, encoder, encoder_padding_mask=ENCODER_MASK, return_attention_scores=True
    )
    self_weights, cross_weights = np.asarray(self_weights), np.asarray(cross_weights)
    assert tuple(out.shape) == (B, T, D)
    assert self_weights.shape == (B, N, T, T)
    assert cross_weights.shape == (B, N, T, S)
    upper = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(self_weights[:, :, upper] == 0.0)
    np.testing.assert_allclose(self_weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(cross_weights[1, :, :, 4:] == 0.0)
    np.testing.assert_allclose(cross_weights.sum(-1), 1.0, atol=1e-5)


def test_symbolic_weights_shapes():
    block = TransformerDecoderBlock(N, H, 32)
    out, self_weights, cross_weights = block(
        keras.Input((None, D)), keras.Input((S, DE)), return_attention_scores=True
    )
    assert tuple(out.shape) == (None, None, D)
    assert tuple(self_weights.shape) == (None, N, None, None)
    assert tuple(cross_weights.shape) == (None, N, None, S)


@pytest.mark.parametrize(
    "init_kwargs",
    [{}, {"normalize_first": False, "num_key_value_heads": 2, "activation": "swiglu"}],
)
def test_cached_step_by_step_decoding_equals_full_causal_pass(init_kwargs):
    decoder, encoder = _inputs()
    block = TransformerDecoderBlock(N, H, 32, **init_kwargs)
    full, full_self, full_cross = block(
        decoder, encoder, encoder_padding_mask=ENCODER_MASK, return_attention_scores=True
    )
    max_length = T + 2  # longer than needed: unused cache slots must not be attended to
    self_cache = block.init_self_attention_cache(B, max_length)
    heads = init_kwargs.get("num_key_value_heads", N)
    assert tuple(self_cache.shape) == (B, 2, max_length, heads, H)
    cross_cache = block.compute_cross_attention_cache(encoder)
    assert tuple(cross_cache.shape) == (B, 2, S, heads, H)
    for i in range(T):
        step, self_w, cross_w, self_cache, cross_cache = block(
            decoder[:, i : i + 1],
            encoder,
            encoder_padding_mask=ENCODER_MASK,
            self_attention_cache=self_cache,
            self_attention_cache_update_index=i,
            cross_attention_cache=cross_cache,
            return_attention_scores=True,
        )
        np.testing.assert_allclose(
            np.asarray(step), np.asarray(full)[:, i : i + 1], atol=1e-5, rtol=1e-5
        )
        self_w = np.asarray(self_w)
        assert self_w.shape == (B, N, 1, max_length)
        np.testing.assert_allclose(
            self_w[..., :T], np.asarray(full_self)[:, :, i : i + 1], atol=1e-5
        )
        assert np.all(self_w[..., i + 1 :] == 0.0)
        np.testing.assert_allclose(
            np.asarray(cross_w), np.asarray(full_cross)[:, :, i : i + 1], atol=1e-5
        )


def test_prefill_then_step_with_tensor_index_and_cross_cache_from_encoder():
    decoder, encoder = _inputs()
    block = TransformerDecoderBlock(N, H, 32)
    full = np.asarray(block(decoder, encoder))
    self_cache = block.init_self_attention_cache(B, T)
    # Only a self cache: the cross cache is computed from `encoder` and returned for reuse.
    prefill, self_cache, cross_cache = block(
        decoder[:, :3],
        encoder,
        self_attention_cache=self_cache,
        self_attention_cache_update_index=0,
    )
    np.testing.assert_allclose(np.asarray(prefill), full[:, :3], atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(cross_cache), np.asarray(block.compute_cross_attention_cache(encoder)), atol=1e-6
    )
    for i in range(3, T):
        index = keras.ops.convert_to_tensor(i, "int32")
        # The encoder output itself is not needed once its cache exists.
        step, self_cache, cross_cache = block(
            decoder[:, i : i + 1],
            self_attention_cache=self_cache,
            self_attention_cache_update_index=index,
            cross_attention_cache=cross_cache,
        )
        np.testing.assert_allclose(np.asarray(step), full[:, i : i + 1], atol=1e-5)


def test_decoder_only_block_has_no_cross_attention():
    decoder, _ = _inputs()
    block = TransformerDecoderBlock(N, H, 32)
    out, self_weights, cross_weights = block(decoder, return_attention_scores=True)
    assert block.cross_attention is None
    assert cross_weights is None
    assert tuple(out.shape) == (B, T, D)
    assert np.all(np.asarray(self_weights)[:, :, np.triu(np.ones((T, T), bool), k=1)] == 0.0)
    with pytest.raises(ValueError, match="has no cross-attention"):
        block.compute_cross_attention_cache(np.zeros((B, S, DE), "float32"))


def test_decoder_padding_mask_zeroes_padded_keys():
    decoder, encoder = _inputs()
    block = TransformerDecoderBlock(N, H, 32, use_bias=False)
    mask = np.array([[True] * T, [True] * 3 + [False] * 2])
    out, self_weights, _ = block(
        decoder, encoder, decoder_padding_mask=mask, return_attention_scores=True
    )
    noisy = decoder.copy()
    noisy[1, 3:] = 10.0
    out_noisy = block(noisy, encoder, decoder_padding_mask=mask)
    np.testing.assert_allclose(np.asarray(out)[1, :3], np.asarray(out_noisy)[1, :3], atol=1e-5)
    assert np.all(np.asarray(self_weights)[1, :, :, 3:] == 0.0)
