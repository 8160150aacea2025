"""The character n-gram language model: Kneser-Ney values, saving, fusion in beam search."""

import numpy as np
import pytest

from pipelines.asr.decode import Decoder
from pipelines.asr.lm import LOG_ZERO, CharNgramLM
from pipelines.asr.model import ModelConfig, build_recognizer
from pipelines.asr.tokenizer import CharTokenizer
from toolkit.errors import UserError

TOKENIZER = CharTokenizer()
VALID = len(TOKENIZER.characters) + 1  # the characters and </s>


def ids(text):
    return TOKENIZER.encode(text)


def test_unigram_is_absolute_discounting_towards_uniform():
    lm = CharNgramLM.train(["aab"], order=1)
    # Counts a:2, b:1, </s>:1 of 4; D = n1 / (n1 + 2 n2) = 2 / (2 + 2).
    d = 0.5
    assert lm.discounts == [d]
    backoff = d * 3 / 4 / VALID
    p = np.exp(lm.log_probs([]))
    a, b, end, z = ids("a")[0], ids("b")[0], TOKENIZER.end_id, ids("z")[0]
    np.testing.assert_allclose(p[a], (2 - d) / 4 + backoff, rtol=1e-5)
    np.testing.assert_allclose(p[b], (1 - d) / 4 + backoff, rtol=1e-5)
    np.testing.assert_allclose(p[end], (1 - d) / 4 + backoff, rtol=1e-5)
    np.testing.assert_allclose(p[z], backoff, rtol=1e-5)


def test_bigram_backs_off_to_continuation_counts():
    lm = CharNgramLM.train(["ab", "cb", "ab"], order=2)
    a, b, c = (ids(x)[0] for x in "abc")
    end = TOKENIZER.end_id
    # Bigrams: <s>a 2, ab 2, b</s> 3, <s>c 1, cb 1 -> n1 = 2, n2 = 2: D2 = 2 / 6.
    # Unigram continuation counts (distinct left contexts): a 1, b 2, c 1, </s> 1; n1 = 3, n2 = 1.
    d2, d1 = 2 / 6, 3 / 5
    np.testing.assert_allclose(lm.discounts, [d1, d2])
    uni = np.full(TOKENIZER.vocab_size, d1 * 4 / 5 / VALID)
    uni[a] += (1 - d1) / 5
    uni[b] += (2 - d1) / 5
    uni[c] += (1 - d1) / 5
    uni[end] += (1 - d1) / 5
    p = np.exp(lm.log_probs(ids("a")))  # history "a": one follower, b, seen twice
    np.testing.assert_allclose(p[b], (2 - d2) / 2 + d2 * 1 / 2 * uni[b], rtol=1e-5)
    np.testing.assert_allclose(p[c], d2 * 1 / 2 * uni[c], rtol=1e-5)
    p = np.exp(lm.log_probs(ids("z")))  # unseen history: the unigram distribution
    np.testing.assert_allclose(p[b], uni[b], rtol=1e-5)


@pytest.mark.parametrize("history", ["", "th", "the c", "xqzj", "a" * 20])
def test_distributions_sum_to_one_over_what_it_can_predict(history):
    lm = CharNgramLM.train(["the cat sat on the mat", "the dog ate the cat's food"], order=4)
    log_p = lm.log_probs(ids(history))
    valid = log_p > LOG_ZERO / 2
    assert valid.sum() == VALID
    for special in (TOKENIZER.blank_id, TOKENIZER.start_id, TOKENIZER.unk_id):
        assert log_p[special] == LOG_ZERO
    np.testing.assert_allclose(np.exp(log_p[valid]).sum(), 1.0, rtol=1e-5)


def test_seen_text_is_likelier_than_scrambled_text():
    texts = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 3
    lm = CharNgramLM.train(texts, order=5)
    assert lm.perplexity(["the lazy fox saves time"]) < lm.perplexity(["eht yzal xof sevas emit"])
    assert lm.sentence_log_prob("the quick brown fox") < 0


def test_save_and_load_round_trip(tmp_path):
    lm = CharNgramLM.train(["never mind forget it", "thank you and good luck"], order=6)
    path = lm.save(tmp_path / "lm.npz")
    loaded = CharNgramLM.load(path)
    assert loaded.order == 6 and loaded.discounts == lm.discounts
    for history in ("", "never m", "thank you and g", "qq"):
        np.testing.assert_array_equal(loaded.log_probs(ids(history)), lm.log_probs(ids(history)))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a language model"):
        CharNgramLM.load(tmp_path / "bad.npz")


def test_training_needs_text():
    with pytest.raises(ValueError, match="no text"):
        CharNgramLM.train(["", "!?"])
    with pytest.raises(ValueError, match="order"):
        CharNgramLM.train(["abc"], order=0)


TINY = dict(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1, intermediate_dim=64,
            conv_channels=4, dropout=0.0)  # fmt: skip


def test_recognizer_keeps_its_language_model_inside_the_keras_file(tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    model = build_recognizer(ModelConfig(**TINY))
    model.save(tmp_path / "plain.keras")
    assert keras.saving.load_model(tmp_path / "plain.keras").language_model is None
    model.language_model = CharNgramLM.train(["good luck", "good night"], order=3)
    model.save(tmp_path / "with_lm.keras")
    loaded = keras.saving.load_model(tmp_path / "with_lm.keras", safe_mode=True)
    assert loaded.language_model is not None and loaded.language_model.order == 3
    np.testing.assert_array_equal(
        loaded.language_model.log_probs(ids("goo")), model.language_model.log_probs(ids("goo"))
    )


def test_heavy_language_model_weight_makes_beam_search_spell_its_sentence():
    import keras

    keras.utils.set_random_seed(5)
    model = build_recognizer(ModelConfig(**TINY))
    decoder = Decoder(model)
    features = np.random.default_rng(0).normal(size=(120, 80)).astype("float32")
    plain = decoder.beam_search(features, 120, beam_size=3, ctc_weight=0.0)[0]
    assert decoder.beam_search(features, 120, beam_size=3, ctc_weight=0.0, lm_weight=5.0)[0] \
        == plain  # no language model: the weight changes nothing
    decoder.language_model = CharNgramLM.train(["good luck"] * 3, order=4)
    fused = decoder.beam_search(features, 120, beam_size=3, ctc_weight=0.0, lm_weight=50.0)[0]
    assert decoder.tokenizer.decode(fused.tokens) == "good luck"
    assert decoder.tokenizer.decode(plain.tokens) != "good luck"
    with pytest.raises(ValueError, match="lm_weight"):
        decoder.beam_search(features, 120, lm_weight=-1.0)
