"""Attention encoder-decoder speech recognizers: `transformer` (default) and `rnn`.

Both models map normalised log-mel frames `(B, T, F)` to character logits and share one interface
used by training (`call`, `compute_loss`) and by decoding (`encode`, `initial_decoder_state`,
`decoder_step`, `decode_full`):

- `transformer`: convolutional subsampling x4 (two 3x3 stride-2 Conv2D over (time, mel), as in
  ESPnet), a Dense projection to `d_model`, sinusoidal positions, pre-norm
  `TransformerEncoderBlock`s with padding masks and a CTC head on the encoder; a decoder of
  `TransformerDecoderBlock`s with causal self-attention (key/value cache for decoding) and
  cross-attention to the encoder.
- `rnn`: the classic attention encoder-decoder: pyramidal bidirectional LSTM encoder (each
  pyramid level concatenates pairs of frames, halving the time axis), a CTC head, and an LSTM
  decoder whose states attend to the encoder with `BahdanauAttention` or `LuongAttention`
  (`dot`, `general`, `concat`); the attentional state `tanh(W [h_t; c_t])` gives the logits
  (Luong et al., 2015, without input feeding, so training runs the LSTM over the whole target
  sequence at once and decoding carries only the LSTM states).

Training minimises the joint CTC/attention loss of Watanabe et al. (2017),

    L = ctc_weight * L_ctc + (1 - ctc_weight) * L_att,

with label smoothing on L_att; both terms are summed over the batch and divided by the number of
target tokens. The recognizer is self-contained: the tokenizer, the feature parameters and the
feature normalisation statistics are constructor arguments (so they live in the `.keras` file's
config), an optional language model for beam search (`language_model`, character or word level)
is saved as an asset inside the same file, and loading needs no `custom_objects` once this
module is imported.

References:
    Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
    Dong et al., "Speech-Transformer", ICASSP 2018.
    Chan et al., "Listen, Attend and Spell", ICASSP 2016.
    Bahdanau et al., "Neural Machine Translation by Jointly Learning to Align and Translate",
    ICLR 2015. Luong et al., "Effective Approaches to Attention-based NMT", EMNLP 2015.
    Watanabe et al., "Hybrid CTC/Attention Architecture for End-to-End Speech Recognition",
    IEEE JSTSP 2017.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import keras
import numpy as np
from keras import ops

from pipelines.asr.lm import load_language_model, save_language_model
from pipelines.asr.tokenizer import CharTokenizer
from toolkit.layers.bahdanau_attention import BahdanauAttention
from toolkit.layers.luong_attention import LuongAttention
from toolkit.layers.sinusoidal_position_encoding import SinusoidalPositionEncoding
from toolkit.layers.spec_augment import SpecAugment
from toolkit.layers.transformer_decoder_block import TransformerDecoderBlock
from toolkit.layers.transformer_encoder_block import TransformerEncoderBlock

PACKAGE = "asr"


@dataclasses.dataclass
class SpecAugmentConfig:
    """SpecAugment settings (see `toolkit.layers.SpecAugment`); `enabled: false` turns it off."""

    enabled: bool = True
    freq_mask_count: int = 2
    freq_mask_width: int = 27
    time_mask_count: int = 2
    time_mask_width: int = 40
    time_mask_max_ratio: float = 0.1


@dataclasses.dataclass
class ModelConfig:
    """Architecture of the recognizer (the `model:` section of a config file).

    `architecture` picks the model; the `transformer` fields are `d_model`, `num_heads`,
    `encoder_layers`, `decoder_layers`, `intermediate_dim`, `conv_channels`; the `rnn` fields are
    `encoder_units`, `encoder_layers` (one pyramid level halves time for the first
    `time_reduction` levels), `decoder_units`, `attention`, `attention_units`.
    """

    architecture: Literal["transformer", "rnn"] = "transformer"
    d_model: int = 144
    num_heads: int = 4
    encoder_layers: int = 8
    decoder_layers: int = 3
    intermediate_dim: int = 576
    conv_channels: int = 64
    dropout: float = 0.1
    ctc_weight: float = 0.3
    label_smoothing: float = 0.1
    encoder_units: int = 192
    decoder_units: int = 256
    embedding_dim: int = 64
    time_reduction: int = 2
    attention: Literal["bahdanau", "luong_dot", "luong_general", "luong_concat"] = "bahdanau"
    attention_units: int = 128
    spec_augment: SpecAugmentConfig = dataclasses.field(default_factory=SpecAugmentConfig)

    def __post_init__(self):
        for name in ("d_model", "num_heads", "encoder_layers", "decoder_layers",
                     "intermediate_dim", "conv_channels", "encoder_units", "decoder_units",
                     "embedding_dim", "attention_units"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} must be positive. Received: {name}={value}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads. Received: d_model={self.d_model}, "
                f"num_heads={self.num_heads}"
            )
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1]. Received: {self.ctc_weight}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1). Received: {self.label_smoothing}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: {self.dropout}")
        if not 0 <= self.time_reduction <= 4:
            raise ValueError(
                f"time_reduction must be between 0 and 4. Received: {self.time_reduction}"
            )


@keras.saving.register_keras_serializable(package=PACKAGE)
class NoamSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Warm-up then inverse square-root decay (Vaswani et al., 2017).

    `lr(step) = peak_learning_rate * min((step + 1) / warmup_steps, sqrt(warmup_steps / (step + 1)))`:
    linear warm-up to `peak_learning_rate` at `warmup_steps`, then decay as `1/sqrt(step)`.

    Args:
        peak_learning_rate: float. Learning rate at the end of warm-up.
        warmup_steps: int. Warm-up length in optimizer steps.
    """

    def __init__(self, peak_learning_rate=1e-3, warmup_steps=1000):
        if warmup_steps <= 0:
            raise ValueError(f"warmup_steps must be positive. Received: {warmup_steps}")
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32") + 1.0
        warmup = ops.cast(self.warmup_steps, "float32")
        factor = ops.minimum(step / warmup, ops.sqrt(warmup / step))
        return self.peak_learning_rate * factor

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate, "warmup_steps": self.warmup_steps}


