"""Tests of `toolkit.ops.scaled_dot_product_attention` against NumPy and across implementations.

Tolerances: float32 values 1e-5 and gradients 1e-4 (absolute, O(1) inputs); float16/bfloat16
compared with the float32 NumPy reference at 2e-2/6e-2, the precision of their 10/7-bit
mantissas on sums of O(1) terms.
"""

import keras
import numpy as np
import pytest
from keras import ops

from toolkit.ops import attention as attention_module
from toolkit.ops import scaled_dot_product_attention as _sdpa

BACKEND = keras.backend.backend()


def sdpa(*args, **kwargs):
    """The op under test. On JAX it runs under `jax.jit`: one compilation per call instead of one
    per primitive and shape in eager mode (which made this file several times slower)."""
    if BACKEND != "jax" or kwargs.get("seed") is not None:
        return _sdpa(*args, **kwargs)
    import jax

    arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    return jax.jit(lambda a, kw: _sdpa(*a, **kw, **static))(args, arrays)


IMPLS = ("explicit", "fused", "chunked")
# Small chunks so that the chunked path really runs several query and key blocks (and padding).
CHUNKS = {"query_chunk_size": 4, "key_chunk_size": 8}


def reference(q, k, v, mask=None, causal=False, window=None, offset=None):
    """NumPy attention in three steps: scores, softmax, weighted sum. Returns (output, weights)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, q_len, heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    k = np.repeat(k, heads // kv_heads, axis=2)
    v = np.repeat(v, heads // kv_heads, axis=2)
    # 1. scores
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(head_dim)
    valid = np.ones((batch, heads, q_len, k_len), dtype=bool)
    if mask is not None:
        valid &= np.broadcast_to(mask, valid.shape)
    offset = k_len - q_len if offset is None else offset
    query_pos = np.arange(q_len)[:, None] + offset
    key_pos = np.arange(k_len)[None, :]
    if causal or window is not None:
        valid &= key_pos <= query_pos
    if window is not None:
        valid &= key_pos > query_pos - window
    # 2. softmax over the visible keys; rows without any give zeros
    weights = np.zeros_like(scores)
    for idx in np.ndindex(batch, heads, q_len):
        row = valid[idx]
        if row.any():
            e = np.exp(scores[idx][row] - scores[idx][row].max())
            weights[idx][row] = e / e.sum()
    # 3. weighted sum
    return np.einsum("bnts,bsnh->btnh", weights, v), weights


def make(shape_q, shape_kv, seed=0, dtype="float32", value_dim=None):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=shape_q).astype(dtype)
    k = rng.normal(size=shape_kv).astype(dtype)
    v_shape = shape_kv if value_dim is None else (*shape_kv[:3], value_dim)
    v = rng.normal(size=v_shape).astype(dtype)
    return q, k, v


def padding_mask(batch, k_len, seed=1, empty_batch=True):
    """(B, 1, 1, S) padding mask; batch 0 has every key masked to test fully masked rows."""
    mask = np.random.default_rng(seed).random((batch, 1, 1, k_len)) > 0.3
    mask[..., 0] = True
    if empty_batch:
        mask[0] = False
    return mask


def np_(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


CASES = {
    "plain": dict(),
    "padding": dict(mask="padding"),
    "causal": dict(is_causal=True),
    "causal_padding": dict(is_causal=True, mask="padding"),
    "attention_mask_4d": dict(mask="full"),
    "causal_offset": dict(is_causal=True, query_offset=3),
}


def _case_kwargs(case, batch, heads, q_len, k_len):
    kwargs = dict(CASES[case])
    if kwargs.get("mask") == "padding":
        kwargs["mask"] = padding_mask(batch, k_len)
    elif kwargs.get("mask") == "full":
        kwargs["mask"] = np.random.default_rng(5).random((batch, heads, q_len, k_len)) > 0.5
    return kwargs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    "shapes",
    [((2, 13, 4, 8), (2, 13, 2, 8)), ((1, 6, 2, 8), (1, 21, 1, 8))],
    ids=["gqa", "mqa_t<s"],
)
def test_matches_numpy_reference(impl, case, shapes):
    q, k, v = make(*shapes)
    batch, q_len, heads, _ = q.shape
    kwargs = _case_kwargs(case, batch, heads, q_len, k.shape[1])
    out = sdpa(q, k, v, implementation=impl, **CHUNKS, **kwargs)
    expected, _ = reference(
        q,
        k,
        v,
        kwargs.get("mask"),
        kwargs.get("is_causal", False),
        None,
        kwargs.get("query_offset"),
    )
    assert tuple(out.shape) == q.shape
    np.testing.assert_allclose(np_(out), expected, atol=1e-5, rtol=1e-5)


def test_reference_three_steps_by_hand():
    """The NumPy reference itself, on a 1-query example computed by hand."""
    q = np.array([[[[1.0, 0.0]]]])  # (1, 1, 1, 2)
    k = np.array([[[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 0.0]]]])  # (1, 3, 1, 2)
    v = np.array([[[[1.0]], [[2.0]], [[3.0]]]])
    scores = np.array([1.0, 0.0, 2.0]) / np.sqrt(2.0)
    weights = np.exp(scores) / np.exp(scores).sum()
    out, w = reference(q, k, v)
    np.testing.assert_allclose(w[0, 0, 0], weights)
    np.testing.assert_allclose(out[0, 0, 0, 0], weights @ np.array([1.0, 2.0, 3.0]))
    got, got_w = sdpa(
        q.astype("float32"), k.astype("float32"), v.astype("float32"), return_weights=True
    )
    np.testing.assert_allclose(np_(got_w)[0, 0, 0], weights, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_return_weights_match_reference_and_rows_sum_to_one(impl):
    q, k, v = make((2, 7, 4, 8), (2, 11, 2, 8))
    mask = padding_mask(2, 11)
    out, weights = sdpa(
        q, k, v, mask=mask, is_causal=True, return_weights=True, implementation=impl
    )
    expected, expected_w = reference(q, k, v, mask, causal=True)
    assert tuple(weights.shape) == (2, 4, 7, 11)
    np.testing.assert_allclose(np_(weights), expected_w, atol=1e-6)
    np.testing.assert_allclose(np_(out), expected, atol=1e-5)
    sums = np_(weights).sum(-1)
    np.testing.assert_allclose(sums[1], 1.0, atol=1e-5)  # batch 1 has visible keys
    np.testing.assert_array_equal(sums[0], 0.0)  # batch 0 is fully masked


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_give_zeros_not_nan(impl):
    q, k, v = make((2, 10, 2, 8), (2, 10, 2, 8))
    mask = np.ones((2, 1, 10, 10), dtype=bool)
    mask[0, :, 3] = False  # one query row of batch 0 sees nothing
    mask[1] = False  # every row of batch 1
    out = np_(sdpa(q, k, v, mask=mask, implementation=impl, **CHUNKS))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 3], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.abs(out[0, 2]).sum() > 0.0
    # Causal with more queries than keys: the first T - S queries see no key.
    q2, k2, v2 = make((1, 12, 2, 8), (1, 5, 2, 8))
    out2 = np_(sdpa(q2, k2, v2, is_causal=True, implementation=impl, **CHUNKS))
    np.testing.assert_array_equal(out2[0, :7], 0.0)
    np.testing.assert_allclose(out2, reference(q2, k2, v2, causal=True)[0], atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_cached_query_attends_to_every_key(impl):
    """Bottom-right causal alignment: a length-1 query is the last position."""
    q, k, v = make((2, 1, 4, 8), (2, 9, 4, 8))
    causal = sdpa(q, k, v, is_causal=True, implementation=impl)
    full = sdpa(q, k, v, implementation=impl)
    np.testing.assert_allclose(np_(causal), np_(full), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [1, 3, 6])
def test_sliding_window_matches_banded_reference(impl, window):
    q, k, v = make((2, 19, 4, 8), (2, 19, 2, 8))
    mask = padding_mask(2, 19, empty_batch=False)
    out, w = sdpa(q, k, v, mask=mask, sliding_window=window, implementation=impl, **CHUNKS), None
    expected, expected_w = reference(q, k, v, mask, window=window)
    np.testing.assert_allclose(np_(out), expected, atol=1e-5)
    # The weights are exactly zero outside the band.
    _, w = sdpa(q, k, v, mask=mask, sliding_window=window, return_weights=True)
    band = np.abs(np.arange(19)[:, None] - np.arange(19)[None, :])
    outside = (np.arange(19)[None, :] > np.arange(19)[:, None]) | (band >= window)
    assert np.all(np_(w)[:, :, outside] == 0.0)
    np.testing.assert_allclose(np_(w), expected_w, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_sliding_window_at_least_sequence_length_equals_causal(impl):
    q, k, v = make((1, 17, 2, 8), (1, 17, 2, 8))
    causal = np_(sdpa(q, k, v, is_causal=True, implementation=impl, **CHUNKS))
    for window in (17, 40):
        windowed = np_(sdpa(q, k, v, sliding_window=window, implementation=impl, **CHUNKS))
        np.testing.assert_allclose(windowed, causal, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_sliding_window_with_short_query_and_offset_uses_a_slab(impl):
    """Decoding-style call: 2 queries at position 11 of a 30-key cache, window 4."""
    q, k, v = make((2, 2, 4, 8), (2, 30, 2, 8))
    out, w = sdpa(q, k, v, sliding_window=4, query_offset=11, return_weights=True)
    expected, expected_w = reference(q, k, v, window=4, offset=11)
    np.testing.assert_allclose(np_(w), expected_w, atol=1e-6)
    assert tuple(w.shape) == (2, 4, 2, 30)
    out = sdpa(q, k, v, sliding_window=4, query_offset=11, implementation=impl, **CHUNKS)
    np.testing.assert_allclose(np_(out), expected, atol=1e-5)


def test_chunk_plan_skips_blocks_outside_causal_and_window():
    full = attention_module.chunk_plan(64, 64, 0, False, None, 16, 16)
    assert [p[2:] for p in full] == [(0, 4)] * 4
    causal = attention_module.chunk_plan(64, 64, 0, True, None, 16, 16)
    assert [p[2:] for p in causal] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    window = attention_module.chunk_plan(1024, 1024, 0, True, 32, 64, 64)
    # Each query block of 64 sees at most 64 + 31 keys: at most 2 key blocks, whatever T is.
    assert max(last - first for _, _, first, last in window) == 2
    assert sum(last - first for _, _, first, last in window) == 31
    # Offset unknown (None): nothing can be skipped.
    assert attention_module.chunk_plan(8, 32, None, True, 4, 8, 8) == [(0, 8, 0, 4)]
    # More queries than keys with causality: leading queries see no key at all.
    assert attention_module.chunk_plan(16, 4, -12, True, None, 4, 4)[0] == (0, 4, 0, 0)


def _grad(fn, *args):
    """Gradient of sum(fn(*args) ** 2) with respect to every argument, as NumPy arrays."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            out = tf.cast(fn(*tensors), "float32")
            loss = tf.reduce_sum(out * out)
        return [np.asarray(tf.cast(g, "float32")) for g in tape.gradient(loss, tensors)]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def loss(*a):
            out = fn(*a).astype(jnp.float32)
            return jnp.sum(out * out)

        grads = jax.grad(loss, argnums=tuple(range(len(args))))(*(jnp.asarray(a) for a in args))
        return [np.asarray(g.astype(jnp.float32)) for g in grads]
    pytest.skip(f"no gradient helper for backend {BACKEND}")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(is_causal=True, mask="padding"),
        dict(sliding_window=5),
        dict(mask="padding", query_offset=2, is_causal=True),
    ],
    ids=["plain", "causal_padding", "window", "offset"],
)
def test_implementations_agree_including_gradients(kwargs):
    q, k, v = make((2, 13, 4, 8), (2, 15, 2, 8), seed=3)
    kwargs = dict(kwargs)
    if kwargs.get("mask") == "padding":
        kwargs["mask"] = padding_mask(2, 15)
    results = {}
    for impl in IMPLS:

        def fn(q, k, v, impl=impl):
            return sdpa(q, k, v, implementation=impl, **CHUNKS, **kwargs)

        results[impl] = (np_(fn(q, k, v)), _grad(fn, q, k, v))
    out_ref, grads_ref = results["explicit"]
    for impl in ("fused", "chunked"):
        out, grads = results[impl]
        np.testing.assert_allclose(out, out_ref, atol=1e-5, err_msg=impl)
        for name, g, g_ref in zip("qkv", grads, grads_ref):
            assert np.all(np.isfinite(g)), f"{impl} d{name} not finite"
            np.testing.assert_allclose(g, g_ref, atol=1e-4, err_msg=f"{impl} d{name}")
    # The gradients are not trivially zero (the test can fail).
    assert all(np.abs(g).max() > 1e-3 for g in grads_ref)


