"""Tests of `MultiHeadAttention`: layer checks, NumPy reference, Keras equivalence, GQA, cache,
sliding window. Tolerances: float32, 1e-5 absolute on O(1) outputs."""

import keras
import numpy as np
import pytest
from keras import ops

from tests.layer_testing import run_layer_test
from toolkit.layers import MultiHeadAttention

BACKEND = keras.backend.backend()


def np_(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


def _inputs(batch=2, q_len=6, k_len=9, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_len, dim)).astype("float32")
    v = rng.normal(size=(batch, k_len, dim)).astype("float32")
    return q, v


def _weights(layer):
    return {f"{w.path.split('/')[-2]}/{w.name}": np_(w) for w in layer.weights}


def numpy_mha(layer, query, value, value_mask=None, query_mask=None, causal=False, window=None):
    """NumPy projections -> per-head scores -> softmax -> weighted sum -> output projection."""
    w = _weights(layer)
    q = np.einsum("btd,dnh->btnh", query, w["query/kernel"]) + w["query/bias"]
    k = np.einsum("bsd,dkh->bskh", value, w["key/kernel"]) + w["key/bias"]
    v = np.einsum("bsd,dkh->bskh", value, w["value/kernel"]) + w["value/bias"]
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    t, s = scores.shape[2:]
    valid = np.ones(scores.shape, bool)
    if value_mask is not None:
        valid &= value_mask[:, None, None, :]
    pos_q = np.arange(t)[:, None] + s - t
    pos_k = np.arange(s)[None, :]
    if causal or window:
        valid &= pos_k <= pos_q
    if window:
        valid &= pos_k > pos_q - window
    scores = np.where(valid, scores, -1e30)
    e = np.exp(scores - scores.max(-1, keepdims=True)) * valid
    weights = e / np.maximum(e.sum(-1, keepdims=True), 1e-30)
    if query_mask is not None:
        weights = weights * query_mask[:, None, :, None]
    context = np.einsum("bnts,bsnh->btnh", weights, v)
    out = np.einsum("btnh,nho->bto", context, w["attention_output/kernel"])
    out = out + w["attention_output/bias"]
    if query_mask is not None:
        out = out * query_mask[:, :, None]
    return out, weights


@pytest.mark.parametrize(
    "init_kwargs",
    [
        {"num_heads": 4, "key_dim": 8},
        {"num_heads": 4, "key_dim": 8, "num_key_value_heads": 2, "dropout": 0.1, "seed": 1},
        {"num_heads": 2, "key_dim": 4, "value_dim": 6, "output_dim": 5, "use_bias": False},
        {"num_heads": 2, "key_dim": 4, "sliding_window": 3, "attention_implementation": "chunked"},
    ],
    ids=["mha", "gqa_dropout", "value_output_dims", "window_chunked"],
)
def test_layer_checks(init_kwargs, tmp_path):
    q, v = _inputs()
    out_dim = init_kwargs.get("output_dim", 16)
    run_layer_test(
        MultiHeadAttention,
        init_kwargs,
        [q, v],
        expected_output_shape=(2, 6, out_dim),
        tmp_path=tmp_path,
    )