def subsampled_lengths(lengths, factor_log2: int):
    """Lengths after `factor_log2` "same"-padded stride-2 layers: ceil(L / 2) each time."""
    for _ in range(factor_log2):
        lengths = (lengths + 1) // 2
    return lengths


def ctc_loss(labels, logits, label_lengths, logit_lengths, blank_id=0, xla=False):
    """Per-utterance CTC negative log-likelihood, `(B,)`.

    The same loss as `keras.ops.ctc_loss(labels, logits, label_lengths, logit_lengths,
    mask_index=blank_id)`. Under TensorFlow, that runs `tf.nn.ctc_loss` with dense labels, a
    graph of TensorFlow ops that loops over time; with the labels as a `SparseTensor`,
    TensorFlow runs its C++ CTC kernel instead, with the same values and gradients: 9 ms
    against 222 ms for the loss and its gradient of 16 utterances of 96 frames and up to 64
    labels on a 2-core CPU, where the dense path took a third of the recognizer's training
    step. That kernel has no XLA version: with `xla=True` (the loss is compiled with XLA, as
    `model.compile(jit_compile=True)` does), and on other backends, `keras.ops.ctc_loss` runs.

    Args:
        labels: (B, L) int. Labels, padded after `label_lengths[b]` with `blank_id`, which is
            never a label.
        logits: (B, S, V) float. Unnormalised scores per frame.
        label_lengths: (B,) int.
        logit_lengths: (B,) int. Frames of each utterance.
        blank_id: int. The blank's id. Defaults to `0`.
        xla: bool. Whether the loss is compiled with XLA. Defaults to `False`.

    An utterance too short for its labels (fewer frames than labels plus repeated
    neighbours, which CTC must separate by a blank) has no CTC path: it gets a loss of 0 and no
    gradient, on every backend (TensorFlow's kernels give it an infinite or a huge loss).
    """
    labels = ops.cast(labels, "int32")
    label_lengths = ops.cast(label_lengths, "int32")
    positions = ops.arange(ops.shape(labels)[1])
    real = ops.expand_dims(positions, 0) < ops.expand_dims(label_lengths, 1)  # (B, L)
    repeats = ops.sum(
        ops.cast(ops.logical_and(real[:, 1:], labels[:, 1:] == labels[:, :-1]), "int32"), axis=1
    )
    feasible = ops.cast(logit_lengths, "int32") >= label_lengths + repeats  # (B,)
    if keras.backend.backend() == "tensorflow" and not xla:
        loss = _tensorflow_ctc_loss(labels, logits, real, logit_lengths, blank_id)
    else:
        loss = ops.ctc_loss(labels, logits, label_lengths, logit_lengths, mask_index=blank_id)
    return ops.where(feasible, loss, 0.0)


