"""Transformer decoder block: causal self-attention, cross-attention and feed-forward."""

from __future__ import annotations

import keras

from toolkit.layers.feed_forward import FeedForward
from toolkit.layers.multi_head_attention import MultiHeadAttention
from toolkit.layers.transformer_encoder_block import _check_block_arguments


@keras.saving.register_keras_serializable(package="toolkit")
class TransformerDecoderBlock(keras.layers.Layer):
    """One Transformer decoder layer with key/value caches for incremental decoding.

    Three residual sub-layers; pre-norm (`normalize_first=True`, the default):

    `x = x + Dropout(SelfMHA(LN(x), causal))`,
    `x = x + Dropout(CrossMHA(LN(x), encoder_sequence))`,
    `x = x + Dropout(FFN(LN(x)))`;

    post-norm (`normalize_first=False`) applies each LN after the residual sum instead. The
    cross-attention sub-layer exists when the block is built with an encoder sequence (first
    call or `build(decoder_sequence_shape, encoder_sequence_shape)`); without one the block is a
    decoder-only (GPT-style) layer. A stack of pre-norm blocks needs one final LayerNorm after
    the last block; that belongs to the model.

    Incremental decoding. Caches have the layout of `toolkit.layers.MultiHeadAttention`:
    (B, 2, S, N_kv, H), keys at index 0 and values at index 1.

    1. Once per utterance, `cross_cache = block.compute_cross_attention_cache(encoder_out)`
       projects the encoder output to keys/values: (B, 2, S, N_kv, H).
    2. `self_cache = block.init_self_attention_cache(batch_size, max_length)` gives a zero
       self-attention cache (B, 2, max_length, N_kv, H).
    3. Step i: `y, self_cache, cross_cache = block(x_i, encoder_out,
       self_attention_cache=self_cache, self_attention_cache_update_index=i,
       cross_attention_cache=cross_cache)` with x_i (B, 1, D); the step's key/value are written
       at index i and it attends to positions 0..i. Several positions (B, T, D) can be written at
       once (prompt pre-fill). If a self cache is given but no cross cache, the cross cache is
       computed from `encoder_sequence` and returned, so the next step can reuse it.

    Beam search reorders both caches along the batch axis with `ops.take(cache, beam_ids, 0)`.

    Args:
        num_heads: int. Number of attention heads N (self- and cross-attention).
        key_dim: int. Size H of each query/key/value head.
        intermediate_dim: int. Hidden width of the feed-forward network.
        num_key_value_heads: int or `None`. Number of key/value heads (grouped-query
            attention); must divide `num_heads`. Defaults to `None` (= `num_heads`).
        dropout: float. Rate of the attention-probability dropout and of the dropout on the
            residual branches. Defaults to `0.0`.
        activation: string. Feed-forward activation: `"gelu"`, `"relu"` or `"swiglu"`.
            Defaults to `"gelu"`.
        normalize_first: bool. Pre-norm if `True`, post-norm if `False`. Defaults to `True`.
        layer_norm_epsilon: float. Epsilon of the layer normalisations. Defaults to `1e-5`.
        use_bias: bool. Whether the projections have biases. Defaults to `True`.
        attention_implementation: string. `"auto"`, `"explicit"`, `"fused"` or `"chunked"`,
            passed to both `MultiHeadAttention` layers. Defaults to `"auto"`.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        decoder_sequence: (B, T, D) decoder inputs (T = 1 for one cached decoding step).
        encoder_sequence: optional (B, S, De) encoder outputs to attend to. May be left out
            when `cross_attention_cache` is given.
        decoder_padding_mask: optional boolean (B, T), True = real token. Without a self cache
            it masks both queries and keys; with a cache it masks the T query rows only (keys
            after the current position are already excluded by the causal mask).
        encoder_padding_mask: optional boolean (B, S), True = real frame.
        self_attention_cache: optional (B, 2, S_max, N_kv, H) self-attention cache.
        self_attention_cache_update_index: int or scalar tensor. Where the T new keys/values
            are written in the self cache; the causal mask is offset by it.
        cross_attention_cache: optional (B, 2, S, N_kv, H) from `compute_cross_attention_cache`.
        use_causal_mask: bool. Whether the self-attention is causal. Defaults to `True`.
        training: bool. Whether dropout is active.
        return_attention_scores: bool. Whether to also return the attention weights.

    Returns:
        The output (B, T, D); then, if `return_attention_scores=True`, the self-attention
        weights (B, N, T, T) ((B, N, T, S_max) with a self cache) and the cross-attention weights
        (B, N, T, S) (`None` without cross-attention); then, if any cache is given, the updated
        self-attention cache and the cross-attention cache.

    Example:

    >>> import numpy as np
    >>> block = TransformerDecoderBlock(num_heads=2, key_dim=8, intermediate_dim=32)
    >>> tokens = np.random.rand(2, 5, 16).astype("float32")
    >>> encoder_out = np.random.rand(2, 12, 16).astype("float32")
    >>> y = block(tokens, encoder_out)  # full causal pass (training)
    >>> cross_cache = block.compute_cross_attention_cache(encoder_out)
    >>> self_cache = block.init_self_attention_cache(batch_size=2, max_length=5)
    >>> step, self_cache, cross_cache = block(
    ...     tokens[:, :1], encoder_out, self_attention_cache=self_cache,
    ...     self_attention_cache_update_index=0, cross_attention_cache=cross_cache)
    >>> tuple(y.shape), tuple(step.shape), tuple(cross_cache.shape)
    ((2, 5, 16), (2, 1, 16), (2, 2, 12, 2, 8))

    References:
        - [Vaswani et al., 2017. Attention Is All You Need](https://arxiv.org/abs/1706.03762)
        - [Xiong et al., 2020. On Layer Normalization in the Transformer
          Architecture](https://arxiv.org/abs/2002.04745)
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        intermediate_dim,
        num_key_value_heads=None,
        dropout=0.0,
        activation="gelu",
        normalize_first=True,
        layer_norm_epsilon=1e-5,
        use_bias=True,
        attention_implementation="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_block_arguments(num_heads, key_dim, intermediate_dim, num_key_value_heads, dropout)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.intermediate_dim = intermediate_dim
        self.num_key_value_heads = num_key_value_heads
        self.dropout = dropout
        self.activation = activation
        self.normalize_first = normalize_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_bias = use_bias
        self.attention_implementation = attention_implementation
        self.self_attention = self._attention("self_attention")
        self.self_attention_norm = self._norm("self_attention_norm")
        self.self_attention_dropout = self._dropout("self_attention_dropout")
        self.cross_attention = None
        self.cross_attention_norm = None
        self.cross_attention_dropout = None
        self.feed_forward = FeedForward(
            intermediate_dim,
            activation=activation,
            use_bias=use_bias,
            name="feed_forward",
            dtype=self.dtype_policy,
        )
        self.feed_forward_norm = self._norm("feed_forward_norm")
        self.feed_forward_dropout = self._dropout("feed_forward_dropout")

    def _attention(self, name):
        return MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=self.key_dim,
            num_key_value_heads=self.num_key_value_heads,
            dropout=self.dropout,
            use_bias=self.use_bias,
            attention_implementation=self.attention_implementation,
            name=name,
            dtype=self.dtype_policy,
        )

    def _norm(self, name):
        return keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name=name, dtype=self.dtype_policy
        )

    def _dropout(self, name):
        return keras.layers.Dropout(self.dropout, name=name, dtype=self.dtype_policy)

    @property
    def _cache_heads(self):
        return self.num_key_value_heads or self.num_heads

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        self.self_attention.build(decoder_sequence_shape, decoder_sequence_shape)
        self.self_attention_norm.build(decoder_sequence_shape)
        if encoder_sequence_shape is not None:
            self.cross_attention = self._attention("cross_attention")
            self.cross_attention.build(decoder_sequence_shape, encoder_sequence_shape)
            self.cross_attention_norm = self._norm("cross_attention_norm")
            self.cross_attention_norm.build(decoder_sequence_shape)
            self.cross_attention_dropout = self._dropout("cross_attention_dropout")
        self.feed_forward.build(decoder_sequence_shape)
        self.feed_forward_norm.build(decoder_sequence_shape)
        self.built = True

    def init_self_attention_cache(self, batch_size, max_length, dtype=None):
        """Returns a zero self-attention cache (B, 2, max_length, N_kv, H).

        Args:
            batch_size: int or scalar tensor. B (batch times beams for beam search).
            max_length: int. The most decoder positions the cache can hold.
            dtype: dtype of the cache. Defaults to the layer's compute dtype.
        """
        return self.self_attention.init_cache(batch_size, max_length, dtype=dtype)

    def compute_cross_attention_cache(self, encoder_sequence):
        """Projects the encoder output once to cross-attention keys/values (B, 2, S, N_kv, H).

        The block must have been built with an encoder sequence (called once on one, or built
        with `build(decoder_sequence_shape, encoder_sequence_shape)`, as a `.keras` reload does).
        """
        if self.cross_attention is None:
            raise ValueError(
                f"{self.name} has no cross-attention: it was built without an encoder sequence. "
                "Call it once with `encoder_sequence` (or build it with "
                "`encoder_sequence_shape`) first."
            )
        return self.cross_attention.compute_cache(encoder_sequence)

    def call(
        self,
        decoder_sequence,
        encoder_sequence=None,
        decoder_padding_mask=None,
        encoder_padding_mask=None,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        cross_attention_cache=None,
        use_causal_mask=True,
        training=None,
        return_attention_scores=False,
    ):
        use_cache = self_attention_cache is not None or cross_attention_cache is not None
        x = decoder_sequence

        # Causal self-attention.
        residual = x
        if self.normalize_first:
            x = self.self_attention_norm(x)
        kwargs = {}
        if self_attention_cache is not None:
            kwargs = {
                "cache": self_attention_cache,
                "cache_update_index": self_attention_cache_update_index,
            }
        else:
            kwargs = {"value_mask": decoder_padding_mask}
        outputs = self.self_attention(
            x,
            x,
            query_mask=decoder_padding_mask,
            use_causal_mask=use_causal_mask,
            training=training,
            return_attention_scores=return_attention_scores,
            **kwargs,
        )
        attended, self_weights, self_attention_cache = _unpack(
            outputs, return_attention_scores, self_attention_cache is not None
        )
        x = residual + self.self_attention_dropout(attended, training=training)
        if not self.normalize_first:
            x = self.self_attention_norm(x)

        # Cross-attention to the encoder output.
        cross_weights = None
        if self.cross_attention is not None and (
            encoder_sequence is not None or cross_attention_cache is not None
        ):
            if use_cache and cross_attention_cache is None:
                cross_attention_cache = self.compute_cross_attention_cache(encoder_sequence)
            residual = x
            if self.normalize_first:
                x = self.cross_attention_norm(x)
            kwargs = {}
            if cross_attention_cache is not None:
                kwargs["cache"] = cross_attention_cache
            outputs = self.cross_attention(
                x,
                encoder_sequence,
                query_mask=decoder_padding_mask,
                value_mask=encoder_padding_mask,
                training=training,
                return_attention_scores=return_attention_scores,
                **kwargs,
            )
            attended, cross_weights, _ = _unpack(
                outputs, return_attention_scores, cross_attention_cache is not None
            )
            x = residual + self.cross_attention_dropout(attended, training=training)
            if not self.normalize_first:
                x = self.cross_attention_norm(x)

        # Position-wise feed-forward.
        residual = x
        if self.normalize_first:
            x = self.feed_forward_norm(x)
        x = residual + self.feed_forward_dropout(self.feed_forward(x), training=training)
        if not self.normalize_first:
            x = self.feed_forward_norm(x)

        results = (x,)
        if return_attention_scores:
            results += (self_weights, cross_weights)
        if use_cache:
            results += (self_attention_cache, cross_attention_cache)
        return results[0] if len(results) == 1 else results

    def compute_output_shape(self, decoder_sequence_shape, encoder_sequence_shape=None):
        return tuple(decoder_sequence_shape)

    def compute_output_spec(
        self,
        decoder_sequence,
        encoder_sequence=None,
        decoder_padding_mask=None,
        encoder_padding_mask=None,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        cross_attention_cache=None,
        use_causal_mask=True,
        training=None,
        return_attention_scores=False,
    ):
        def spec(shape):
            return keras.KerasTensor(tuple(shape), dtype=self.compute_dtype)

        batch, length = decoder_sequence.shape[0], decoder_sequence.shape[1]
        results = (spec(decoder_sequence.shape),)
        has_cross = self.cross_attention is not None and (
            encoder_sequence is not None or cross_attention_cache is not None
        )
        if cross_attention_cache is not None:
            source_length = cross_attention_cache.shape[2]
        elif encoder_sequence is not None:
            source_length = encoder_sequence.shape[1]
        if return_attention_scores:
            keys = length if self_attention_cache is None else self_attention_cache.shape[2]
            results += (
                spec((batch, self.num_heads, length, keys)),
                spec((batch, self.num_heads, length, source_length)) if has_cross else None,
            )
        if self_attention_cache is not None or cross_attention_cache is not None:
            results += (
                None if self_attention_cache is None else spec(self_attention_cache.shape),
                spec((batch, 2, source_length, self._cache_heads, self.key_dim))
                if has_cross
                else None,
            )
        return results[0] if len(results) == 1 else results

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_key_value_heads": self.num_key_value_heads,
                "dropout": self.dropout,
                "activation": self.activation,
                "normalize_first": self.normalize_first,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "use_bias": self.use_bias,
                "attention_implementation": self.attention_implementation,
            }
        )
        return config


def _unpack(outputs, with_weights, with_cache):
    """Splits MultiHeadAttention's `output[, weights][, cache]` into a fixed triple."""
    if not (with_weights or with_cache):
        return outputs, None, None
    outputs = list(outputs)
    output = outputs.pop(0)
    weights = outputs.pop(0) if with_weights else None
    cache = outputs.pop(0) if with_cache else None
    return output, weights, cache