def test_layer_checks_with_masks_and_causal(tmp_path):
    q, v = _inputs(k_len=6)
    query_mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
    value_mask = np.array([[1, 1, 1, 0, 1, 0], [1] * 6], bool)
    attention_mask = np.random.default_rng(3).random((2, 6, 6)) > 0.2
    run_layer_test(
        MultiHeadAttention,
        {"num_heads": 2, "key_dim": 8, "num_key_value_heads": 1},
        [q, v, v, query_mask, value_mask, attention_mask],
        call_kwargs={"use_causal_mask": True},
        expected_output_shape=(2, 6, 16),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("impl", ["explicit", "fused", "chunked"])
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_matches_numpy_reference(impl, kv_heads):
    q, v = _inputs()
    value_mask = np.array([[1] * 5 + [0] * 4, [0] * 9], bool)  # batch 1: nothing visible
    query_mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
    layer = MultiHeadAttention(4, 8, num_key_value_heads=kv_heads, attention_implementation=impl)
    out = layer(q, v, query_mask=query_mask, value_mask=value_mask, use_causal_mask=True)
    expected, _ = numpy_mha(layer, q, v, value_mask, query_mask, causal=True)
    np.testing.assert_allclose(np_(out), expected, atol=1e-5)
    # Nothing visible: the output is the output projection's bias, not NaN.
    bias = _weights(layer)["attention_output/bias"]
    np.testing.assert_allclose(np_(out)[1], np.broadcast_to(bias, (6, 16)), atol=1e-6)


def test_per_head_weights_match_numpy():
    q, v = _inputs()
    value_mask = np.array([[1] * 5 + [0] * 4, [1] * 9], bool)
    layer = MultiHeadAttention(4, 8, num_key_value_heads=2, value_dim=3, output_dim=5)
    out, weights = layer(q, v, value_mask=value_mask, return_attention_scores=True)
    expected, expected_w = numpy_mha(layer, q, v, value_mask)
    assert tuple(out.shape) == (2, 6, 5)
    assert tuple(weights.shape) == (2, 4, 6, 9)
    np.testing.assert_allclose(np_(weights), expected_w, atol=1e-6)
    np.testing.assert_allclose(np_(out), expected, atol=1e-5)


def _copy_into_keras_mha(ours, theirs):
    for name in ("query", "key", "value", "attention_output"):
        src = getattr(ours, f"{name}_dense" if name != "attention_output" else "output_dense")
        dst = getattr(theirs, f"_{name}_dense" if name != "attention_output" else "_output_dense")
        dst.set_weights(src.get_weights())


def test_matches_keras_multi_head_attention():
    q, v = _inputs()
    k = np.random.default_rng(9).normal(size=v.shape).astype("float32")
    attention_mask = np.random.default_rng(4).random((2, 6, 9)) > 0.3
    # Equal key/value head sizes: Keras' own layer fails on JAX otherwise (its fused call).
    ours = MultiHeadAttention(num_heads=4, key_dim=8)
    theirs = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)
    ours(q, v, k)
    theirs(q, v, k)
    _copy_into_keras_mha(ours, theirs)
    out, w = ours(q, v, k, attention_mask=attention_mask, return_attention_scores=True)
    ref, ref_w = theirs(q, v, k, attention_mask=attention_mask, return_attention_scores=True)
    np.testing.assert_allclose(np_(out), np_(ref), atol=1e-5)
    np.testing.assert_allclose(np_(w), np_(ref_w), atol=1e-6)


def test_gqa_with_all_heads_equals_plain_mha():
    q, v = _inputs()
    plain = MultiHeadAttention(4, 8)
    grouped = MultiHeadAttention(4, 8, num_key_value_heads=4)
    plain(q, v)
    grouped(q, v)
    grouped.set_weights(plain.get_weights())
    np.testing.assert_allclose(
        np_(grouped(q, v, use_causal_mask=True)), np_(plain(q, v, use_causal_mask=True)), atol=1e-6
    )


@pytest.mark.parametrize("impl", ["explicit", "fused", "chunked"])
def test_gqa_equals_mha_with_repeated_key_value_weights(impl):
    q, v = _inputs()
    gqa = MultiHeadAttention(4, 8, num_key_value_heads=2, attention_implementation=impl)
    mha = MultiHeadAttention(4, 8, attention_implementation=impl)
    gqa(q, v)
    mha(q, v)
    # Query head n uses key/value head n // 2: repeat each key/value head twice.
    mha.query_dense.set_weights(gqa.query_dense.get_weights())
    mha.output_dense.set_weights(gqa.output_dense.get_weights())
    for name in ("key_dense", "value_dense"):
        kernel, bias = getattr(gqa, name).get_weights()
        assert kernel.shape == (16, 2, 8)  # K/V are stored for 2 heads only
        getattr(mha, name).set_weights([np.repeat(kernel, 2, axis=1), np.repeat(bias, 2, axis=0)])
    out_gqa, w_gqa = gqa(q, v, use_causal_mask=True, return_attention_scores=True)
    out_mha, w_mha = mha(q, v, use_causal_mask=True, return_attention_scores=True)
    np.testing.assert_allclose(np_(out_gqa), np_(out_mha), atol=1e-5)
    np.testing.assert_allclose(np_(w_gqa), np_(w_mha), atol=1e-6)
    np.testing.assert_allclose(np_(gqa(q, v)), np_(mha(q, v)), atol=1e-5)


