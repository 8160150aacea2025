"""The recognizers: shapes, the joint loss against NumPy, saving/loading, the rnn model training."""

import dataclasses

import keras
import numpy as np
import pytest

from pipelines.asr.model import (
    ModelConfig,
    NoamSchedule,
    RNNRecognizer,
    SpecAugmentConfig,
    TransformerRecognizer,
    build_recognizer,
    ctc_loss,
)
from pipelines.asr.tokenizer import CharTokenizer

TINY = dict(
    d_model=32,
    num_heads=2,
    encoder_layers=2,
    decoder_layers=1,
    intermediate_dim=64,
    conv_channels=4,
    dropout=0.0,
)
RNN = dict(
    architecture="rnn",
    encoder_units=16,
    encoder_layers=2,
    time_reduction=2,
    decoder_units=24,
    embedding_dim=8,
    attention_units=12,
    dropout=0.0,
)


def tiny_model(**overrides):
    stats = {"mean": list(np.linspace(-1, 1, 80)), "std": list(np.linspace(1, 2, 80)), "frames": 9}
    return build_recognizer(ModelConfig(**{**TINY, **overrides}), feature_stats=stats)


def batch(rng, b=2, frames=48, tokens=6, vocab=32):
    lengths = np.array([frames, frames - 13])[:b]
    x = {
        "features": rng.normal(size=(b, frames, 80)).astype("float32"),
        "feature_mask": np.arange(frames)[None] < lengths[:, None],
        "decoder_tokens": np.array([[1, 5, 6, 7, 8, 9], [1, 10, 11, 0, 0, 0]])[:b, :tokens],
    }
    y = {
        "decoder": np.array([[5, 6, 7, 8, 9, 2], [10, 11, 2, 0, 0, 0]])[:b, :tokens],
        "ctc": np.array([[5, 6, 7, 8, 9, 0], [10, 11, 0, 0, 0, 0]])[:b, :tokens],
    }
    return x, y


def test_transformer_shapes_and_subsampling():
    model = tiny_model()
    x, _ = batch(np.random.default_rng(0))
    out = model(x)
    assert tuple(out["logits"].shape) == (2, 6, CharTokenizer().vocab_size)
    assert tuple(out["ctc_logits"].shape) == (2, 12, CharTokenizer().vocab_size)  # 48 / 4
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out["encoder_lengths"]), [12, 9])


def test_padding_does_not_change_the_output():
    """Extra padded frames and tokens leave the real positions' logits unchanged."""
    model = tiny_model()
    rng = np.random.default_rng(1)
    x, _ = batch(rng, b=1)
    padded = {
        "features": np.concatenate([x["features"], rng.normal(size=(1, 16, 80))], 1).astype(
            "float32"
        ),
        "feature_mask": np.concatenate([x["feature_mask"], np.zeros((1, 16), bool)], 1),
        "decoder_tokens": np.concatenate([x["decoder_tokens"], np.zeros((1, 3), "int32")], 1),
    }
    a = keras.ops.convert_to_numpy(model(x)["logits"])
    b = keras.ops.convert_to_numpy(model(padded)["logits"])[:, :6]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_attention_loss_matches_numpy():
    model = tiny_model(ctc_weight=0.0, label_smoothing=0.1)
    x, y = batch(np.random.default_rng(2))
    out = model(x)
    loss = float(keras.ops.convert_to_numpy(model.compute_loss(x, y, out)))
    logits = keras.ops.convert_to_numpy(out["logits"]).astype("float64")
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    V = logits.shape[-1]
    target = np.eye(V)[y["decoder"]] * 0.9 + 0.1 / V
    mask = y["decoder"] != 0
    expected = -(target * logp).sum(-1)[mask].sum() / mask.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_joint_loss_mixes_ctc_and_attention():
    x, y = batch(np.random.default_rng(3))
    model = tiny_model(ctc_weight=0.0)
    att = float(keras.ops.convert_to_numpy(model.compute_loss(x, y, model(x))))
    model.config = dataclasses.replace(model.config, ctc_weight=1.0)
    out = model(x)
    ctc = float(keras.ops.convert_to_numpy(model.compute_loss(x, y, out)))
    per_utt = keras.ops.convert_to_numpy(
        keras.ops.ctc_loss(
            y["ctc"], out["ctc_logits"], np.array([5, 2]), out["encoder_lengths"], mask_index=0
        )
    )
    np.testing.assert_allclose(ctc, per_utt.sum() / 9, rtol=1e-5)  # 9 decoder targets
    model.config = dataclasses.replace(model.config, ctc_weight=0.3)
    joint = float(keras.ops.convert_to_numpy(model.compute_loss(x, y, out)))
    np.testing.assert_allclose(joint, 0.3 * ctc + 0.7 * att, rtol=1e-5)


