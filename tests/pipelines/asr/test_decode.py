"""Decoding: cached greedy equals uncached greedy, beam width 1 equals greedy, alignments."""

import math

import numpy as np
import pytest

from pipelines.asr.ctc import DEFAULT_BEAM_SIZE, DEFAULT_CTC_WEIGHT
from pipelines.asr.decode import Decoder, pad_batch
from pipelines.asr.lm import DEFAULT_LM_WEIGHT
from pipelines.asr.model import ModelConfig, build_recognizer
from toolkit.errors import UserError

TINY = dict(
    d_model=32,
    num_heads=2,
    encoder_layers=1,
    decoder_layers=2,
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


@pytest.fixture(scope="module")
def transformer():
    import keras

    keras.utils.set_random_seed(7)
    return Decoder(build_recognizer(ModelConfig(**TINY)))


@pytest.fixture(scope="module")
def rnn():
    import keras

    keras.utils.set_random_seed(8)
    return Decoder(build_recognizer(ModelConfig(**RNN)))


def features(seed, lengths=(40, 75, 110)):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, 80)).astype("float32") for n in lengths]


@pytest.mark.parametrize("which", ["transformer", "rnn"])
def test_cached_greedy_equals_uncached(which, request):
    decoder = request.getfixturevalue(which)
    batch, lengths = pad_batch(features(0))
    cached = decoder.greedy(batch, lengths, return_alignment=True)
    full = decoder.greedy(batch, lengths, use_cache=False, return_alignment=True)
    fused = decoder.greedy(batch, lengths, fused=True)  # one compiled while-loop
    assert max(len(h.tokens) for h in cached) > 3  # the test compares real sequences
    for a, b, c in zip(cached, full, fused):
        assert c.tokens == a.tokens
        np.testing.assert_allclose(c.score, a.score, rtol=1e-4, atol=1e-4)
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.score, b.score, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.alignment, b.alignment, atol=1e-4)


def test_greedy_batch_equals_one_by_one(transformer):
    feats = features(1)
    batch, lengths = pad_batch(feats)
    together = transformer.greedy(batch, lengths)
    for f, hyp in zip(feats, together):
        alone = transformer.greedy(*pad_batch([f]))[0]
        assert alone.tokens == hyp.tokens


def test_greedy_alignment_shape_and_rows(transformer):
    feats = features(2, lengths=(57,))
    hyp = transformer.greedy(*pad_batch(feats), return_alignment=True)[0]
    encoder_frames = 15  # ceil(ceil(57 / 2) / 2)
    assert hyp.alignment.shape == (min(len(hyp.tokens) + 1, 17), encoder_frames)
    np.testing.assert_allclose(hyp.alignment.sum(-1), 1.0, atol=1e-4)  # padding gets no weight


@pytest.mark.parametrize("which", ["transformer", "rnn"])
@pytest.mark.parametrize("ctc_weight", [0.0, 0.5])
def test_beam_width_one_equals_greedy(which, ctc_weight, request):
    decoder = request.getfixturevalue(which)
    for f in features(3):
        greedy = decoder.greedy(*pad_batch([f]))[0]
        beam = decoder.beam_search(f, len(f), beam_size=1, ctc_weight=ctc_weight)[0]
        assert beam.tokens == greedy.tokens


def test_beam_search_scores_and_alignment(transformer):
    f = features(4, lengths=(90,))[0]
    hyps = transformer.beam_search(
        f, len(f), beam_size=4, ctc_weight=0.3, nbest=3, return_alignment=True
    )
    assert 1 <= len(hyps) <= 3
    scores = [h.score for h in hyps]
    assert scores == sorted(scores, reverse=True)
    best = hyps[0]
    assert best.alignment.shape[1] == 23  # encoder frames of 90 input frames
    assert best.alignment.shape[0] in (len(best.tokens), len(best.tokens) + 1)
    assert len(best.tokens) <= 23 + 2  # maximum length tied to the encoder length


def test_beam_search_finds_at_least_the_greedy_score(transformer):
    """Without CTC, beam 4's best length-normalised score is >= greedy's (it keeps greedy's
    path among its candidates unless something better ends)."""
    for f in features(5):
        greedy = transformer.greedy(*pad_batch([f]))[0]
        limit = math.ceil(math.ceil(len(f) / 2) / 2) + 2  # encoder frames + 2
        n = len(greedy.tokens) + (1 if len(greedy.tokens) < limit else 0)  # + </s> if it ended
        beam = transformer.beam_search(f, len(f), beam_size=4, ctc_weight=0.0, end_detect_window=0)[
            0
        ]
        assert beam.score >= greedy.score / n - 1e-4


def test_transcribe_returns_text(transformer):
    texts = transformer.transcribe(features(6, lengths=(30, 60)), beam_size=1)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert set("".join(texts)) <= set(" 'abcdefghijklmnopqrstuvwxyz")


def test_invalid_arguments(transformer):
    f = features(7, lengths=(30,))[0]
    with pytest.raises(ValueError, match="beam_size"):
        transformer.beam_search(f, 30, beam_size=0)
    with pytest.raises(ValueError, match="ctc_weight"):
        transformer.beam_search(f, 30, ctc_weight=2.0)


def test_settings_take_given_then_saved_then_default(transformer):
    assert transformer.settings() == {"beam_size": DEFAULT_BEAM_SIZE,
                                      "ctc_weight": DEFAULT_CTC_WEIGHT,
                                      "lm_weight": DEFAULT_LM_WEIGHT}  # fmt: skip
    saved = dict(transformer.model.decoding)
    transformer.model.decoding = {"beam_size": 8, "lm_weight": 0.2}  # no ctc_weight saved
    try:
        assert transformer.settings() == {"beam_size": 8, "ctc_weight": DEFAULT_CTC_WEIGHT,
                                          "lm_weight": 0.2}  # fmt: skip
        assert transformer.settings(beam_size=1, ctc_weight=0.3, lm_weight=0.0) == {
            "beam_size": 1, "ctc_weight": 0.3, "lm_weight": 0.0}  # fmt: skip
        transformer.model.decoding = {"beam_size": 0}
        with pytest.raises(UserError, match="--beam"):
            transformer.settings()
        with pytest.raises(UserError, match="--ctc-weight"):
            transformer.settings(beam_size=2, ctc_weight=1.5)
    finally:
        transformer.model.decoding = saved
