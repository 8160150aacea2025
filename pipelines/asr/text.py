"""The one text normalisation used for training targets, scoring and corpus building.

`normalize_text` maps any transcript to the fixed character set `CHARACTERS`
(`a`-`z`, the apostrophe and the space):

1. Unicode NFKD, accents dropped (`café` -> `cafe`), lower case;
2. numbers spelled out in English words (`42` -> `forty two`, `3.5` -> `three point five`,
   `1,000` -> `one thousand`), or dropped with `digits="drop"`;
3. `&` -> ` and `; hyphens, slashes, underscores and other punctuation become word breaks;
   curly apostrophes become `'`;
4. apostrophes are kept only inside words (`don't`, `o'clock`); quotes around words go;
5. every other character is removed and runs of spaces collapse to one; no leading/trailing space.

The result may be empty (e.g. `"?!"`): callers treat such transcripts as unusable.

Example:

>>> normalize_text("Hello, World! It's 42°C — isn't it?")
"hello world it's forty two c isn't it"
"""

from __future__ import annotations

import re
import unicodedata

CHARACTERS = " 'abcdefghijklmnopqrstuvwxyz"
"""The normalised character set: space, apostrophe and the 26 lower-case letters."""

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'", "\u02bc": "'"})
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
_NOT_ALLOWED = re.compile(r"[^a-z' ]+")
_LONE_APOSTROPHE = re.compile(r"(?<![a-z])'|'(?![a-z])")
_SPACES = re.compile(r" +")


def number_to_words(number: int) -> str:
    """Spell a non-negative integer in English words (`1204` -> `one thousand two hundred four`).

    Numbers of a quadrillion or more are read digit by digit.
    """
    if number < 0:
        raise ValueError(f"number must be non-negative. Received: number={number}")
    if number >= 10**15:
        return " ".join(_ONES[int(d)] for d in str(number))
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    for scale, name in _SCALES:
        if number >= scale:
            high, rest = divmod(number, scale)
            return f"{number_to_words(high)} {name}" + (f" {number_to_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def _spell_number(match: re.Match) -> str:
    text = match.group(0)
    whole, _, fraction = text.replace(",", "").partition(".")
    # Digit by digit from a quadrillion on (as `number_to_words`), without calling `int` on
    # the whole string: Python refuses to convert strings of more than 4300 digits.
    digits = "".join(str(int(d)) for d in whole).lstrip("0") or "0"
    if len(digits) <= 15:
        words = number_to_words(int(digits))
    else:
        words = " ".join(_ONES[int(d)] for d in digits)
    if fraction:
        words += " point " + " ".join(_ONES[int(d)] for d in fraction)
    return f" {words} "


def normalize_text(text: str, digits: str = "spell") -> str:
    """Normalise a transcript to lower-case `[a-z' ]` words separated by single spaces.

    Args:
        text: str. Any transcript.
        digits: str. `"spell"` (default) spells numbers out in English words; `"drop"` removes
            them.

    Returns:
        str. The normalised text over `CHARACTERS`; may be empty.
    """
    if digits not in ("spell", "drop"):
        raise ValueError(f"digits must be 'spell' or 'drop'. Received: digits={digits!r}")
    text = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.lower().replace("&", " and ")
    if digits == "spell":
        text = _NUMBER.sub(_spell_number, text)
    text = _NOT_ALLOWED.sub(" ", text)
    text = _LONE_APOSTROPHE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()