def _tensorflow_ctc_loss(labels, logits, real, logit_lengths, blank_id):
    """`tf.nn.ctc_loss`'s C++ kernel on sparse labels (`real`: (B, L) True for labels)."""
    import tensorflow as tf

    indices = tf.where(real)
    values = tf.gather_nd(labels, indices)
    # TensorFlow's kernel takes the blank as the last class: move it there.
    values = tf.where(values > blank_id, values - 1, values)
    logits = tf.concat(
        [logits[..., :blank_id], logits[..., blank_id + 1 :], logits[..., blank_id : blank_id + 1]],
        axis=-1,
    )  # (B, S, V), blank last
    sparse = tf.SparseTensor(indices, values, tf.shape(labels, out_type="int64"))
    return tf.compat.v1.nn.ctc_loss(
        sparse,
        logits,
        tf.cast(logit_lengths, "int32"),
        time_major=False,
        ignore_longer_outputs_than_inputs=True,
    )


def length_mask(lengths, max_length):
    """Boolean (B, T) mask, True for the first `lengths[b]` steps."""
    positions = ops.arange(max_length)
    return ops.expand_dims(positions, 0) < ops.expand_dims(ops.cast(lengths, "int32"), 1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeatureNormalization(keras.layers.Layer):
    """Per-band standardisation `(x - mean) / std` with fixed statistics.

    Args:
        mean: list of F floats. Per-band mean of the training features.
        std: list of F floats. Per-band standard deviation (positive).

    The statistics are both constructor arguments (so they are in the model's config) and
    non-trainable weights.
    """

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in np.asarray(mean).reshape(-1)]
        self.std = [float(v) for v in np.asarray(std).reshape(-1)]
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")

    def build(self, input_shape=None):
        size = len(self.mean)
        self.mean_weight = self.add_weight(
            shape=(size,), initializer=keras.initializers.Constant(self.mean),
            trainable=False, name="mean",
        )
        self.std_weight = self.add_weight(
            shape=(size,), initializer=keras.initializers.Constant(self.std),
            trainable=False, name="std",
        )
        self.built = True

    def call(self, inputs):
        return (ops.cast(inputs, self.compute_dtype) - self.mean_weight) / self.std_weight

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"mean": self.mean, "std": self.std})
        return config


