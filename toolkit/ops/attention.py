"""Scaled dot-product attention: one function, three implementations.

`scaled_dot_product_attention` is the attention core every layer of `toolkit` calls. It has an
explicit path that materialises the (B, N, T, S) weights (the only one that can return them or
apply dropout to them), a fused path through `keras.ops.dot_product_attention` (the backend's
kernel where it has one) and a chunked path that computes exact attention block by block with an
online softmax, so that memory grows linearly with the sequence length on every backend.
"""

from __future__ import annotations

import math

import keras
from keras import ops

IMPLEMENTATIONS = ("auto", "explicit", "fused", "chunked")

DEFAULT_QUERY_CHUNK_SIZE = 512
DEFAULT_KEY_CHUNK_SIZE = 512

# `implementation="auto"` switches to the chunked path once a score matrix of one batch element and
# one head, T * S, has at least this many entries (measured crossover on a 2-core CPU, see
# docs/benchmarks.md: below it the chunked loop's overhead outweighs the memory traffic it saves).
AUTO_CHUNKED_MIN_SCORES = 2048 * 2048

# Query blocks with at most this many key blocks run them unrolled instead of in a loop.
_MAX_UNROLLED_BLOCKS = 4

# Masked logits are set to this finite value instead of -inf: a row whose keys are all masked then
# stays finite (no inf - inf = NaN, in the values or in the gradients) and is zeroed explicitly.
_MASKED_LOGIT = -1e30


