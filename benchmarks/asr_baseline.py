"""The keras.io "Automatic Speech Recognition with Transformer" example, re-implemented.

Re-implemented from the example's published description (Apoorv Nandan, keras.io, 2021) for a
side-by-side comparison in `benchmarks/asr.py`, on the same data and time budget:

- features: square root of the STFT magnitude (frame length 200 samples, hop 80, FFT 256 ->
  129 bins), standardised per utterance;
- `SpeechFeatureEmbedding`: three Conv1D (kernel 11, stride 2, `same`, ReLU) to d_model = 200;
- 4 post-norm Transformer encoder blocks and 1 decoder block (2 heads, feed-forward 400, dropout
  0.1, layer-norm epsilon 1e-6) built from `keras.layers.MultiHeadAttention`;
- character tokens with a learned position embedding; label-smoothed (0.1) cross-entropy; Adam
  with the example's linear warm-up / linear decay schedule (per epoch, converted to steps);
- greedy decoding *without* a cache: the decoder runs over the whole prefix at every step.

It uses the same character tokenizer and corpus loader as the pipeline, so only the model,
features and decoding differ. Only the architecture is taken from the example; this is our code.

Reference: https://keras.io/examples/audio/transformer_asr/
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np
from keras import layers, ops

from pipelines.asr.features import load_audio
from pipelines.asr.tokenizer import CharTokenizer

FRAME_LENGTH, FRAME_STEP, FFT_LENGTH = 200, 80, 256
NUM_HID, NUM_HEAD, NUM_FF = 200, 2, 400
ENCODER_LAYERS, DECODER_LAYERS = 4, 1
MAX_TARGET = 200


def sqrt_stft(path, sample_rate=16000):
    """(frames, 129) square-root STFT magnitude, standardised per utterance (as the example)."""
    y = load_audio(path, sample_rate)
    if len(y) < FRAME_LENGTH:
        y = np.pad(y, (0, FRAME_LENGTH - len(y)))
    frames = 1 + (len(y) - FRAME_LENGTH) // FRAME_STEP
    index = np.arange(FRAME_LENGTH)[None, :] + FRAME_STEP * np.arange(frames)[:, None]
    window = np.hanning(FRAME_LENGTH + 1)[:-1]  # periodic Hann, as tf.signal.stft
    spectrum = np.abs(np.fft.rfft(y[index] * window, n=FFT_LENGTH))  # (frames, 129)
    x = np.sqrt(spectrum)
    mean, std = x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True)
    return ((x - mean) / np.maximum(std, 1e-6)).astype("float32")


class BaselineBatches(keras.utils.PyDataset):
    """Batches `((source, target_in), target_out)` padded to bucketed lengths."""

    def __init__(self, utterances, tokenizer, batch_size=16, seed=0, shuffle=True, **kwargs):
        super().__init__(**kwargs)
        self.utterances = list(utterances)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        order = np.argsort([u.duration for u in self.utterances])
        self.batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.shuffle = shuffle
        if shuffle:
            self.rng.shuffle(self.batches)
        self._lead_with_differing_shapes()

    def __len__(self):
        return len(self.batches)

    def on_epoch_end(self):
        if self.shuffle:
            self.rng.shuffle(self.batches)
        self._lead_with_differing_shapes()

    def _padded_shape(self, batch):
        """(frames, tokens) that `__getitem__` will pad `batch` to, from durations and texts."""
        items = [self.utterances[i] for i in batch]
        samples = max(int(round(u.duration * 16000)) for u in items)
        frames = 1 + max(samples - FRAME_LENGTH, 0) // FRAME_STEP
        tokens = max(len(self.tokenizer.encode(u.text)[: MAX_TARGET - 2]) for u in items)
        return math.ceil(frames / 256) * 256, math.ceil((tokens + 1) / 32) * 32

    def _lead_with_differing_shapes(self):
        # Keras' TensorFlow adapter takes the dataset signature from the first two batches: a
        # padded axis that is equal in both becomes fixed and later, longer buckets fail. Put two
        # batches that differ on both axes first (the longest, then one that differs from it).
        if len(self.batches) < 2:
            return
        shapes = [self._padded_shape(b) for b in self.batches]
        first = max(range(len(shapes)), key=lambda i: shapes[i])
        second = next(
            (i for i in range(len(shapes))
             if shapes[i][0] != shapes[first][0] and shapes[i][1] != shapes[first][1]),
            None,
        )
        if second is None:
            return
        lead = [self.batches[first], self.batches[second]]
        rest = [b for i, b in enumerate(self.batches) if i not in (first, second)]
        self.batches = lead + rest

    def __getitem__(self, index):
        items = [self.utterances[i] for i in self.batches[index]]
        feats = [sqrt_stft(u.audio_filepath) for u in items]
        frames = int(math.ceil(max(len(f) for f in feats) / 256) * 256)
        source = np.zeros((len(items), frames, FFT_LENGTH // 2 + 1), "float32")
        for i, f in enumerate(feats):
            source[i, : len(f)] = f
        ids = [self.tokenizer.encode(u.text)[: MAX_TARGET - 2] for u in items]
        length = int(math.ceil((max(len(t) for t in ids) + 1) / 32) * 32)
        target_in = np.zeros((len(items), length), "int32")
        target_out = np.zeros((len(items), length), "int32")
        for i, t in enumerate(ids):
            target_in[i, : len(t) + 1] = [CharTokenizer.start_id, *t]
            target_out[i, : len(t) + 1] = [*t, CharTokenizer.end_id]
        return (source, target_in), target_out


def encoder_block(x, training=None):
    attended = layers.MultiHeadAttention(NUM_HEAD, NUM_HID)(x, x)
    x = layers.LayerNormalization(epsilon=1e-6)(x + layers.Dropout(0.1)(attended))
    ff = layers.Dense(NUM_HID)(layers.Dense(NUM_FF, activation="relu")(x))
    return layers.LayerNormalization(epsilon=1e-6)(x + layers.Dropout(0.1)(ff))


def decoder_block(enc, y):
    attended = layers.MultiHeadAttention(NUM_HEAD, NUM_HID)(y, y, use_causal_mask=True)
    y = layers.LayerNormalization(epsilon=1e-6)(y + layers.Dropout(0.5)(attended))
    attended = layers.MultiHeadAttention(NUM_HEAD, NUM_HID)(y, enc)
    y = layers.LayerNormalization(epsilon=1e-6)(y + layers.Dropout(0.1)(attended))
    ff = layers.Dense(NUM_HID)(layers.Dense(NUM_FF, activation="relu")(y))
    return layers.LayerNormalization(epsilon=1e-6)(y + layers.Dropout(0.1)(ff))


@keras.saving.register_keras_serializable(package="benchmarks")
class PositionEmbedding(layers.Layer):
    """Token embedding plus a learned position embedding (the example's `TokenEmbedding`)."""

    def __init__(self, vocab_size, maxlen, dim, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.maxlen, self.dim = vocab_size, maxlen, dim
        self.token = layers.Embedding(vocab_size, dim)
        self.position = layers.Embedding(maxlen, dim)

    def call(self, x):
        positions = ops.arange(ops.shape(x)[-1])
        return self.token(x) + self.position(positions)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "maxlen": self.maxlen,
                "dim": self.dim}


def build_baseline(vocab_size):
    """The keras.io Transformer ASR model: `(source, target_in) -> logits`."""
    source = keras.Input((None, FFT_LENGTH // 2 + 1), name="source")
    target = keras.Input((None,), dtype="int32", name="target")
    x = source
    for _ in range(3):
        x = layers.Conv1D(NUM_HID, 11, strides=2, padding="same", activation="relu")(x)
    for _ in range(ENCODER_LAYERS):
        x = encoder_block(x)
    y = PositionEmbedding(vocab_size, MAX_TARGET, NUM_HID)(target)
    for _ in range(DECODER_LAYERS):
        y = decoder_block(x, y)
    logits = layers.Dense(vocab_size)(y)
    return keras.Model([source, target], logits, name="keras_io_transformer_asr")


@keras.saving.register_keras_serializable(package="benchmarks")
class KerasIOSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `init_lr` to `lr_after_warmup`, then linear decay to `final_lr`."""

    def __init__(self, steps_per_epoch, init_lr=1e-5, lr_after_warmup=1e-3, final_lr=1e-5,
                 warmup_epochs=15, decay_epochs=85):
        self.steps_per_epoch = steps_per_epoch
        self.init_lr, self.lr_after_warmup, self.final_lr = init_lr, lr_after_warmup, final_lr
        self.warmup_epochs, self.decay_epochs = warmup_epochs, decay_epochs

    def __call__(self, step):
        epoch = ops.cast(step, "float32") / self.steps_per_epoch
        warm = self.init_lr + (self.lr_after_warmup - self.init_lr) / self.warmup_epochs * epoch
        decay = ops.maximum(
            self.final_lr,
            self.lr_after_warmup - (epoch - self.warmup_epochs)
            * (self.lr_after_warmup - self.final_lr) / self.decay_epochs,
        )
        return ops.where(epoch < self.warmup_epochs, warm, decay)

    def get_config(self):
        return {"steps_per_epoch": self.steps_per_epoch, "init_lr": self.init_lr,
                "lr_after_warmup": self.lr_after_warmup, "final_lr": self.final_lr,
                "warmup_epochs": self.warmup_epochs, "decay_epochs": self.decay_epochs}


def greedy_uncached(model, source, max_length):
    """The example's decoding: rerun the decoder over the whole prefix for each new token."""
    batch = source.shape[0]
    tokens = np.full((batch, 1), CharTokenizer.start_id, "int32")
    done = np.zeros(batch, bool)
    for _ in range(max_length):
        logits = model.predict_on_batch([source, tokens])
        nxt = np.asarray(logits)[:, -1].argmax(-1).astype("int32")
        nxt = np.where(done, 0, nxt)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        done |= nxt == CharTokenizer.end_id
        if done.all():
            break
    return tokens[:, 1:]


def train_baseline(train_utts, dev_utts, minutes, batch_size=16, seed=0, log=print):
    """Train for `minutes` of wall time; returns (model, curve [(minutes, dev CER)])."""
    from pipelines.asr.metrics import error_rates

    keras.utils.set_random_seed(seed)
    tokenizer = CharTokenizer()
    data = BaselineBatches(train_utts, tokenizer, batch_size=batch_size, seed=seed)
    model = build_baseline(tokenizer.vocab_size)
    # The example's label-smoothed cross-entropy, with padding positions masked out.
    model.compile(
        optimizer=keras.optimizers.Adam(KerasIOSchedule(len(data))),
        loss=_smoothed_loss(tokenizer.vocab_size),
    )
    curve = []
    trained = 0.0

    class Budget(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if trained + time.perf_counter() - epoch_start > minutes * 60:
                self.model.stop_training = True

    epoch = 0
    while trained < minutes * 60:
        epoch_start = time.perf_counter()
        history = model.fit(data, epochs=epoch + 1, initial_epoch=epoch, verbose=0,
                            callbacks=[Budget()], shuffle=False)
        trained += time.perf_counter() - epoch_start
        cer = evaluate_baseline(model, dev_utts, tokenizer, error_rates)["cer"]
        curve.append((trained / 60.0, cer))
        log(f"baseline epoch {epoch + 1}: loss {history.history['loss'][-1]:.3f} "
            f"dev CER {cer:.2%} after {trained / 60:.1f} min")
        epoch += 1
        if model.stop_training:
            break
    return model, curve


def _smoothed_loss(vocab_size, smoothing=0.1):
    def loss(y_true, y_pred):
        y_true = ops.cast(y_true, "int32")
        mask = ops.cast(y_true != 0, "float32")
        one_hot = ops.one_hot(y_true, vocab_size) * (1 - smoothing) + smoothing / vocab_size
        per_token = -ops.sum(one_hot * ops.log_softmax(y_pred, axis=-1), axis=-1)
        return ops.sum(per_token * mask) / ops.maximum(ops.sum(mask), 1.0)

    return loss


def evaluate_baseline(model, utterances, tokenizer=None, error_rates=None, batch_size=16):
    """CER/WER and real-time factor of uncached greedy decoding."""
    if error_rates is None:
        from pipelines.asr.metrics import error_rates
    tokenizer = tokenizer or CharTokenizer()
    hyps, audio, elapsed = [], 0.0, 0.0
    for i in range(0, len(utterances), batch_size):
        chunk = utterances[i : i + batch_size]
        feats = [sqrt_stft(u.audio_filepath) for u in chunk]
        frames = int(math.ceil(max(len(f) for f in feats) / 256) * 256)
        source = np.zeros((len(chunk), frames, FFT_LENGTH // 2 + 1), "float32")
        for j, f in enumerate(feats):
            source[j, : len(f)] = f
        audio += sum(len(f) * FRAME_STEP / 16000 for f in feats)
        start = time.perf_counter()
        tokens = greedy_uncached(model, source, max_length=min(MAX_TARGET - 1, frames // 8))
        elapsed += time.perf_counter() - start
        hyps.extend(tokenizer.decode(t) for t in tokens)
    rates = error_rates([u.text for u in utterances], hyps)
    return {"cer": rates.cer, "wer": rates.wer, "rtf": elapsed / max(audio, 1e-9)}