def test_chunked_loop_over_many_blocks_including_gradients():
    """Ten key blocks per query block: the chunked path runs its loop, not the unrolled steps."""
    q, k, v = make((1, 24, 2, 8), (1, 40, 1, 8), seed=6)
    mask = padding_mask(1, 40, empty_batch=False)
    kwargs = dict(mask=mask, is_causal=True, query_chunk_size=12, key_chunk_size=4)
    assert attention_module.chunk_plan(24, 40, 16, True, None, 12, 4)[1][2:] == (0, 10)

    def chunked(q, k, v):
        return sdpa(q, k, v, implementation="chunked", **kwargs)

    def explicit(q, k, v):
        return sdpa(q, k, v, implementation="explicit", mask=mask, is_causal=True)

    np.testing.assert_allclose(np_(chunked(q, k, v)), reference(q, k, v, mask, True)[0], atol=1e-5)
    for g, g_ref in zip(_grad(chunked, q, k, v), _grad(explicit, q, k, v)):
        np.testing.assert_allclose(g, g_ref, atol=1e-4)


@pytest.mark.parametrize("dtype,atol", [("float16", 2e-2), ("bfloat16", 6e-2)])
@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_matches_float32_reference(dtype, atol, impl):
    q, k, v = make((2, 9, 4, 16), (2, 12, 2, 16), seed=4)
    mask = padding_mask(2, 12)
    expected, _ = reference(q, k, v, mask, causal=True)
    args = [ops.cast(x, dtype) for x in (q, k, v)]
    out = sdpa(*args, mask=mask, is_causal=True, implementation=impl, **CHUNKS)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    np.testing.assert_allclose(np_(out), expected, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_half_precision_logits_do_not_overflow(impl):
    # q . k = 64 * 40 * 40 = 102400 overflows float16 (max 65504) unless scaled before the product.
    q = np.full((1, 4, 1, 64), 40.0, "float32")
    k = np.full((1, 6, 1, 64), 40.0, "float32")
    v = np.arange(6, dtype="float32").reshape(1, 6, 1, 1) * np.ones((1, 1, 1, 64), "float32")
    out = np_(sdpa(*(ops.cast(x, "float16") for x in (q, k, v)), implementation=impl))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, 2.5, atol=2e-2)  # equal scores: the mean of 0..5


