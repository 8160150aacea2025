"""The n-gram language models: Kneser-Ney values, the word look-ahead, saving, fusion."""

import numpy as np
import pytest

from pipelines.asr.decode import Decoder
from pipelines.asr.lm import LOG_ZERO, CharNgramLM, WordNgramLM, load_language_model
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


WORD_TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog",
              "the cat ate", "on the mat the dog sat"]  # fmt: skip


def word_lm(oov_rate=0.05, order=2):
    char_lm = CharNgramLM.train(WORD_TEXTS, order=4)
    lm = WordNgramLM.train(WORD_TEXTS, char_lm, order=order)
    return WordNgramLM(char_lm, lm.words, lm.order, lm.tables, lm.discounts, oov_rate)


@pytest.mark.parametrize("history", ["", "the", "the c", "the ca", "the cat ", "a zeb", "zz"])
def test_word_model_gives_a_normalised_next_character_distribution(history):
    p = np.exp(word_lm().log_probs(ids(history)).astype(np.float64))
    assert p.sum() == pytest.approx(1.0, abs=1e-5)
    assert p[TOKENIZER.blank_id] == 0 and p[TOKENIZER.start_id] == 0


def test_word_model_characters_multiply_to_the_word_ngram_probability():
    # With almost no mass for unknown words, the look-ahead ratios telescope: the characters of
    # "the cat" and </s> multiply to P(the | <s>) P(cat | the) P(</s> | cat).
    lm = word_lm(oov_rate=1e-9)
    w = {word: i for i, word in enumerate(lm.words)}
    start, end = lm._distribution((-1,)), len(lm.words)
    expected = (np.log(start[w["the"]]) + np.log(lm._distribution((w["the"],))[w["cat"]])
                + np.log(lm._distribution((w["cat"],))[end]))
    assert lm.sentence_log_prob("the cat") == pytest.approx(expected, abs=1e-4)


def test_word_model_looks_ahead_in_its_lexicon_and_still_spells_unknown_words():
    lm = word_lm()
    after_the_c = lm.log_probs(ids("the c"))
    assert int(np.argmax(after_the_c)) == ids("a")[0]  # only "cat" starts with "c"
    # "the cot": outside the lexicon, spelled by the character model: unlikely, not impossible
    assert LOG_ZERO < after_the_c[ids("o")[0]] < after_the_c[ids("a")[0]] - 2.0
    char_lm = CharNgramLM.train(WORD_TEXTS, order=4)
    assert lm.perplexity(["the dog ate"]) < char_lm.perplexity(["the dog ate"])
    assert np.isfinite(lm.sentence_log_prob("the zebra sat"))


def test_word_model_oov_rate_comes_from_the_dev_words():
    char_lm = CharNgramLM.train(WORD_TEXTS, order=3)
    lm = WordNgramLM.train(WORD_TEXTS, char_lm, order=2, dev_texts=["the cat", "a zebra sat"])
    assert lm.oov_rate == pytest.approx(1 / 5)  # zebra
    assert WordNgramLM.train(WORD_TEXTS, char_lm, order=2).oov_rate == 0.05
    with pytest.raises(ValueError, match="no text"):
        WordNgramLM.train(["", "?!"], char_lm)
    with pytest.raises(ValueError, match="oov_rate"):
        word_lm(oov_rate=1.0)


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
    model.language_model = word_lm()  # the word model travels with its character model
    model.save(tmp_path / "with_word_lm.keras")
    loaded = keras.saving.load_model(tmp_path / "with_word_lm.keras", safe_mode=True)
    assert isinstance(loaded.language_model, WordNgramLM)
    assert loaded.language_model.words == model.language_model.words
    for history in ("the c", "a zeb", "the cat "):
        np.testing.assert_allclose(loaded.language_model.log_probs(ids(history)),
                                   model.language_model.log_probs(ids(history)), rtol=1e-6)
    assert load_language_model(tmp_path) is None  # no lm.npz there


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
