"""Multi-head attention with grouped-query heads, a key/value cache and sliding windows."""

from __future__ import annotations

import keras
from keras import ops

from toolkit.ops.attention import IMPLEMENTATIONS, scaled_dot_product_attention


def _check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}")


def padding_and_attention_mask(value_mask=None, attention_mask=None):
    """Combine a (B, S) padding mask and a (B, T, S) attention mask into (B, 1, T|1, S), or None."""
    mask = None
    if value_mask is not None:
        mask = ops.cast(value_mask, "bool")[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    if attention_mask is not None:
        attention_mask = ops.cast(attention_mask, "bool")[:, None, :, :]
        # (B, T, S) -> (B, 1, T, S)
        mask = attention_mask if mask is None else ops.logical_and(mask, attention_mask)
    return mask


@keras.saving.register_keras_serializable(package="toolkit")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention with grouped-query heads, a key/value cache and sliding windows.

    Projects the query to N heads and the key and value to N_kv heads,
    `q = x_q W_q`, `k = x_k W_k`, `v = x_v W_v`, computes
    `o_n = softmax(q_n k_{n // G}^T / sqrt(H)) v_{n // G}` for each head n (G = N / N_kv query
    heads share one key/value head; the query is reshaped to (B, T, N_kv, G, H), K/V are never
    copied up to N heads), and projects the concatenated heads back:
    `y = [o_1, ..., o_N] W_o`. The attention itself is `toolkit.ops.scaled_dot_product_attention`
    with the implementation given by `attention_implementation`.

    The weights have the shapes of `keras.layers.MultiHeadAttention`'s (query (Dq, N, H), key and
    value (D, N_kv, H), output (N, Hv, Dout)), so its weights can be copied into this layer.

    Key/value cache for incremental decoding: a tensor (B, 2, S_max, N_kv, H), keys at index 0
    and values at index 1 (create one with `init_cache`). With `cache_update_index=i` the keys
    and values of the T new positions are written at positions i .. i + T - 1, attention runs
    over the whole cache, keys beyond i + T - 1 are masked, and the causal mask (when
    `use_causal_mask`) is offset so query t sits at position i + t. With a cache and
    `cache_update_index=None` the cache holds precomputed keys and values (a cross-attention
    cache, see `compute_cache`) and is returned unchanged.

    Sliding window: `sliding_window=W` restricts each query to the last W keys (its own position
    included), which implies causality. Only those keys are computed: the chunked path skips key
    blocks outside the window and cached decoding slices a (W + T - 1)-key slab out of the cache.

    Masks are boolean, True = attend, combined with logical AND: `query_mask` (B, T) zeroes the
    output and weights of padded queries; `value_mask` (B, S) hides padded keys (with a cache it
    covers the cache, (B, S_max)); `attention_mask` (B, T, S). Queries with no visible key output
    zeros (after the output projection: its bias), never NaN. Keras' implicit `_keras_mask`s are
    not read: pass masks explicitly.

    Args:
        num_heads: int. Number of query heads N.
        key_dim: int. Size H of each query and key head.
        value_dim: int or `None`. Size Hv of each value head. Defaults to `None`, meaning
            `key_dim`.
        num_key_value_heads: int or `None`. Number of key/value heads N_kv; it must divide
            `num_heads` (1 is multi-query attention). Defaults to `None`, meaning `num_heads`.
        dropout: float. Dropout rate on the attention weights during training. Defaults to
            `0.0`.
        use_bias: bool. Whether the projections have biases. Defaults to `True`.
        output_dim: int or `None`. Output features. Defaults to `None`, meaning Dq.
        sliding_window: int or `None`. Causal local attention over the last W keys. Defaults to
            `None`.
        attention_implementation: string. `"auto"`, `"explicit"`, `"fused"` or `"chunked"`, see
            `toolkit.ops.scaled_dot_product_attention`. Defaults to `"auto"`.
        kernel_initializer: string or initializer. Defaults to `"glorot_uniform"`.
        bias_initializer: string or initializer. Defaults to `"zeros"`.
        kernel_regularizer: regularizer or `None`. Defaults to `None`.
        bias_regularizer: regularizer or `None`. Defaults to `None`.
        seed: int or `None`. Seed of the attention dropout. Defaults to `None`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        query: (B, T, Dq) tensor.
        value: (B, S, Dv) tensor.
        key: optional (B, S, Dk) tensor. Defaults to `value`.
        query_mask: optional boolean (B, T).
        value_mask: optional boolean (B, S) (or (B, S_max) with a cache).
        attention_mask: optional boolean (B, T, S).
        use_causal_mask: bool. Whether query t only sees keys up to its own position
            (bottom-right aligned, or offset by `cache_update_index`). Defaults to `False`.
        cache: optional (B, 2, S_max, N_kv, H) key/value cache.
        cache_update_index: optional int or scalar int tensor: where the new keys/values go.
        training: bool or `None`. Whether dropout is active.
        return_attention_scores: bool. Whether to return the per-head weights. Defaults to
            `False`.

    Returns:
        `output` (B, T, output_dim or Dq), then the weights (B, N, T, S) if
        `return_attention_scores`, then the updated cache (B, 2, S_max, N_kv, H) if `cache` was
        given. A single tensor when only the output is returned, otherwise a tuple.

    Example:

    >>> import numpy as np
    >>> mha = MultiHeadAttention(num_heads=4, key_dim=8, num_key_value_heads=2)
    >>> x = np.random.rand(2, 6, 16).astype("float32")
    >>> y, w = mha(x, x, use_causal_mask=True, return_attention_scores=True)
    >>> tuple(y.shape), tuple(w.shape)
    ((2, 6, 16), (2, 4, 6, 6))
    >>> cache = mha.init_cache(batch_size=2, max_length=6)
    >>> y0, cache = mha(x[:, :1], x[:, :1], use_causal_mask=True, cache=cache, cache_update_index=0)
    >>> tuple(y0.shape), tuple(cache.shape)
    ((2, 1, 16), (2, 2, 6, 2, 8))

    References:
        - [Vaswani et al., 2017. Attention Is All You Need](https://arxiv.org/abs/1706.03762)
        - [Ainslie et al., 2023. GQA: Training Generalized Multi-Query Transformer Models from
          Multi-Head Checkpoints](https://arxiv.org/abs/2305.13245)
        - [Beltagy et al., 2020. Longformer](https://arxiv.org/abs/2004.05150)
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        num_key_value_heads=None,
        dropout=0.0,
        use_bias=True,
        output_dim=None,
        sliding_window=None,
        attention_implementation="auto",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int("num_heads", num_heads)
        _check_positive_int("key_dim", key_dim)
        _check_positive_int("value_dim", value_dim, allow_none=True)
        _check_positive_int("num_key_value_heads", num_key_value_heads, allow_none=True)
        _check_positive_int("output_dim", output_dim, allow_none=True)
        _check_positive_int("sliding_window", sliding_window, allow_none=True)
        if num_key_value_heads is not None and num_heads % num_key_value_heads:
            raise ValueError(
                "num_key_value_heads must divide num_heads. Received: "
                f"num_heads={num_heads}, num_key_value_heads={num_key_value_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")
        if attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation must be one of {IMPLEMENTATIONS}. "
                f"Received: attention_implementation={attention_implementation!r}"
            )
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.num_key_value_heads = num_key_value_heads
        self.dropout = dropout
        self.use_bias = use_bias
        self.output_dim = output_dim
        self.sliding_window = sliding_window
        self.attention_implementation = attention_implementation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.seed = seed
        self._value_dim = value_dim or key_dim
        self._num_kv_heads = num_key_value_heads or num_heads
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _dense(self, equation, output_shape, bias_axes, name):
        return keras.layers.EinsumDense(
            equation,
            output_shape=output_shape,
            bias_axes=bias_axes if self.use_bias else None,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            name=name,
            dtype=self.dtype_policy,
        )

    def build(self, query_shape, value_shape, key_shape=None):
        key_shape = value_shape if key_shape is None else key_shape
        self.query_dense = self._dense(
            "btd,dnh->btnh", (None, self.num_heads, self.key_dim), "nh", "query"
        )  # (B, T, Dq) -> (B, T, N, H)
        self.query_dense.build(query_shape)
        self.key_dense = self._dense(
            "bsd,dkh->bskh", (None, self._num_kv_heads, self.key_dim), "kh", "key"
        )  # (B, S, Dk) -> (B, S, N_kv, H)
        self.key_dense.build(key_shape)
        self.value_dense = self._dense(
            "bsd,dkh->bskh", (None, self._num_kv_heads, self._value_dim), "kh", "value"
        )  # (B, S, Dv) -> (B, S, N_kv, Hv)
        self.value_dense.build(value_shape)
        self.output_dense = self._dense(
            "btnh,nho->bto", (None, self._output_dim(query_shape)), "o", "attention_output"
        )  # (B, T, N, Hv) -> (B, T, Dout)
        self.output_dense.build((query_shape[0], query_shape[1], self.num_heads, self._value_dim))
        self.built = True

    def _output_dim(self, query_shape):
        return self.output_dim or query_shape[-1]

    def init_cache(self, batch_size, max_length, dtype=None):
        """An empty key/value cache for incremental decoding.

        Args:
            batch_size: int. B.
            max_length: int. S_max, the most positions the cache can hold.
            dtype: dtype or `None`. Defaults to `None`, meaning the layer's compute dtype.

        Returns:
            A zero tensor (B, 2, S_max, N_kv, H): keys at index 0, values at index 1.
        """
        self._check_cacheable()
        return ops.zeros(
            (batch_size, 2, max_length, self._num_kv_heads, self.key_dim),
            dtype=dtype or self.compute_dtype,
        )

    def compute_cache(self, value, key=None):
        """Precomputed keys and values of `value` (a cross-attention cache).

        Pass the result as `cache` with `cache_update_index=None` to attend to `value` without
        projecting it again at every decoding step. The layer must be built.

        Args:
            value: (B, S, Dv) tensor.
            key: optional (B, S, Dk) tensor. Defaults to `value`.

        Returns:
            A tensor (B, 2, S, N_kv, H).
        """
        self._check_cacheable()
        if not self.built:
            raise ValueError(f"Layer {self.name} must be built (called once) before compute_cache")
        key = value if key is None else key
        # 2 x (B, S, N_kv, H) -> (B, 2, S, N_kv, H)
        return ops.stack([self.key_dense(key), self.value_dense(value)], axis=1)

    def _check_cacheable(self):
        if self._value_dim != self.key_dim:
            raise ValueError(
                "A key/value cache needs value_dim == key_dim. "
                f"Received: key_dim={self.key_dim}, value_dim={self.value_dim}"
            )

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        attention_mask=None,
        use_causal_mask=False,
        cache=None,
        cache_update_index=None,
        training=None,
        return_attention_scores=False,
    ):
        key = value if key is None else key
        q = self.query_dense(query)  # (B, T, Dq) -> (B, T, N, H)
        mask = padding_and_attention_mask(value_mask, attention_mask)
        query_offset = None
        if cache is not None and cache_update_index is None:
            k = cache[:, 0]  # (B, 2, S, N_kv, H) -> (B, S, N_kv, H)
            v = cache[:, 1]
        else:
            k = self.key_dense(key)  # (B, S, Dk) -> (B, S, N_kv, H)
            v = self.value_dense(value)  # (B, S, Dv) -> (B, S, N_kv, Hv)
            if cache is not None:
                start = (0, cache_update_index, 0, 0)
                k = ops.slice_update(cache[:, 0], start, ops.cast(k, cache.dtype))
                v = ops.slice_update(cache[:, 1], start, ops.cast(v, cache.dtype))
                cache = ops.stack([k, v], axis=1)  # 2 x (B, S_max, N_kv, H) -> (B, 2, ...)
                query_offset = cache_update_index
                if not use_causal_mask and self.sliding_window is None:
                    # Positions past the last one written are empty.
                    filled = ops.arange(ops.shape(k)[1]) < cache_update_index + ops.shape(q)[1]
                    filled = ops.reshape(filled, (1, 1, 1, -1))  # (S_max,) -> (1, 1, 1, S_max)
                    mask = filled if mask is None else ops.logical_and(mask, filled)

        result = scaled_dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=use_causal_mask,
            return_weights=return_attention_scores,
            implementation=self.attention_implementation,
            sliding_window=self.sliding_window,
            query_offset=query_offset,
            dropout_rate=self.dropout,
            training=bool(training) and self.dropout > 0.0,
            seed=self.seed_generator,
        )
        context, weights = result if return_attention_scores else (result, None)
        output = self.output_dense(context)  # (B, T, N, Hv) -> (B, T, Dout)
        if query_mask is not None:
            query_mask = ops.cast(query_mask, output.dtype)
            output = output * query_mask[:, :, None]  # (B, T) -> (B, T, 1)
            if weights is not None:
                weights = weights * ops.cast(query_mask, weights.dtype)[:, None, :, None]
                # (B, T) -> (B, 1, T, 1)
        outputs = (output,)
        if return_attention_scores:
            outputs += (weights,)
        if cache is not None:
            outputs += (cache,)
        return outputs[0] if len(outputs) == 1 else outputs

    def compute_output_shape(self, query_shape, value_shape, key_shape=None, *args, **kwargs):
        return (*tuple(query_shape)[:-1], self._output_dim(query_shape))

    def compute_output_spec(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        attention_mask=None,
        use_causal_mask=False,
        cache=None,
        cache_update_index=None,
        training=None,
        return_attention_scores=False,
    ):
        batch, q_len = query.shape[0], query.shape[1]
        outputs = (
            keras.KerasTensor(
                self.compute_output_shape(query.shape, value.shape), self.compute_dtype
            ),
        )
        if return_attention_scores:
            k_len = value.shape[1] if cache is None else cache.shape[2]
            outputs += (
                keras.KerasTensor((batch, self.num_heads, q_len, k_len), self.compute_dtype),
            )
        if cache is not None:
            outputs += (keras.KerasTensor(cache.shape, cache.dtype),)
        return outputs[0] if len(outputs) == 1 else outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "value_dim": self.value_dim,
                "num_key_value_heads": self.num_key_value_heads,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "output_dim": self.output_dim,
                "sliding_window": self.sliding_window,
                "attention_implementation": self.attention_implementation,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "seed": self.seed,
            }
        )
        return config