def test_value_head_size_may_differ():
    q, k, v = make((2, 5, 2, 8), (2, 7, 2, 8), value_dim=3)
    for impl in IMPLS:
        out = sdpa(q, k, v, is_causal=True, implementation=impl, **CHUNKS)
        assert tuple(out.shape) == (2, 5, 2, 3)
        np.testing.assert_allclose(np_(out), reference(q, k, v, causal=True)[0], atol=1e-5)


def test_custom_scale():
    q, k, v = make((1, 4, 2, 8), (1, 6, 2, 8))
    out = np_(sdpa(q, k, v, scale=0.5, implementation="chunked", **CHUNKS))
    # Scale 0.5 on q . k equals the default 1/sqrt(8) with q multiplied by 0.5 * sqrt(8).
    expected, _ = reference(q * 0.5 * np.sqrt(8.0), k, v)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_dropout_on_weights_only_in_training():
    q, k, v = make((2, 8, 2, 8), (2, 8, 2, 8))
    base = np_(sdpa(q, k, v))
    same = np_(sdpa(q, k, v, dropout_rate=0.5, training=False, implementation="chunked"))
    np.testing.assert_allclose(same, base, atol=1e-5)
    seed = keras.random.SeedGenerator(0)
    out, w = sdpa(q, k, v, dropout_rate=0.5, training=True, seed=seed, return_weights=True)
    assert np.abs(np_(out) - base).max() > 1e-3
    # The returned weights are the ones before dropout.
    np.testing.assert_allclose(np_(w).sum(-1), 1.0, atol=1e-5)
    # Dropout requested with the chunked path falls back to the explicit one (it changes output).
    dropped = np_(sdpa(q, k, v, dropout_rate=0.5, training=True, seed=1, implementation="chunked"))
    assert np.abs(dropped - base).max() > 1e-3