class _Recognizer(keras.Model):
    """Shared parts: feature normalisation, SpecAugment, CTC head, loss, metadata, building."""

    def __init__(
        self,
        vocab_size,
        model_config=None,
        tokenizer=None,
        feature_params=None,
        feature_stats=None,
        decoding=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model_config = dict(model_config or {})
        # Decoding settings chosen at training (beam_size, ctc_weight, lm_weight): the defaults
        # of `evaluate` and `transcribe` for this model (`Decoder.settings`).
        self.decoding = dict(decoding or {})
        self.config = ModelConfig(**{
            **self.model_config,
            "spec_augment": SpecAugmentConfig(**self.model_config.get("spec_augment", {})),
        })
        self.vocab_size = int(vocab_size)
        self.tokenizer = dict(tokenizer or CharTokenizer().get_config())
        self.feature_params = dict(feature_params or {})
        n_mels = int(self.feature_params.get("n_mels", 80))
        self.n_mels = n_mels
        stats = dict(feature_stats or {})
        self.feature_stats = stats
        mean = np.asarray(stats.get("mean", np.zeros(n_mels)), "float32")
        std = np.asarray(stats.get("std", np.ones(n_mels)), "float32")
        self.normalization = FeatureNormalization(
            mean, std, name="normalization", dtype="float32"
        )
        sa = self.config.spec_augment
        self.spec_augment = SpecAugment(
            freq_mask_count=sa.freq_mask_count if sa.enabled else 0,
            freq_mask_width=sa.freq_mask_width,
            time_mask_count=sa.time_mask_count if sa.enabled else 0,
            time_mask_width=sa.time_mask_width,
            time_mask_max_ratio=sa.time_mask_max_ratio,
            name="spec_augment",
        )
        self.ctc_dense = keras.layers.Dense(vocab_size, name="ctc_dense", dtype="float32")

    # ---- the optional language model, saved inside the `.keras` file as an asset --------
    language_model = None
    """A `pipelines.asr.lm` `CharNgramLM` or `WordNgramLM` for beam search, or None."""

    def save_assets(self, dir_path):
        if self.language_model is not None:
            save_language_model(self.language_model, dir_path)

    def load_assets(self, dir_path):
        self.language_model = load_language_model(dir_path)

    # ---- metadata -----------------------------------------------------------------------
    def get_tokenizer(self) -> CharTokenizer:
        """The tokenizer stored with the model."""
        return CharTokenizer.from_config(self.tokenizer)

    def get_config(self):
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "model_config": self.model_config,
            "tokenizer": self.tokenizer,
            "feature_params": self.feature_params,
            "feature_stats": self.feature_stats,
            "decoding": self.decoding,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def build(self, input_shape=None):
        # Sub-layers are built by the first call (`build_with_dummy_input`).
        self.built = True

    def build_from_config(self, config):
        self.build_with_dummy_input()

    def get_build_config(self):
        return {"dummy": True}

    def build_with_dummy_input(self):
        """Create every weight by running the model once on a tiny zero batch."""
        if self.weights:
            return
        self(self.dummy_inputs(), training=False)

    def dummy_inputs(self, batch=1, frames=32, tokens=3):
        return {
            "features": np.zeros((batch, frames, self.n_mels), "float32"),
            "feature_mask": np.ones((batch, frames), "bool"),
            "decoder_tokens": np.ones((batch, tokens), "int32"),
        }

    # ---- the pieces decoding uses ------------------------------------------------------
    def prepare_features(self, features, feature_lengths, training=False):
        """Normalise, zero the padding and (in training) SpecAugment. Returns (x, mask)."""
        mask = length_mask(feature_lengths, ops.shape(features)[1])
        x = self.normalization(ops.cast(features, "float32"))
        x = ops.where(ops.expand_dims(mask, -1), x, 0.0)
        if training:
            x = self.spec_augment(x, padding_mask=mask, training=training)
        return x, mask

    def call(self, inputs, training=False):
        """Teacher-forced forward pass.

        Args:
            inputs: dict with `features` (B, T, F) float, `feature_mask` (B, T) bool (True for
                real frames) and `decoder_tokens` (B, U) int decoder inputs (`<s>` then the
                text, padded with 0), as `pipelines.asr.batching.ASRBatches` yields them.

        Returns:
            dict with `logits` (B, U, V) decoder logits, `ctc_logits` (B, S, V) encoder CTC
            logits and `encoder_lengths` (B,).
        """
        lengths = ops.sum(ops.cast(inputs["feature_mask"], "int32"), axis=1)
        encoded, encoder_mask, ctc_logits = self.encode(
            inputs["features"], lengths, training=training
        )
        logits = self.decode_full(inputs["decoder_tokens"], encoded, encoder_mask, training=training)
        return {
            "logits": logits,
            "ctc_logits": ctc_logits,
            "encoder_lengths": ops.sum(ops.cast(encoder_mask, "int32"), axis=1),
        }

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Joint CTC/attention loss.

        `y` is a dict: `decoder` (B, U) next-token targets (the text then `</s>`, padded with 0)
        and `ctc` (B, L) CTC labels (the text, padded with 0).
        """
        del sample_weight
        targets = ops.cast(y["decoder"], "int32")
        token_mask = ops.cast(targets != 0, "float32")
        num_tokens = ops.maximum(ops.sum(token_mask), 1.0)
        logits = ops.cast(y_pred["logits"], "float32")
        log_probs = ops.log_softmax(logits, axis=-1)
        one_hot = ops.one_hot(targets, self.vocab_size)
        eps = self.config.label_smoothing
        smoothed = one_hot * (1.0 - eps) + eps / self.vocab_size
        att = -ops.sum(ops.sum(smoothed * log_probs, axis=-1) * token_mask) / num_tokens
        weight = self.config.ctc_weight
        if weight <= 0.0:
            return att
        labels = ops.cast(y["ctc"], "int32")
        label_lengths = ops.sum(ops.cast(labels != 0, "int32"), axis=1)
        ctc = ctc_loss(
            labels,
            ops.cast(y_pred["ctc_logits"], "float32"),
            label_lengths,
            ops.cast(y_pred["encoder_lengths"], "int32"),
            blank_id=CharTokenizer.blank_id,
            xla=bool(getattr(self, "compiled", False) and self.jit_compile),
        )
        ctc = ops.sum(ctc) / num_tokens
        return weight * ctc + (1.0 - weight) * att

    def ctc_log_probs(self, ctc_logits):
        return ops.log_softmax(ops.cast(ctc_logits, "float32"), axis=-1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerRecognizer(_Recognizer):
    """Conv-subsampled Transformer encoder, Transformer decoder and a CTC head.

    Args:
        vocab_size: int. Number of token ids (blank/pad 0, `<s>` 1, `</s>` 2, ...).
        model_config: dict. The fields of `ModelConfig`.
        tokenizer: dict. `CharTokenizer.get_config()`.
        feature_params: dict. `FeatureParams.get_config()` of the training features.
        feature_stats: dict. `FeatureStats.get_config()`: per-band `mean` and `std`.
        decoding: dict. Default decoding settings for this model (`beam_size`, `ctc_weight`,
            `lm_weight`), chosen at training.

    Call arguments: see `call`. Decoding: `encode`, `initial_decoder_state`, `decoder_step`,
    `decode_full`.
    """

    subsampling_log2 = 2

    def __init__(self, vocab_size, model_config=None, **kwargs):
        super().__init__(vocab_size, model_config=model_config, **kwargs)
        c = self.config
        self.conv1 = keras.layers.Conv2D(
            c.conv_channels, 3, strides=2, padding="same", activation="relu", name="conv1"
        )
        self.conv2 = keras.layers.Conv2D(
            c.conv_channels, 3, strides=2, padding="same", activation="relu", name="conv2"
        )
        self.input_projection = keras.layers.Dense(c.d_model, name="input_projection")
        self.positions = SinusoidalPositionEncoding(name="positions")
        self.encoder_dropout = keras.layers.Dropout(c.dropout, name="encoder_dropout")
        self.encoder_blocks = [
            TransformerEncoderBlock(
                num_heads=c.num_heads,
                key_dim=c.d_model // c.num_heads,
                intermediate_dim=c.intermediate_dim,
                dropout=c.dropout,
                normalize_first=True,
                name=f"encoder_block_{i}",
            )
            for i in range(c.encoder_layers)
        ]
        self.encoder_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="encoder_norm")
        self.embedding = keras.layers.Embedding(vocab_size, c.d_model, name="embedding")
        self.decoder_dropout = keras.layers.Dropout(c.dropout, name="decoder_dropout")
        self.decoder_blocks = [
            TransformerDecoderBlock(
                num_heads=c.num_heads,
                key_dim=c.d_model // c.num_heads,
                intermediate_dim=c.intermediate_dim,
                dropout=c.dropout,
                normalize_first=True,
                name=f"decoder_block_{i}",
            )
            for i in range(c.decoder_layers)
        ]
        self.decoder_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="decoder_norm")
        self.output_dense = keras.layers.Dense(vocab_size, name="output_dense", dtype="float32")

    @property
    def head_dim(self):
        return self.config.d_model // self.config.num_heads

    def encode(self, features, feature_lengths, training=False):
        """Encoder: (B, T, F) features -> (encoded (B, S, D), mask (B, S), ctc_logits (B, S, V))."""
        x, _ = self.prepare_features(features, feature_lengths, training)
        x = ops.expand_dims(x, -1)  # (B, T, F) -> (B, T, F, 1)
        x = self.conv2(self.conv1(x))  # (B, T/4, F/4, C)
        shape = ops.shape(x)
        x = ops.reshape(x, (shape[0], shape[1], shape[2] * shape[3]))  # -> (B, S, F/4 * C)
        x = self.input_projection(x)
        x = x * math.sqrt(self.config.d_model) + self.positions(x)
        x = self.encoder_dropout(x, training=training)
        lengths = subsampled_lengths(ops.cast(feature_lengths, "int32"), self.subsampling_log2)
        mask = length_mask(lengths, ops.shape(x)[1])
        for block in self.encoder_blocks:
            x = block(x, padding_mask=mask, training=training)
        x = self.encoder_norm(x)
        return x, mask, self.ctc_dense(x)

    def _embed(self, tokens, start_index=0, training=False):
        x = self.embedding(tokens) * math.sqrt(self.config.d_model)
        x = x + self.positions(x, start_index=start_index)
        return self.decoder_dropout(x, training=training)

    def decode_full(self, tokens, encoded, encoder_mask, training=False, return_alignment=False):
        """Decoder on a whole token sequence (B, U) -> logits (B, U, V) [, alignment (B, U, S)].

        The alignment is the last block's cross-attention averaged over heads.
        """
        x = self._embed(tokens, training=training)
        alignment = None
        for i, block in enumerate(self.decoder_blocks):
            want = return_alignment and i == len(self.decoder_blocks) - 1
            out = block(
                x,
                encoded,
                encoder_padding_mask=encoder_mask,
                use_causal_mask=True,
                training=training,
                return_attention_scores=want,
            )
            if want:
                x, (_, cross) = out[0], out[1:3]
                alignment = ops.mean(cross, axis=1)  # (B, N, U, S) -> (B, U, S)
            else:
                x = out
        logits = self.output_dense(self.decoder_norm(x))
        if return_alignment:
            return logits, alignment
        return logits

    def initial_decoder_state(self, encoded, encoder_mask, max_length):
        """Decoder state for `decoder_step`: cross-attention caches and empty self caches.

        Returns a dict of tensors whose first axis is the batch (so beam search can reorder
        hypotheses with `ops.take(..., axis=0)`).
        """
        batch = ops.shape(encoded)[0]
        state = {"encoder_mask": encoder_mask}
        for i, block in enumerate(self.decoder_blocks):
            state[f"cross_{i}"] = block.compute_cross_attention_cache(encoded)
            state[f"self_{i}"] = block.init_self_attention_cache(batch, max_length)
        return state

    def decoder_step(self, tokens, state, index):
        """One cached decoder step.

        Args:
            tokens: (B,) int, the previous token of each hypothesis.
            state: dict from `initial_decoder_state` (or a previous step).
            index: scalar int tensor, the position of `tokens` in the output.

        Returns:
            `(log_probs (B, V), new_state, alignment (B, S))`.
        """
        x = self._embed(ops.expand_dims(tokens, 1), start_index=index)  # (B, 1, D)
        new_state = {"encoder_mask": state["encoder_mask"]}
        alignment = None
        last = len(self.decoder_blocks) - 1
        for i, block in enumerate(self.decoder_blocks):
            out = block(
                x,
                None,
                encoder_padding_mask=state["encoder_mask"],
                self_attention_cache=state[f"self_{i}"],
                self_attention_cache_update_index=index,
                cross_attention_cache=state[f"cross_{i}"],
                use_causal_mask=True,
                return_attention_scores=i == last,
            )
            if i == last:
                x, _, cross, self_cache, cross_cache = out
                alignment = ops.mean(cross[:, :, 0, :], axis=1)  # (B, N, 1, S) -> (B, S)
            else:
                x, self_cache, cross_cache = out
            new_state[f"self_{i}"] = self_cache
            new_state[f"cross_{i}"] = cross_cache
        logits = self.output_dense(self.decoder_norm(x))[:, 0, :]
        return ops.log_softmax(logits, axis=-1), new_state, alignment


@keras.saving.register_keras_serializable(package=PACKAGE)
class RNNRecognizer(_Recognizer):
    """Pyramidal BiLSTM encoder, attention LSTM decoder and a CTC head.

    Args: as `TransformerRecognizer`. The `model_config` fields used are `encoder_units`,
    `encoder_layers`, `time_reduction`, `decoder_units`, `embedding_dim`, `attention`,
    `attention_units`, `dropout`, `ctc_weight`, `label_smoothing`.
    """

    def __init__(self, vocab_size, model_config=None, **kwargs):
        super().__init__(vocab_size, model_config=model_config, **kwargs)
        c = self.config
        self.subsampling_log2 = c.time_reduction
        self.encoder_lstms = [
            keras.layers.Bidirectional(
                keras.layers.LSTM(c.encoder_units, return_sequences=True),
                name=f"encoder_bilstm_{i}",
            )
            for i in range(c.encoder_layers)
        ]
        self.encoder_dropout = keras.layers.Dropout(c.dropout, name="encoder_dropout")
        self.embedding = keras.layers.Embedding(vocab_size, c.embedding_dim, name="embedding")
        self.decoder_lstm = keras.layers.LSTM(
            c.decoder_units, return_sequences=True, return_state=True, name="decoder_lstm"
        )
        if c.attention == "bahdanau":
            self.attention = BahdanauAttention(c.attention_units, name="attention")
        else:
            mode = c.attention.split("_", 1)[1]
            self.attention = LuongAttention(
                score_mode=mode,
                units=c.attention_units if mode == "concat" else None,
                name="attention",
            )
        # Luong's "dot" score needs queries and keys of one size: project the encoder output.
        self.encoder_projection = keras.layers.Dense(c.decoder_units, name="encoder_projection")
        self.attentional = keras.layers.Dense(c.decoder_units, activation="tanh", name="attentional")
        self.decoder_dropout = keras.layers.Dropout(c.dropout, name="decoder_dropout")
        self.output_dense = keras.layers.Dense(vocab_size, name="output_dense", dtype="float32")

    def encode(self, features, feature_lengths, training=False):
        """Encoder: (B, T, F) -> (encoded (B, S, D), mask (B, S), ctc_logits (B, S, V))."""
        x, _ = self.prepare_features(features, feature_lengths, training)
        lengths = ops.cast(feature_lengths, "int32")
        factor = 2**self.subsampling_log2
        frames = ops.shape(x)[1]
        pad = (-frames) % factor
        x = ops.pad(x, [[0, 0], [0, pad], [0, 0]])  # (B, T, F) -> (B, T', F), T' % factor == 0
        for i, lstm in enumerate(self.encoder_lstms):
            if i > 0 and i <= self.subsampling_log2:
                shape = ops.shape(x)
                # Pyramid level: concatenate pairs of frames, (B, T, D) -> (B, T/2, 2D).
                x = ops.reshape(x, (shape[0], shape[1] // 2, 2 * shape[2]))
                lengths = (lengths + 1) // 2
            mask = length_mask(lengths, ops.shape(x)[1])
            x = lstm(x, mask=mask, training=training)
            x = self.encoder_dropout(x, training=training)
        if self.subsampling_log2 >= len(self.encoder_lstms):
            for _ in range(self.subsampling_log2 - len(self.encoder_lstms) + 1):
                shape = ops.shape(x)
                x = ops.reshape(x, (shape[0], shape[1] // 2, 2 * shape[2]))
                lengths = (lengths + 1) // 2
        mask = length_mask(lengths, ops.shape(x)[1])
        x = ops.where(ops.expand_dims(mask, -1), x, 0.0)
        return self.encoder_projection(x), mask, self.ctc_dense(x)

    def _output(self, states, encoded, encoder_mask, training=False):
        context, weights = self.attention(
            states, encoded, value_mask=encoder_mask, return_attention_scores=True
        )
        h = self.attentional(ops.concatenate([states, context], axis=-1))
        h = self.decoder_dropout(h, training=training)
        return self.output_dense(h), weights

    def decode_full(self, tokens, encoded, encoder_mask, training=False, return_alignment=False):
        """Decoder on a whole token sequence (B, U) -> logits (B, U, V) [, alignment (B, U, S)]."""
        x = self.embedding(tokens)
        states, _, _ = self.decoder_lstm(x, training=training)
        logits, weights = self._output(states, encoded, encoder_mask, training)
        if return_alignment:
            return logits, weights
        return logits

    def initial_decoder_state(self, encoded, encoder_mask, max_length):
        """Decoder state: zero LSTM states plus the encoder output and mask."""
        del max_length
        batch = ops.shape(encoded)[0]
        zeros = ops.zeros((batch, self.config.decoder_units), encoded.dtype)
        return {"encoder": encoded, "encoder_mask": encoder_mask, "h": zeros, "c": zeros}

    def decoder_step(self, tokens, state, index):
        """One decoder step: `(log_probs (B, V), new_state, alignment (B, S))`."""
        del index
        x = self.embedding(ops.expand_dims(tokens, 1))  # (B, 1, E)
        states, h, c = self.decoder_lstm(x, initial_state=[state["h"], state["c"]])
        logits, weights = self._output(states, state["encoder"], state["encoder_mask"])
        new_state = dict(state, h=h, c=c)
        return ops.log_softmax(logits[:, 0, :], axis=-1), new_state, weights[:, 0, :]


ARCHITECTURES = {"transformer": TransformerRecognizer, "rnn": RNNRecognizer}


def build_recognizer(
    model_config: ModelConfig,
    tokenizer: CharTokenizer | None = None,
    feature_params: dict | None = None,
    feature_stats: dict | None = None,
    decoding: dict | None = None,
):
    """Create (and build) the recognizer that `model_config.architecture` names.

    `decoding` holds the default decoding settings stored with the model (`beam_size`,
    `ctc_weight`, `lm_weight`).
    """
    tokenizer = tokenizer or CharTokenizer()
    config = dataclasses.asdict(model_config)
    cls = ARCHITECTURES[model_config.architecture]
    model = cls(
        vocab_size=tokenizer.vocab_size,
        model_config=config,
        tokenizer=tokenizer.get_config(),
        feature_params=feature_params or {},
        feature_stats=feature_stats or {},
        decoding=decoding or {},
        name=f"{model_config.architecture}_recognizer",
    )
    model.build_with_dummy_input()
    return model