def _ctc_and_gradient(fn, labels, logits, label_lengths, logit_lengths):
    """The per-utterance losses and d(sum of losses)/d(logits) under the current backend."""
    if keras.backend.backend() == "jax":
        import jax

        def total(x):
            per_utt = fn(labels, x, label_lengths, logit_lengths)
            return keras.ops.sum(per_utt), per_utt

        (_, losses), grad = jax.value_and_grad(total, has_aux=True)(logits)
        return np.asarray(losses), np.asarray(grad)
    import tensorflow as tf

    x = tf.Variable(logits)
    with tf.GradientTape() as tape:
        losses = fn(labels, x, label_lengths, logit_lengths)
        total = tf.reduce_sum(losses)
    return losses.numpy(), tape.gradient(total, x).numpy()


def test_ctc_loss_matches_keras_values_and_gradients():
    """The fast CTC loss (TensorFlow's C++ kernel) equals `keras.ops.ctc_loss`, and so do the
    gradients, with repeated labels, padding of both axes and a blank id inside the vocabulary."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(3, 20, 9)).astype("float32")
    labels = np.array([[3, 3, 5, 1, 0, 0, 0], [2, 4, 6, 8, 7, 3, 3], [6, 0, 0, 0, 0, 0, 0]])
    label_lengths = np.array([4, 7, 1])
    logit_lengths = np.array([20, 15, 9])
    got = _ctc_and_gradient(ctc_loss, labels, logits, label_lengths, logit_lengths)

    def reference(*args):
        return keras.ops.ctc_loss(*args, mask_index=0)

    want = _ctc_and_gradient(reference, labels, logits, label_lengths, logit_lengths)
    assert np.all(got[0] > 0)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    # Frames beyond an utterance's length get no gradient.
    np.testing.assert_array_equal(got[1][1, 15:], 0.0)
    # With the blank elsewhere than 0: the same loss as keras with that mask index.
    shifted = np.where(labels == 0, 4, np.where(labels == 4, 0, labels))
    moved = logits[..., [4, 1, 2, 3, 0, 5, 6, 7, 8]]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ctc_loss(shifted, moved, label_lengths, logit_lengths, 4)),
        want[0],
        rtol=1e-5,
    )


def test_ctc_loss_of_too_short_utterances_is_zero():
    """An utterance with fewer frames than its labels need (a repeat needs a blank between)
    adds no loss and no gradient; a feasible one beside it is unaffected."""
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(3, 5, 7)).astype("float32")
    labels = np.array([[3, 3, 3, 0, 0, 0], [2, 3, 4, 5, 6, 2], [3, 3, 4, 0, 0, 0]])
    label_lengths = np.array([3, 6, 3])
    logit_lengths = np.array([4, 5, 5])  # needs 5, 6 and 4 frames
    losses, grad = _ctc_and_gradient(ctc_loss, labels, logits, label_lengths, logit_lengths)
    np.testing.assert_array_equal(losses[:2], 0.0)
    np.testing.assert_array_equal(grad[:2], 0.0)
    alone = keras.ops.ctc_loss(labels[2:], logits[2:], label_lengths[2:], logit_lengths[2:])
    np.testing.assert_allclose(losses[2], keras.ops.convert_to_numpy(alone)[0], rtol=1e-5)
    assert np.abs(grad[2]).sum() > 0


def test_save_and_load_is_self_contained(tmp_path):
    model = tiny_model()
    model.decoding = {"beam_size": 8, "ctc_weight": 0.3, "lm_weight": 0.2}
    x, _ = batch(np.random.default_rng(4))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, TransformerRecognizer)
    assert loaded.get_tokenizer() == CharTokenizer()
    np.testing.assert_allclose(loaded.feature_stats["std"], np.linspace(1, 2, 80), rtol=1e-6)
    assert loaded.decoding == {"beam_size": 8, "ctc_weight": 0.3, "lm_weight": 0.2}
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)["logits"]),
        keras.ops.convert_to_numpy(model(x)["logits"]),
        atol=1e-5,
    )


def test_normalisation_uses_the_stored_statistics():
    model = tiny_model()
    features = np.full((1, 8, 80), 3.0, "float32")
    x, mask = model.prepare_features(features, np.array([6]))
    x = keras.ops.convert_to_numpy(x)
    np.testing.assert_allclose(
        x[0, 0], (3.0 - np.linspace(-1, 1, 80)) / np.linspace(1, 2, 80), rtol=1e-5
    )
    assert np.all(x[0, 6:] == 0.0)  # padding zeroed


@pytest.mark.parametrize("attention", ["luong_dot", "luong_general", "luong_concat"])
def test_rnn_attention_variants(attention):
    model = build_recognizer(ModelConfig(**RNN, attention=attention))
    x, y = batch(np.random.default_rng(6))
    out = model(x)
    assert tuple(out["logits"].shape) == (2, 6, 32)
    loss = float(keras.ops.convert_to_numpy(model.compute_loss(x, y, out)))
    assert np.isfinite(loss) and loss > 0
    assert model.get_layer("attention").score_mode == attention.split("_")[1]


def test_rnn_model_trains_one_step():
    model = build_recognizer(ModelConfig(**RNN, attention="bahdanau"))
    assert isinstance(model, RNNRecognizer)
    x, y = batch(np.random.default_rng(5))
    assert tuple(model(x)["ctc_logits"].shape) == (2, 12, 32)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    first = float(model.train_on_batch(x, y))
    second = float(model.train_on_batch(x, y))
    assert np.isfinite(first) and second < first
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert sum(not np.allclose(a, b) for a, b in zip(before, after)) >= len(before) // 2


@pytest.mark.parametrize("jit_compile", [False, True])
def test_transformer_trains_with_and_without_xla(jit_compile):
    """The joint loss trains the same first step compiled by XLA (where TensorFlow's CTC
    kernel cannot run) and without it."""
    x, y = batch(np.random.default_rng(6))
    model = tiny_model(ctc_weight=0.5, spec_augment=SpecAugmentConfig(enabled=False))
    reference = float(keras.ops.convert_to_numpy(model.compute_loss(x, y, model(x))))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit_compile)
    first = float(model.train_on_batch(x, y))
    second = float(model.train_on_batch(x, y))
    assert first == pytest.approx(reference, rel=1e-4)
    assert second < first


def test_noam_schedule_values_and_config():
    schedule = NoamSchedule(peak_learning_rate=1e-3, warmup_steps=100)
    for step in (0, 49, 99, 399):
        expected = 1e-3 * min((step + 1) / 100, np.sqrt(100 / (step + 1)))
        np.testing.assert_allclose(
            float(keras.ops.convert_to_numpy(schedule(step))), expected, rtol=1e-5
        )
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert restored.get_config() == schedule.get_config()


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="ctc_weight"):
        ModelConfig(ctc_weight=1.5)
