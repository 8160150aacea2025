"""WER/CER with S/D/I counts, checked by hand and against jiwer."""

import jiwer
import pytest

from pipelines.asr.metrics import edit_counts, error_rates


def test_hand_counted_example():
    counts = edit_counts("a b c d".split(), "a x c d e".split())
    assert (counts.hits, counts.substitutions, counts.deletions, counts.insertions) == (3, 1, 0, 1)
    counts = edit_counts("a b c d".split(), "a d".split())
    assert (counts.hits, counts.substitutions, counts.deletions, counts.insertions) == (2, 0, 2, 0)
    assert counts.error_rate == 0.5


def test_empty_cases():
    assert edit_counts([], []).error_rate == 0.0
    assert edit_counts([], ["a", "b"]).insertions == 2
    assert edit_counts(["a"], []).deletions == 1


CASES = [
    (["the cat sat on the mat", "hello world"], ["the cat sat on mat", "hello there world"]),
    (["one two three", "a b"], ["one too three four", "a"]),
    (["it's a test of speech recognition"], ["its a test of speech wreck ignition"]),
    (["abc def", "ghi"], ["xyz", "ghi jkl mno"]),
]


@pytest.mark.parametrize("refs,hyps", CASES)
def test_matches_jiwer(refs, hyps):
    ours = error_rates(refs, hyps)
    words = jiwer.process_words(refs, hyps)
    assert ours.wer == pytest.approx(words.wer)
    assert ours.words.substitutions == words.substitutions
    assert ours.words.deletions == words.deletions
    assert ours.words.insertions == words.insertions
    chars = jiwer.process_characters(refs, hyps)
    assert ours.cer == pytest.approx(chars.cer)
    assert ours.chars.errors == chars.substitutions + chars.deletions + chars.insertions


def test_ties_keep_the_minimum_distance():
    # "a b" -> "b a" has two minimum alignments (2 S, or D + H + I); the distance is what counts.
    ours = error_rates(["a b"], ["b a"])
    assert ours.words.errors == 2 and ours.wer == pytest.approx(jiwer.wer("a b", "b a"))


def test_normalisation_applies_to_both_sides():
    rates = error_rates(["Hello, World!"], ["hello world"])
    assert rates.wer == 0.0 and rates.cer == 0.0
    rates = error_rates(["Hello, World!"], ["hello world"], normalize=False)
    assert rates.wer == 1.0


def test_summary_keys_and_length_check():
    summary = error_rates(["a b"], ["a c"]).as_dict()
    assert summary["wer"] == 0.5 and summary["substitutions"] == 1
    assert summary["reference_words"] == 2
    with pytest.raises(ValueError, match="same length"):
        error_rates(["a"], [])