@pytest.mark.parametrize(
    "init_kwargs",
    [
        {"num_heads": 4, "key_dim": 8},
        {"num_heads": 4, "key_dim": 8, "num_key_value_heads": 1},
        {"num_heads": 2, "key_dim": 8, "sliding_window": 3},
    ],
    ids=["mha", "mqa", "window"],
)
def test_cached_decoding_equals_full_causal_pass(init_kwargs):
    x, _ = _inputs(q_len=8)
    layer = MultiHeadAttention(**init_kwargs)
    full, full_w = layer(x, x, use_causal_mask=True, return_attention_scores=True)
    cache = layer.init_cache(batch_size=2, max_length=10)
    assert tuple(cache.shape) == (
        2,
        2,
        10,
        init_kwargs.get("num_key_value_heads", init_kwargs["num_heads"]),
        8,
    )
    # A prompt of 3 positions at once, then one position at a time.
    out, w, cache = layer(
        x[:, :3],
        x[:, :3],
        use_causal_mask=True,
        cache=cache,
        cache_update_index=0,
        return_attention_scores=True,
    )
    outputs, step_weights = [np_(out)], [np_(w)]
    for i in range(3, 8):
        out, w, cache = layer(
            x[:, i : i + 1],
            x[:, i : i + 1],
            use_causal_mask=True,
            cache=cache,
            cache_update_index=i,
            return_attention_scores=True,
        )
        outputs.append(np_(out))
        step_weights.append(np_(w))
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), np_(full), atol=1e-5)
    # Weights over the 10-position cache: the first 8 columns equal the full pass, the rest 0.
    cached_w = np.concatenate(step_weights, axis=2)
    np.testing.assert_allclose(cached_w[..., :8], np_(full_w), atol=1e-6)
    np.testing.assert_array_equal(cached_w[..., 8:], 0.0)
    # The cache holds the projected keys and values of all 8 positions.
    np.testing.assert_allclose(np_(cache)[:, 0, :8], np_(layer.key_dense(x)), atol=1e-5)
    np.testing.assert_allclose(np_(cache)[:, 1, :8], np_(layer.value_dense(x)), atol=1e-5)


def test_compiled_decoding_loop_with_traced_index():
    """Cache index as a traced value inside a compiled loop (the slab/offset paths)."""
    x, _ = _inputs(q_len=8)
    layer = MultiHeadAttention(2, 8, num_key_value_heads=1, sliding_window=3)
    full = np_(layer(x, x, use_causal_mask=True))
    cache = layer.init_cache(2, 8)

    def body(i, carry):
        cache, outputs = carry
        token = ops.slice(ops.convert_to_tensor(x), (0, i, 0), (2, 1, 16))
        out, cache = layer(token, token, use_causal_mask=True, cache=cache, cache_update_index=i)
        outputs = ops.slice_update(outputs, (0, i, 0), out)
        return cache, outputs

    def decode(cache):
        return ops.fori_loop(0, 8, body, (cache, ops.zeros((2, 8, 16))))[1]

    if BACKEND == "tensorflow":
        import tensorflow as tf

        decode = tf.function(decode)
    else:
        import jax

        decode = jax.jit(decode)
    np.testing.assert_allclose(np_(decode(cache)), full, atol=1e-5)


def test_cross_attention_cache_equals_direct_attention():
    q, v = _inputs()
    value_mask = np.array([[1] * 7 + [0] * 2, [1] * 9], bool)
    layer = MultiHeadAttention(4, 8, num_key_value_heads=2)
    direct = layer(q, v, value_mask=value_mask)
    cache = layer.compute_cache(v)
    assert tuple(cache.shape) == (2, 2, 9, 2, 8)
    cached, same_cache = layer(q, v, value_mask=value_mask, cache=cache)
    np.testing.assert_allclose(np_(cached), np_(direct), atol=1e-5)
    np.testing.assert_array_equal(np_(same_cache), np_(cache))


