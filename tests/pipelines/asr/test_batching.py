"""Bucketed batches: only configured shapes, masks matching true lengths, seeded shuffling."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipelines.asr.batching import ASRBatches
from pipelines.asr.features import FeatureStats

FRAME_BUCKETS = (20, 40, 80)
TOKEN_BUCKETS = (8, 16)


def _data(n=37, seed=0, max_frames=80, max_tokens=15):
    rng = np.random.default_rng(seed)
    frames = rng.integers(1, max_frames + 1, size=n)
    features = [rng.normal(size=(f, 6)).astype("float32") for f in frames]
    for i, x in enumerate(features):
        x[:, 0] = i  # column 0 carries the utterance's index
    tokens = [rng.integers(4, 32, size=rng.integers(1, max_tokens + 1)).tolist() for _ in range(n)]
    return features, tokens


def _make(features, tokens, **kwargs):
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("frame_buckets", FRAME_BUCKETS)
    kwargs.setdefault("token_buckets", TOKEN_BUCKETS)
    return ASRBatches(features, tokens, **kwargs)


def test_only_configured_shapes_and_masks_match_lengths():
    features, tokens = _data()
    data = _make(features, tokens)
    allowed_frames, allowed_tokens = set(FRAME_BUCKETS), set(TOKEN_BUCKETS)
    seen = []
    for b in range(len(data)):
        inputs, targets = data[b]
        x, mask, dec = inputs["features"], inputs["feature_mask"], inputs["decoder_tokens"]
        assert set(inputs) == {"features", "feature_mask", "decoder_tokens"}
        assert set(targets) == {"decoder", "ctc"}
        assert x.shape[0] == 4 and x.shape[2] == 6 and x.dtype == np.float32
        assert x.shape[1] in allowed_frames and dec.shape[1] in allowed_tokens
        assert mask.dtype == bool and mask.shape == x.shape[:2]
        assert dec.dtype == np.int32 and targets["decoder"].shape == dec.shape
        for row in range(4):
            i = int(x[row, 0, 0])
            n, ids = features[i].shape[0], tokens[i]
            assert mask[row].sum() == n and mask[row, :n].all()
            np.testing.assert_array_equal(x[row, :n], features[i])
            assert (x[row, n:] == 0.0).all()
            k = len(ids)
            np.testing.assert_array_equal(dec[row, : k + 1], [1, *ids])
            np.testing.assert_array_equal(targets["decoder"][row, : k + 1], [*ids, 2])
            np.testing.assert_array_equal(targets["ctc"][row, :k], ids)
            assert not dec[row, k + 1 :].any() and not targets["decoder"][row, k + 1 :].any()
            assert not targets["ctc"][row, k:].any()
            # The bucket is the smallest that fits.
            assert x.shape[1] == min(f for f in FRAME_BUCKETS if f >= n)
            assert dec.shape[1] == min(t for t in TOKEN_BUCKETS if t >= k + 1)
            seen.append(i)
    assert set(seen) == set(range(37))  # every utterance appears at least once per epoch
    assert set(data.bucket_shapes) <= {(f, t) for f in FRAME_BUCKETS for t in TOKEN_BUCKETS}
    assert len(data) == sum(-(-len(v) // 4) for v in data._buckets.values())


def test_shuffle_is_seeded_and_changes_per_epoch():
    features, tokens = _data()

    def order(data):
        return [tuple(np.round(data[b][0]["features"][:, 0, 0], 4)) for b in range(len(data))]

    a, b = _make(features, tokens, seed=3), _make(features, tokens, seed=3)
    assert order(a) == order(b)
    first = order(a)
    a.on_epoch_end()
    b.on_epoch_end()
    assert order(a) == order(b) != first
    assert len(a) == len(b)
    c = _make(features, tokens, seed=4)
    assert order(c) != first
    fixed = _make(features, tokens, shuffle=False)
    before = order(fixed)
    fixed.on_epoch_end()
    assert order(fixed) == before


def test_partial_batches_and_too_long_utterances(capsys):
    features, tokens = _data(n=10)
    features.append(np.zeros((81, 6), "float32"))  # longer than the largest frame bucket
    tokens.append([5, 6])
    features.append(np.zeros((5, 6), "float32"))
    tokens.append(list(range(4, 20)))  # 16 tokens + <s> > 16
    data = _make(features, tokens, fill_last_batch=False, shuffle=False)
    assert dict(data.skipped) == {"too_long": 2}
    assert "skipped 2 utterances" in capsys.readouterr().err
    sizes = [data[b][0]["features"].shape[0] for b in range(len(data))]
    assert sum(sizes) == 10 and max(sizes) <= 4


def test_normalizer_and_arguments():
    features, tokens = _data(n=8)
    stats = FeatureStats.from_features(features)
    data = _make(features, tokens, normalizer=stats, pad_value=-1.0, shuffle=False, workers=2)
    assert data.workers == 2 and data.use_multiprocessing is False
    inputs, _ = data[0]
    x, mask = inputs["features"], inputs["feature_mask"]
    assert (x[~mask] == -1.0).all()
    with pytest.raises(ValueError, match="ascending"):
        _make(features, tokens, frame_buckets=(40, 20))
    with pytest.raises(ValueError, match="differ in length"):
        ASRBatches(features, tokens[:-1])


def test_fit_consumes_the_batches_with_workers():
    # A tiny model named after the batch keys: the structure is what issue 5's model trains on.
    features, tokens = _data(n=16)
    # Two padded shapes keep compilation short on JAX.
    data = _make(features, tokens, workers=2, seed=1, frame_buckets=(40, 80), token_buckets=(16,))
    assert len(data.bucket_shapes) == 2
    feats = keras.Input((None, 6), name="features")
    fmask = keras.Input((None,), dtype="bool", name="feature_mask")
    dec_in = keras.Input((None,), dtype="int32", name="decoder_tokens")
    pooled = keras.layers.GlobalAveragePooling1D()(feats, mask=fmask)
    emb = keras.layers.Embedding(32, 6)(dec_in)
    dec = keras.layers.Dense(32, name="decoder")(emb + pooled[:, None, :])
    ctc = keras.layers.Dense(32, name="ctc")(feats)
    model = keras.Model(
        {"features": feats, "feature_mask": fmask, "decoder_tokens": dec_in},
        {"decoder": dec, "ctc": ctc},
    )
    model.compile(
        optimizer="adam",
        loss={
            "decoder": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "ctc": lambda y_true, y_pred: keras.ops.mean(y_pred * 0.0, axis=(1, 2)),
        },
        jit_compile=False,
    )
    history = model.fit(data, epochs=2, verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    assert data.epoch >= 2  # on_epoch_end advanced the seeded order


def test_first_two_batches_differ_on_both_padded_axes():
    # Keras' TF adapter takes the tf.data signature from batches 0 and 1 only.
    features = [np.zeros((f, 2), "float32") for f in (10, 10, 10, 30, 30)]
    tokens = [[4] * t for t in (3, 10, 10, 3, 3)]  # buckets (20, 8), (20, 16), (40, 8)
    for seed in range(5):
        data = _make(features, tokens, batch_size=1, seed=seed)
        (a, _), (b, _) = data[0], data[1]
        assert a["features"].shape[1] != b["features"].shape[1]
        assert a["decoder_tokens"].shape[1] != b["decoder_tokens"].shape[1]
        data.on_epoch_end()
        (a, _), (b, _) = data[0], data[1]
        assert a["features"].shape[1] != b["features"].shape[1]