def _static_int(value):
    """`value` as a Python int when it is known while tracing, else `None`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if hasattr(value, "__index__") and not hasattr(value, "shape"):
        return int(value)
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) == 0 and type(value).__module__.startswith("numpy"):
        return int(value)
    return None


def _shape(x):
    """Shape of `x` with Python ints where known and scalar tensors elsewhere (TF graphs)."""
    static = tuple(x.shape)
    if all(isinstance(d, int) for d in static):
        return static
    dynamic = ops.shape(x)
    return tuple(s if isinstance(s, int) else d for s, d in zip(static, dynamic))


def _validate(query, key, value, mask, implementation, sliding_window, dropout_rate):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}. "
            f"Received: implementation={implementation!r}"
        )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if len(x.shape) != 4:
            raise ValueError(
                f"{name} must have rank 4, (B, T, N, H) or (B, S, N_kv, H). "
                f"Received: {name}.shape={tuple(x.shape)}"
            )
    num_heads, num_kv_heads = query.shape[2], key.shape[2]
    if num_heads is None or num_kv_heads is None:
        raise ValueError(
            "The number of heads must be known statically. "
            f"Received: query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}"
        )
    if value.shape[2] != num_kv_heads:
        raise ValueError(
            "key and value must have the same number of heads. "
            f"Received: key.shape={tuple(key.shape)}, value.shape={tuple(value.shape)}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            "The number of key/value heads must divide the number of query heads. "
            f"Received: query heads={num_heads}, key/value heads={num_kv_heads}"
        )
    if query.shape[3] is not None and key.shape[3] is not None and query.shape[3] != key.shape[3]:
        raise ValueError(
            "query and key must have the same head size. "
            f"Received: query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}"
        )
    if mask is not None and len(mask.shape) > 4:
        raise ValueError(
            f"mask must broadcast to (B, N, T, S). Received: mask.shape={tuple(mask.shape)}"
        )
    if sliding_window is not None and (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, int)
        or sliding_window < 1
    ):
        raise ValueError(
            f"sliding_window must be a positive int or None. Received: sliding_window={sliding_window!r}"
        )
    if not 0.0 <= float(dropout_rate) < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1). Received: dropout_rate={dropout_rate}")


def _grouped_mask(mask, num_heads, num_kv_heads):
    """Boolean mask broadcastable to (B, N, T, S) -> broadcastable to (B, K, G, T, S)."""
    if mask is None:
        return None
    mask = ops.cast(mask, "bool")
    while len(mask.shape) < 4:
        mask = ops.expand_dims(mask, 0)
    if mask.shape[1] == 1:
        return ops.expand_dims(mask, 2)  # (b, 1, t, s) -> (b, 1, 1, t, s)
    if mask.shape[1] != num_heads:
        raise ValueError(
            f"mask must broadcast to (B, N, T, S) with N={num_heads}. "
            f"Received: mask.shape={tuple(mask.shape)}"
        )
    b, _, t, s = _shape(mask)
    groups = num_heads // num_kv_heads
    return ops.reshape(mask, (b, num_kv_heads, groups, t, s))  # (b, N, t, s) -> (b, K, G, t, s)


def _position_mask(query_positions, key_positions, causal, window, key_length=None):
    """(t, s) boolean mask from query and key positions (both on the key axis), or `None`."""
    q = ops.expand_dims(query_positions, 1)  # (t,) -> (t, 1)
    k = ops.expand_dims(key_positions, 0)  # (s,) -> (1, s)
    masks = []
    if causal or window is not None:
        masks.append(k <= q)
    if window is not None:
        masks.append(k > q - window)
    if key_length is not None:
        masks.append(k < key_length)
    if not masks:
        return None
    result = masks[0]
    for m in masks[1:]:
        result = ops.logical_and(result, m)
    return result


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return ops.logical_and(a, b)


def _explicit(
    query, key, value, mask5, scale, causal, offset, window, dropout_rate, seed, training
):
    """Materialised weights. Returns (output (B, T, N, Hv), weights (B, N, T, S) float32)."""
    batch, q_len, num_heads, head_dim = _shape(query)
    k_len, num_kv_heads = _shape(key)[1], key.shape[2]
    value_dim = _shape(value)[3]
    groups = num_heads // num_kv_heads
    # Scale the query rather than the logits: fewer multiplies and no float16 overflow.
    query = query * ops.cast(scale, query.dtype)
    if groups == 1:
        # Plain multi-head attention: rank-4 einsums are faster on TensorFlow.
        logits = ops.einsum("btnh,bsnh->bnts", query, key)  # -> (B, N, T, S)
        logits = ops.expand_dims(logits, 2)  # (B, N, T, S) -> (B, K=N, G=1, T, S)
    else:
        query = ops.reshape(query, (batch, q_len, num_kv_heads, groups, head_dim))
        # (B, T, N, H) -> (B, T, K, G, H)
        logits = ops.einsum("btkgh,bskh->bkgts", query, key)  # -> (B, K, G, T, S)
    logits = ops.cast(logits, "float32")

    valid = mask5
    if causal or window is not None:
        positions = _position_mask(
            ops.arange(q_len, dtype="int32") + offset,
            ops.arange(k_len, dtype="int32"),
            causal,
            window,
        )
        valid = _and(valid, positions)  # broadcastable to (B, K, G, T, S)
    if valid is not None:
        logits = ops.where(valid, logits, _MASKED_LOGIT)
    weights = ops.softmax(logits, axis=-1)
    if valid is not None:
        # Rows without any key would otherwise average every value uniformly.
        weights = weights * ops.cast(ops.any(valid, axis=-1, keepdims=True), "float32")
    probs = weights
    if training and dropout_rate > 0.0:
        probs = keras.random.dropout(probs, dropout_rate, seed=seed)
    probs = ops.cast(probs, value.dtype)
    if groups == 1:
        output = ops.einsum("bnts,bsnh->btnh", ops.squeeze(probs, 2), value)
        # (B, N, 1, T, S) -> (B, N, T, S); -> (B, T, N, Hv)
    else:
        output = ops.einsum("bkgts,bskh->btkgh", probs, value)  # -> (B, T, K, G, Hv)
        output = ops.reshape(output, (batch, q_len, num_heads, value_dim))
        # (B, T, K, G, Hv) -> (B, T, N, Hv)
    weights = ops.reshape(weights, (batch, num_heads, q_len, k_len))
    # (B, K, G, T, S) -> (B, N, T, S)
    return output, weights


def _fused(query, key, value, mask, scale, causal, offset, window):
    """`keras.ops.dot_product_attention` with bottom-right causality and zeroed empty rows."""
    q_len, k_len = _shape(query)[1], _shape(key)[1]
    static_offset = _static_int(offset)
    full_mask = None
    if mask is not None:
        full_mask = ops.cast(mask, "bool")
        while len(full_mask.shape) < 4:
            full_mask = ops.expand_dims(full_mask, 0)
    native_causal = causal and window is None and static_offset == 0
    if (causal or window is not None) and not native_causal:
        positions = _position_mask(
            ops.arange(q_len, dtype="int32") + offset,
            ops.arange(k_len, dtype="int32"),
            causal,
            window,
        )
        positions = ops.reshape(positions, (1, 1, q_len, k_len))  # (T, S) -> (1, 1, T, S)
        full_mask = _and(full_mask, positions)
    # Scale the query ourselves: keras scales the float16 logits after the product, which
    # overflows for large activations.
    query = query * ops.cast(scale, query.dtype)
    output = ops.dot_product_attention(
        query, key, value, mask=full_mask, scale=1.0, is_causal=native_causal
    )
    if full_mask is not None:
        row_valid = ops.any(full_mask, axis=-1)  # (b, n, T, S) -> (b, n, T)
        row_valid = ops.expand_dims(ops.transpose(row_valid, (0, 2, 1)), -1)
        # (b, n, T) -> (b, T, n, 1)
        output = output * ops.cast(row_valid, output.dtype)
    return output


def chunk_plan(query_length, key_length, offset, causal, window, query_chunk, key_chunk):
    """Key blocks each query block of the chunked path computes (static lengths).

    Args:
        query_length: int. T.
        key_length: int. S.
        offset: int or `None`. Key position of the first query; `None` when only known at run
            time (then no block can be skipped).
        causal: bool. Whether the causal mask applies.
        window: int or `None`. Sliding window.
        query_chunk: int. Queries per block.
        key_chunk: int. Keys per block.

    Returns:
        A list of `(query_start, query_block_length, first_key_block, last_key_block)`, the key
        blocks being `first_key_block <= j < last_key_block` (empty when the two are equal).
    """
    plan = []
    for q_start in range(0, query_length, query_chunk):
        block_len = min(query_chunk, query_length - q_start)
        lo, hi = 0, key_length
        if offset is not None and (causal or window is not None):
            hi = max(0, min(key_length, q_start + block_len + offset))
            if window is not None:
                lo = min(hi, max(0, q_start + offset - window + 1))
        if hi <= lo:
            plan.append((q_start, block_len, 0, 0))
        else:
            plan.append((q_start, block_len, lo // key_chunk, -(-hi // key_chunk)))
    return plan


def _chunked(query, key, value, mask5, scale, causal, offset, window, q_chunk, k_chunk):
    """Exact attention over (query block, key block) pairs with an online softmax.

    Only a (B, N, q_chunk, k_chunk) block of scores exists at any time. With static lengths and a
    static offset the key blocks a query block cannot see (above the causal diagonal, or outside
    the sliding window) are skipped, not computed and masked.
    """
    batch, q_len, num_heads, head_dim = _shape(query)
    k_len, num_kv_heads = _shape(key)[1], key.shape[2]
    value_dim = _shape(value)[3]
    groups = num_heads // num_kv_heads
    out_dtype = query.dtype

    query = query * ops.cast(scale, query.dtype)
    query = ops.reshape(query, (batch, q_len, num_kv_heads, groups, head_dim))
    # (B, T, N, H) -> (B, T, K, G, H)

    static_t, static_s, static_offset = _static_int(q_len), _static_int(k_len), _static_int(offset)
    # Pad the keys to whole blocks so every loop step has the same shape; padded keys are masked.
    if static_s is not None:
        num_blocks = -(-static_s // k_chunk)
        pad = num_blocks * k_chunk - static_s
    else:
        num_blocks = (k_len + k_chunk - 1) // k_chunk
        pad = num_blocks * k_chunk - k_len
    needs_length_mask = static_s is None or pad > 0
    if static_s is None or pad > 0:
        key = ops.pad(key, [[0, 0], [0, pad], [0, 0], [0, 0]])
        value = ops.pad(value, [[0, 0], [0, pad], [0, 0], [0, 0]])
        if mask5 is not None and mask5.shape[-1] != 1:
            mask5 = ops.pad(mask5, [[0, 0]] * 4 + [[0, pad]], constant_values=False)
    mask_has_t = mask5 is not None and mask5.shape[-2] != 1
    if keras.backend.backend() == "tensorflow" and mask_has_t:
        # The query loop reads whole query blocks: pad the mask's query axis like the queries.
        q_pad = (-q_len) % q_chunk
        mask5 = ops.pad(mask5, [[0, 0]] * 3 + [[0, q_pad], [0, 0]], constant_values=False)
    mask_has_s = mask5 is not None and mask5.shape[-1] != 1

    def attend(q_block, q_start, block_len, first_block, last_block):
        """Attention of one query block over key blocks [first_block, last_block)."""
        q_positions = ops.arange(block_len, dtype="int32") + q_start + offset
        if mask5 is not None and mask_has_t:
            m = _shape(mask5)
            block_mask = ops.slice(
                mask5, (0, 0, 0, q_start, 0), (m[0], m[1], m[2], block_len, m[4])
            )  # (b, k, g, T, S) -> (b, k, g, tq, S)
        else:
            block_mask = mask5

        def step(block_index, state):
            m_prev, l_prev, acc_prev = state
            k_start = block_index * k_chunk
            k_block = ops.slice(key, (0, k_start, 0, 0), (batch, k_chunk, num_kv_heads, head_dim))
            v_block = ops.slice(
                value, (0, k_start, 0, 0), (batch, k_chunk, num_kv_heads, value_dim)
            )  # (B, S, K, H) -> (B, kc, K, H)
            scores = ops.einsum("btkgh,bskh->bkgts", q_block, k_block)  # -> (B, K, G, tq, kc)
            scores = ops.cast(scores, "float32")
            k_positions = ops.arange(k_chunk, dtype="int32") + k_start
            valid = _position_mask(
                q_positions, k_positions, causal, window, k_len if needs_length_mask else None
            )
            if block_mask is not None:
                if mask_has_s:
                    m = _shape(block_mask)
                    user = ops.slice(
                        block_mask, (0, 0, 0, 0, k_start), (m[0], m[1], m[2], m[3], k_chunk)
                    )  # (b, k, g, tq, S) -> (b, k, g, tq, kc)
                else:
                    user = block_mask
                valid = _and(valid, user)
            if valid is not None:
                scores = ops.where(valid, scores, _MASKED_LOGIT)
            # The result does not depend on the running maximum, so it needs no gradient.
            m_new = ops.stop_gradient(ops.maximum(m_prev, ops.max(scores, axis=-1)))
            probs = ops.exp(scores - ops.expand_dims(m_new, -1))
            if valid is not None:
                # A block with no visible key has scores == m_new == the masked logit.
                probs = ops.where(valid, probs, 0.0)
            correction = ops.exp(m_prev - m_new)
            l_new = l_prev * correction + ops.sum(probs, axis=-1)
            update = ops.einsum("bkgts,bskh->bkgth", ops.cast(probs, value.dtype), v_block)
            # -> (B, K, G, tq, Hv)
            acc_new = acc_prev * ops.expand_dims(correction, -1) + ops.cast(update, "float32")
            return m_new, l_new, acc_new

        stats_shape = (batch, num_kv_heads, groups, block_len)
        state = (
            ops.full(stats_shape, _MASKED_LOGIT, dtype="float32"),
            ops.zeros(stats_shape, dtype="float32"),
            ops.zeros(stats_shape + (value_dim,), dtype="float32"),
        )
        if (
            isinstance(first_block, int)
            and isinstance(last_block, int)
            and last_block - first_block <= _MAX_UNROLLED_BLOCKS
        ):
            # A few blocks: unrolled, which avoids compiling a loop (costly in eager JAX).
            for block_index in range(first_block, last_block):
                state = step(ops.convert_to_tensor(block_index, "int32"), state)
        else:
            state = ops.fori_loop(first_block, last_block, step, state)
        _, l_sum, acc = state
        # Fully masked rows have l_sum == 0 and acc == 0: divide by 1 to give zeros.
        out = acc / ops.expand_dims(ops.where(l_sum > 0.0, l_sum, 1.0), -1)
        out = ops.transpose(out, (0, 3, 1, 2, 4))  # (B, K, G, tq, Hv) -> (B, tq, K, G, Hv)
        return ops.cast(out, out_dtype)

    single_block = static_t is not None and static_t <= q_chunk
    if keras.backend.backend() == "tensorflow" and not single_block:
        # TensorFlow runs independent ops concurrently: unrolled query blocks would all hold
        # their score blocks at once. A loop over query blocks keeps one alive at a time; its
        # key-block range is computed in the graph (gradients flow through tf.while_loop).
        output = _chunked_query_loop(
            attend, query, q_len, k_len, value_dim, offset, causal, window, q_chunk, k_chunk
        )
        return ops.reshape(output, (batch, q_len, num_heads, value_dim))
        # (B, T, K, G, Hv) -> (B, T, N, Hv)
    if static_t is None or static_s is None:
        # Unknown lengths: one query block, a dynamic loop over key blocks.
        outputs = [attend(query, 0, q_len, 0, num_blocks)]
    else:
        outputs = []
        plan = chunk_plan(static_t, static_s, static_offset, causal, window, q_chunk, k_chunk)
        for q_start, block_len, first, last in plan:
            if first == last:
                outputs.append(
                    ops.zeros((batch, block_len, num_kv_heads, groups, value_dim), dtype=out_dtype)
                )
                continue
            q_block = query[:, q_start : q_start + block_len]  # (B, T, K, G, H) -> (B, tq, K, G, H)
            outputs.append(attend(q_block, q_start, block_len, first, last))
    output = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=1)
    # (B, T, K, G, Hv) -> (B, T, N, Hv)
    return ops.reshape(output, (batch, q_len, num_heads, value_dim))


def _chunked_query_loop(
    attend, query, q_len, k_len, value_dim, offset, causal, window, q_chunk, k_chunk
):
    """`attend` over query blocks in a sequential `scan` (TensorFlow). Returns (B, T, K, G, Hv)."""
    num_q_blocks = (q_len + q_chunk - 1) // q_chunk
    pad = num_q_blocks * q_chunk - q_len
    query = ops.pad(query, [[0, 0], [0, pad], [0, 0], [0, 0], [0, 0]])
    # (B, T, K, G, H) -> (B, T_pad, K, G, H); padded queries are computed and dropped.
    b, _, k, g, h = _shape(query)

    def body(carry, i):
        q_start = i * q_chunk
        q_block = ops.slice(query, (0, q_start, 0, 0, 0), (b, q_chunk, k, g, h))
        # (B, T_pad, K, G, H) -> (B, tq, K, G, H)
        lo, hi = 0, k_len
        if causal or window is not None:
            hi = ops.clip(q_start + q_chunk + offset, 0, k_len)
            if window is not None:
                lo = ops.clip(q_start + offset - window + 1, 0, hi)
        first = lo // k_chunk
        last = ops.maximum((hi + k_chunk - 1) // k_chunk, first)
        return carry, attend(q_block, q_start, q_chunk, first, last)  # (B, tq, K, G, Hv)

    # Keras' TensorFlow scan requires the per-step output to look like the carry.
    template = ops.zeros((b, q_chunk, k, g, value_dim), dtype=query.dtype)
    _, blocks = ops.scan(body, template, xs=ops.arange(num_q_blocks, dtype="int32"))
    blocks = ops.transpose(blocks, (1, 0, 2, 3, 4, 5))
    # (nq, B, tq, K, G, Hv) -> (B, nq, tq, K, G, Hv)
    output = ops.reshape(blocks, (b, -1, k, g, value_dim))  # -> (B, T_pad, K, G, Hv)
    return output[:, :q_len]  # (B, T_pad, K, G, Hv) -> (B, T, K, G, Hv)


def _window_slab(key, value, mask, offset, window, q_len):
    """Keep only the keys a sliding window can reach: returns key, value, mask, offset, start.

    The T queries sit at key positions offset .. offset + T - 1 and see at most `window` keys
    behind each, so a slab of `window + T - 1` keys starting at `offset - window + 1` holds every
    visible key. The start may be a traced value (cached decoding); the slab size is static.
    """
    k_len = key.shape[1]
    slab = window + q_len - 1
    start = ops.clip(ops.convert_to_tensor(offset, "int32") - (window - 1), 0, k_len - slab)
    static_start = _static_int(offset)
    if static_start is not None:
        start = min(max(static_start - (window - 1), 0), k_len - slab)
    b, _, h, d = _shape(key)
    key = ops.slice(key, (0, start, 0, 0), (b, slab, h, d))  # (B, S, K, H) -> (B, slab, K, H)
    value = ops.slice(value, (0, start, 0, 0), (b, slab, h, _shape(value)[3]))
    if mask is not None and mask.shape[-1] not in (None, 1):
        mask = ops.cast(mask, "bool")
        while len(mask.shape) < 4:
            mask = ops.expand_dims(mask, 0)
        m = _shape(mask)
        mask = ops.slice(mask, (0, 0, 0, start), (m[0], m[1], m[2], slab))
        # (b, n, t, S) -> (b, n, t, slab)
    return key, value, mask, offset - start, start


def _on_cpu():
    devices = keras.distribution.list_devices()
    return not devices or devices[0].lower().startswith("cpu")


def _fused_can_run(query, value, num_heads, num_kv_heads):
    """Whether `keras.ops.dot_product_attention` does what is asked without copies or errors."""
    if query.shape[3] != value.shape[3]:
        return False
    backend = keras.backend.backend()
    if backend == "tensorflow" and num_heads != num_kv_heads:
        return False  # keras repeats K/V up to N heads on TensorFlow
    if backend == "jax" and keras.backend.standardize_dtype(query.dtype) == "float16":
        # Under jit, XLA:CPU rejects jax.nn.dot_product_attention's float16 x float16 -> float32
        # product ("precision F16_F16_F32 is not supported by dot_general on CPU").
        return not _on_cpu()
    return True


def choose_implementation(
    query_length, key_length, return_weights=False, dropout=False, sliding_window=None
):
    """The implementation `implementation="auto"` uses for these settings.

    Args:
        query_length: int or `None`. T, when known.
        key_length: int or `None`. S, when known.
        return_weights: bool. Whether the weights are requested.
        dropout: bool. Whether dropout on the weights is active.
        sliding_window: int or `None`. The sliding window.

    Returns:
        One of `"explicit"`, `"fused"`, `"chunked"`.
    """
    if return_weights or dropout:
        return "explicit"
    if query_length is None or key_length is None:
        # Unknown lengths may be long: the chunked path is the one whose memory stays bounded.
        return "chunked"
    if sliding_window is not None and key_length > 2 * (sliding_window + DEFAULT_KEY_CHUNK_SIZE):
        return "chunked"
    if query_length * key_length >= AUTO_CHUNKED_MIN_SCORES:
        return "chunked"
    # Measured on CPU (docs/benchmarks.md): on JAX, jax.nn.dot_product_attention's XLA path is at
    # least as fast as ours; on TensorFlow keras' fused path is an einsum/softmax graph like ours
    # but repeats K/V heads for grouped-query attention, so the explicit path is preferred.
    return "fused" if keras.backend.backend() == "jax" else "explicit"


def scaled_dot_product_attention(
    query,
    key,
    value,
    mask=None,
    is_causal=False,
    scale=None,
    return_weights=False,
    implementation="auto",
    *,
    sliding_window=None,
    query_offset=None,
    dropout_rate=0.0,
    training=False,
    seed=None,
    query_chunk_size=None,
    key_chunk_size=None,
):
    """Scaled dot-product attention with explicit, fused and chunked implementations.

    Computes `softmax(q k^T * scale + mask) v` for every head: the scores
    `e[b, n, t, s] = scale * q[b, t, n] . k[b, s, n // G]`, the weights `a = softmax_s(e)` in
    float32 whatever the input dtype, and the output `o[b, t, n] = sum_s a[b, n, t, s] v[b, s, n // G]`.
    With fewer key/value heads than query heads (grouped-query attention, G = N / N_kv query
    heads per key/value head) the query is reshaped to (B, T, N_kv, G, H): keys and values are
    never copied up to N heads.

    Implementations:

    - `"explicit"`: materialises the (B, N, T, S) weights. The only one that can return them and
      apply dropout to them. Memory O(T * S).
    - `"fused"`: `keras.ops.dot_product_attention`, the backend's kernel where it has one (cuDNN
      or Splash on JAX GPU/TPU; an XLA graph on CPU). Requests it cannot honour (weights,
      dropout, a value head size different from the key head size, grouped-query attention on
      TensorFlow, which would repeat K/V) use the explicit path instead.
    - `"chunked"`: exact attention over blocks of `query_chunk_size` queries and `key_chunk_size`
      keys with an online softmax (running maximum and sum, Rabe & Staats 2021, FlashAttention):
      memory O(T + S) per head on every backend, gradients included. With static lengths, key
      blocks that are entirely masked by causality or by the sliding window are skipped. Weights
      and dropout requests use the explicit path.
    - `"auto"`: explicit when weights or dropout are requested, chunked for long sequences
      (T * S >= `AUTO_CHUNKED_MIN_SCORES`) or a sliding window much shorter than S; otherwise
      the faster of fused and explicit on this backend (see `choose_implementation`). Lengths
      unknown when traced (a TensorFlow graph with relaxed shapes, as `model.fit` builds for
      batches of varying length) are compared with the threshold when the graph runs, and the
      explicit or chunked path runs accordingly.

    Masking: `mask` is boolean, True = attend, broadcastable to (B, N, T, S). `is_causal` adds a
    bottom-right aligned causal mask: query t sits at key position `t + query_offset`
    (`query_offset` defaults to S - T), so a single cached query attends to every key.
    `sliding_window=W` keeps keys with `0 <= position(t) - s < W` (it implies causality) and
    only those keys are computed (the others are sliced away or their blocks skipped). Rows
    whose keys are all masked give zero output and zero weights, never NaN.

    Args:
        query: (B, T, N, H) tensor.
        key: (B, S, N_kv, H) tensor; N_kv divides N.
        value: (B, S, N_kv, Hv) tensor.
        mask: optional boolean tensor broadcastable to (B, N, T, S), True = attend.
        is_causal: bool. Whether to add the bottom-right aligned causal mask. Defaults to `False`.
        scale: float or `None`. Score scale. Defaults to `None`, meaning `1 / sqrt(H)`.
        return_weights: bool. Whether to also return the weights. Defaults to `False`.
        implementation: string. `"auto"`, `"explicit"`, `"fused"` or `"chunked"`. Defaults to
            `"auto"`.
        sliding_window: int or `None`. Causal local attention over the last `W` keys, the
            query's own position included. Defaults to `None`.
        query_offset: int, scalar tensor or `None`. Key position of the first query, e.g. the
            cache index when decoding. Defaults to `None`, meaning S - T (bottom-right).
        dropout_rate: float. Dropout rate on the weights (explicit path only), applied when
            `training` is true. Defaults to `0.0`.
        training: bool. Whether dropout is active. Defaults to `False`.
        seed: int, `keras.random.SeedGenerator` or `None`. Seed of the dropout.
        query_chunk_size: int or `None`. Queries per block of the chunked path. Defaults to
            `DEFAULT_QUERY_CHUNK_SIZE` (512).
        key_chunk_size: int or `None`. Keys per block of the chunked path. Defaults to
            `DEFAULT_KEY_CHUNK_SIZE` (512).

    Returns:
        The output (B, T, N, Hv) in the query's dtype, or `(output, weights)` with weights
        (B, N, T, S) in the query's dtype when `return_weights=True`. The weights are those
        before dropout.

    Example:

    >>> import numpy as np
    >>> q = np.random.rand(2, 5, 4, 8).astype("float32")
    >>> kv = np.random.rand(2, 7, 2, 8).astype("float32")
    >>> out, w = scaled_dot_product_attention(q, kv, kv, is_causal=True, return_weights=True)
    >>> tuple(out.shape), tuple(w.shape)
    ((2, 5, 4, 8), (2, 4, 5, 7))

    References:
        - [Vaswani et al., 2017. Attention Is All You Need](https://arxiv.org/abs/1706.03762)
        - [Rabe & Staats, 2021. Self-attention Does Not Need O(n^2)
          Memory](https://arxiv.org/abs/2112.05682)
        - [Dao et al., 2022. FlashAttention](https://arxiv.org/abs/2205.14135)
        - [Ainslie et al., 2023. GQA](https://arxiv.org/abs/2305.13245)
        - [Beltagy et al., 2020. Longformer](https://arxiv.org/abs/2004.05150) (sliding window)
    """
    query = ops.convert_to_tensor(query)
    key = ops.convert_to_tensor(key)
    value = ops.convert_to_tensor(value)
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
    _validate(query, key, value, mask, implementation, sliding_window, dropout_rate)
    dtype = query.dtype
    key = ops.cast(key, dtype)
    value = ops.cast(value, dtype)
    num_heads, num_kv_heads = query.shape[2], key.shape[2]
    head_dim = query.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    q_len, k_len = _shape(query)[1], _shape(key)[1]
    offset = k_len - q_len if query_offset is None else query_offset
    if not isinstance(offset, int):
        offset = ops.cast(offset, "int32")
    causal = bool(is_causal) or sliding_window is not None
    use_dropout = bool(training) and dropout_rate > 0.0

    impl = implementation
    if impl == "auto":
        impl = choose_implementation(
            _static_int(q_len),
            _static_int(k_len),
            return_weights=return_weights,
            dropout=use_dropout,
            sliding_window=sliding_window,
        )
    if return_weights or use_dropout:
        impl = "explicit"
    if impl == "fused" and not _fused_can_run(query, value, num_heads, num_kv_heads):
        impl = "explicit"

    # Sliding window: only `W + T - 1` keys can be visible. Slicing them away saves compute on
    # every path; the chunked path with static lengths skips the blocks itself.
    slab_start = None
    static_t, static_s = _static_int(q_len), _static_int(k_len)
    if (
        sliding_window is not None
        and static_t is not None
        and static_s is not None
        and sliding_window + static_t - 1 < static_s
        and not (impl == "chunked" and _static_int(offset) is not None)
    ):
        key, value, mask, offset, slab_start = _window_slab(
            key, value, mask, offset, sliding_window, static_t
        )

    weights = None
    if impl == "fused":
        output = _fused(query, key, value, mask, scale, causal, offset, sliding_window)
    else:
        mask5 = _grouped_mask(mask, num_heads, num_kv_heads)

        def chunked():
            return ops.cast(_chunked(
                query, key, value, mask5, scale, causal, offset, sliding_window,
                query_chunk_size or DEFAULT_QUERY_CHUNK_SIZE,
                key_chunk_size or DEFAULT_KEY_CHUNK_SIZE,
            ), dtype)  # fmt: skip

        def explicit():
            return _explicit(query, key, value, mask5, scale, causal, offset, sliding_window,
                             dropout_rate, seed, use_dropout)  # fmt: skip

        if impl == "chunked" and implementation == "auto" and None in (static_t, static_s):
            # Lengths unknown when traced: a TensorFlow graph with relaxed shapes, which
            # `model.fit` makes for batches of varying length. Choose when it runs, so short
            # inputs do not pay for the chunked loop (2.5-3.5x slower training measured).
            large = ops.cast(q_len, "int64") * ops.cast(k_len, "int64") >= AUTO_CHUNKED_MIN_SCORES
            output = ops.cond(large, chunked, lambda: ops.cast(explicit()[0], dtype))
        elif impl == "chunked":
            output = chunked()
        else:
            output, weights = explicit()
    output = ops.cast(output, dtype)
    if not return_weights:
        return output
    weights = ops.cast(weights, dtype)
    if slab_start is not None:
        # Put the slab's weights back at their key positions: (B, N, T, slab) -> (B, N, T, S).
        b, n, t, _ = _shape(weights)
        full = ops.zeros((b, n, t, static_s), dtype=dtype)
        weights = ops.slice_update(full, (0, 0, 0, slab_start), weights)
    return output, weights