def test_non_causal_cache_masks_unwritten_positions():
    x, _ = _inputs(q_len=4)
    layer = MultiHeadAttention(2, 8)
    cache = layer.init_cache(2, 7)
    out, w, _ = layer(x, x, cache=cache, cache_update_index=0, return_attention_scores=True)
    np.testing.assert_allclose(np_(out), np_(layer(x, x)), atol=1e-5)
    np.testing.assert_array_equal(np_(w)[..., 4:], 0.0)


@pytest.mark.parametrize("window", [8, 20])
def test_sliding_window_at_least_length_equals_full_causal(window):
    x, _ = _inputs(q_len=8)
    windowed = MultiHeadAttention(2, 8, sliding_window=window)
    causal = MultiHeadAttention(2, 8)
    windowed(x, x)
    causal(x, x)
    causal.set_weights(windowed.get_weights())
    np.testing.assert_allclose(
        np_(windowed(x, x)), np_(causal(x, x, use_causal_mask=True)), atol=1e-6
    )


def test_sliding_window_matches_numpy_and_chunked_equals_explicit():
    x, _ = _inputs(batch=1, q_len=40, dim=8)
    explicit = MultiHeadAttention(2, 4, sliding_window=5, attention_implementation="explicit")
    chunked = MultiHeadAttention(2, 4, sliding_window=5, attention_implementation="chunked")
    explicit(x, x)
    chunked(x, x)
    chunked.set_weights(explicit.get_weights())
    expected, _ = numpy_mha(explicit, x, x, window=5)
    np.testing.assert_allclose(np_(explicit(x, x)), expected, atol=1e-5)
    np.testing.assert_allclose(np_(chunked(x, x)), expected, atol=1e-5)


def test_dropout_on_weights_in_training_only():
    x, _ = _inputs()
    layer = MultiHeadAttention(2, 8, dropout=0.5, seed=0)
    inference = np_(layer(x, x, training=False))
    np.testing.assert_allclose(inference, numpy_mha(layer, x, x)[0], atol=1e-5)
    assert np.abs(np_(layer(x, x, training=True)) - inference).max() > 1e-3


def test_symbolic_outputs_with_cache_and_scores():
    query = keras.Input((1, 16))
    cache = keras.Input((2, 10, 2, 8))
    layer = MultiHeadAttention(4, 8, num_key_value_heads=2, output_dim=12)
    out, weights, new_cache = layer(
        query, query, cache=cache, cache_update_index=3, return_attention_scores=True
    )
    assert tuple(out.shape) == (None, 1, 12)
    assert tuple(weights.shape) == (None, 4, 1, 10)
    assert tuple(new_cache.shape) == (None, 2, 10, 2, 8)
    assert layer.compute_output_shape((None, 1, 16), (None, 5, 16)) == (None, 1, 12)


def test_config_round_trip_of_every_argument():
    layer = MultiHeadAttention(
        num_heads=4,
        key_dim=8,
        value_dim=6,
        num_key_value_heads=2,
        dropout=0.2,
        use_bias=False,
        output_dim=10,
        sliding_window=16,
        attention_implementation="chunked",
        kernel_initializer="he_normal",
        bias_initializer="ones",
        kernel_regularizer="l2",
        bias_regularizer="l1",
        seed=7,
    )
    config = layer.get_config()
    clone = MultiHeadAttention.from_config(config)
    assert clone.get_config() == config
    for name in ("value_dim", "num_key_value_heads", "sliding_window", "output_dim", "seed"):
        assert getattr(clone, name) == getattr(layer, name)
    assert config["attention_implementation"] == "chunked"
    assert isinstance(clone.kernel_initializer, keras.initializers.HeNormal)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_heads=0, key_dim=8), "num_heads must be a positive int"),
        (dict(num_heads=4, key_dim=8, num_key_value_heads=3), "num_key_value_heads must divide"),
        (dict(num_heads=4, key_dim=8, dropout=1.0), "dropout must be in"),
        (dict(num_heads=4, key_dim=8, sliding_window=0), "sliding_window must be a positive"),
        (dict(num_heads=4, key_dim=8, attention_implementation="x"), "must be one of"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(**kwargs)


def test_cache_needs_equal_key_and_value_dims():
    layer = MultiHeadAttention(2, 8, value_dim=4)
    with pytest.raises(ValueError, match="value_dim == key_dim"):
        layer.init_cache(1, 4)