def test_choose_implementation():
    choose = attention_module.choose_implementation
    assert choose(16, 16, return_weights=True) == "explicit"
    assert choose(8192, 8192, dropout=True) == "explicit"
    assert choose(8192, 8192) == "chunked"
    assert choose(None, 100) == "chunked"
    assert choose(1, 8192, sliding_window=64) == "chunked"
    assert choose(128, 128) in ("explicit", "fused")


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="unknown static lengths only exist in TF graphs"
)
@pytest.mark.parametrize("threshold", [10**9, 1])  # runs the explicit path, then the chunked one
def test_auto_with_unknown_lengths_chooses_when_it_runs(threshold, monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(attention_module, "AUTO_CHUNKED_MIN_SCORES", threshold)
    q, k, v = make((2, 11, 4, 8), (2, 19, 2, 8))
    mask = padding_mask(2, 19)
    expected, _ = reference(q, k, v, mask, causal=True)
    spec = [tf.TensorSpec((None, None, 4, 8)), tf.TensorSpec((None, None, 2, 8)),
            tf.TensorSpec((None, None, 2, 8)), tf.TensorSpec((None, 1, 1, None), tf.bool)]

    @tf.function(input_signature=spec)
    def fn(q, k, v, m):
        with tf.GradientTape() as tape:
            tape.watch(q)
            out = sdpa(q, k, v, mask=m, is_causal=True, **CHUNKS)
            loss = tf.reduce_sum(out * out)
        return out, tape.gradient(loss, q)

    out, grad = fn(q, k, v, mask)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    q_static = tf.constant(q)
    with tf.GradientTape() as tape:
        tape.watch(q_static)
        out = sdpa(q_static, k, v, mask=mask, is_causal=True, implementation="explicit")
        loss = tf.reduce_sum(out * out)
    np.testing.assert_allclose(grad.numpy(), tape.gradient(loss, q_static).numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(implementation="flash"), "implementation must be one of"),
        (dict(sliding_window=0), "sliding_window must be a positive int"),
        (dict(dropout_rate=1.0), "dropout_rate must be in"),
    ],
)
def test_invalid_arguments(kwargs, message):
    q, k, v = make((1, 4, 2, 8), (1, 4, 2, 8))
    with pytest.raises(ValueError, match=message):
        sdpa(q, k, v, **kwargs)


