"""Text normalisation and the character tokenizer."""

from __future__ import annotations

import json

import pytest

from pipelines.asr.text import CHARACTERS, normalize_text, number_to_words
from pipelines.asr.tokenizer import CharTokenizer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!", "hello world"),
        ("  It's   MINE.  ", "it's mine"),
        ("O\u2019Brien said \u201cno\u201d", "o'brien said no"),
        ("'quoted' words", "quoted words"),
        ("rock-and-roll/jazz_fusion", "rock and roll jazz fusion"),
        ("Caf\u00e9 na\u00efve", "cafe naive"),
        ("Tom & Jerry", "tom and jerry"),
        ("I have 42 apples", "i have forty two apples"),
        ("1,000,000 people", "one million people"),
        ("pi is 3.14", "pi is three point one four"),
        ("in 1984", "in one thousand nine hundred eighty four"),
        ("?!...", ""),
        ("", ""),
        ("\u00bfQu\u00e9? \u00a1Se\u00f1or!", "que senor"),
    ],
)
def test_normalize_text_cases(text, expected):
    assert normalize_text(text) == expected


def test_digits_drop_and_character_set():
    assert normalize_text("room 101 is here", digits="drop") == "room is here"
    out = normalize_text("Ünïcödé «quotes» 7% — tabs\tand\nnewlines ~ #hash")
    assert set(out) <= set(CHARACTERS)
    assert "  " not in out and out == out.strip()
    with pytest.raises(ValueError, match="digits"):
        normalize_text("x", digits="keep")


def test_number_to_words():
    assert number_to_words(0) == "zero"
    assert number_to_words(115) == "one hundred fifteen"
    assert number_to_words(2_000_017) == "two million seventeen"
    assert number_to_words(10**15) == "one " + " ".join(["zero"] * 15)


def test_tokenizer_ids_and_round_trip():
    tok = CharTokenizer()
    assert tok.vocab_size == 4 + len(CHARACTERS) == 32
    assert (tok.blank_id, tok.pad_id, tok.start_id, tok.end_id, tok.unk_id) == (0, 0, 1, 2, 3)
    ids = tok.encode("Hi, it's 2!", add_start=True, add_end=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert 0 not in ids and 3 not in ids
    assert tok.decode(ids) == "hi it's two"
    assert tok.decode([tok.encode("ab")[0], 0, tok.encode("ab")[1], 2, 10]) == "ab"
    raw = CharTokenizer(characters="ab", normalize=False)
    assert raw.encode("abc") == [4, 5, 3]


def test_tokenizer_serialises_as_plain_json():
    tok = CharTokenizer(characters="xyz ")
    config = json.loads(json.dumps(tok.get_config()))
    assert CharTokenizer.from_config(config) == tok
    again = CharTokenizer.from_json(tok.to_json())
    assert again.tokens == tok.tokens and again.encode("zyx") == tok.encode("zyx")
    with pytest.raises(ValueError, match="unique"):
        CharTokenizer(characters="aa")