def test_invalid_shapes():
    q, k, v = make((1, 4, 3, 8), (1, 4, 2, 8))
    with pytest.raises(ValueError, match="must divide the number of query heads"):
        sdpa(q, k, v)
    with pytest.raises(ValueError, match="must have rank 4"):
        sdpa(q[0], k, v)
    q, k, v = make((1, 4, 2, 8), (1, 4, 2, 4))
    with pytest.raises(ValueError, match="same head size"):
        sdpa(q, k, v)


def test_compiled_chunked_matches_eager_explicit():
    q, k, v = make((1, 40, 2, 8), (1, 40, 2, 8))
    mask = padding_mask(1, 40, empty_batch=False)
    expected = np_(sdpa(q, k, v, mask=mask, is_causal=True, implementation="explicit"))

    def fn(q, k, v, m):
        return sdpa(q, k, v, mask=m, is_causal=True, implementation="chunked", key_chunk_size=4)

    if BACKEND == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(fn, jit_compile=True)
    else:
        import jax

        compiled = jax.jit(fn)
    np.testing.assert_allclose(np_(compiled(q, k, v, mask)), expected, atol=1e-5)


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="unknown static lengths only exist in TF graphs"
)
@pytest.mark.parametrize("impl", IMPLS)
def test_unknown_lengths_in_tensorflow_graph(impl):
    import tensorflow as tf

    q, k, v = make((2, 11, 4, 8), (2, 19, 2, 8))
    mask = padding_mask(2, 19)
    expected, _ = reference(q, k, v, mask, causal=True)
    spec = [
        tf.TensorSpec((None, None, 4, 8)),
        tf.TensorSpec((None, None, 2, 8)),
        tf.TensorSpec((None, None, 2, 8)),
        tf.TensorSpec((None, 1, 1, None), tf.bool),
    ]

    @tf.function(input_signature=spec)
    def fn(q, k, v, m):
        return sdpa(q, k, v, mask=m, is_causal=True, implementation=impl, **CHUNKS)

    np.testing.assert_allclose(fn(q, k, v, mask).numpy(), expected, atol=1e-5)
