"""Character tokenizer for the recognizer: blank/pad, start, end, unknown and `CHARACTERS`.

Token ids:

| id | token | use |
|----|-------|-----|
| 0 | `<blank>` | CTC blank and padding (never a real label, so lengths = count of non-zero ids) |
| 1 | `<s>` | start of sentence: first decoder input |
| 2 | `</s>` | end of sentence: last decoder target |
| 3 | `<unk>` | a character outside the set (cannot occur after `normalize_text`) |
| 4.. | characters | `" 'abc...z"` in the order of `characters` |

`get_config()` / `from_config()` (and `to_json()` / `from_json()`) round-trip the tokenizer as
plain JSON, so the recognizer can store it inside `model.keras`.

Example:

>>> tokenizer = CharTokenizer()
>>> ids = tokenizer.encode("Hello!")
>>> tokenizer.decode(ids)
'hello'
"""

from __future__ import annotations

import json

from pipelines.asr.text import CHARACTERS, normalize_text

BLANK, START, END, UNKNOWN = "<blank>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (BLANK, START, END, UNKNOWN)


class CharTokenizer:
    """Maps normalised text to character ids and back.

    Args:
        characters: str. The character set, one token per character, after the four special
            tokens. Defaults to `pipelines.asr.text.CHARACTERS` (space, apostrophe, a-z).
        normalize: bool. Whether `encode` first applies `normalize_text`. Defaults to `True`.
    """

    pad_id = 0
    blank_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3

    def __init__(self, characters: str = CHARACTERS, normalize: bool = True):
        if not characters:
            raise ValueError("characters must not be empty.")
        if len(set(characters)) != len(characters):
            raise ValueError(f"characters must be unique. Received: characters={characters!r}")
        self.characters = characters
        self.normalize = bool(normalize)
        self.tokens = list(SPECIAL_TOKENS) + list(characters)
        self._ids = {ch: i + len(SPECIAL_TOKENS) for i, ch in enumerate(characters)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.tokens)

    def encode(self, text: str, add_start: bool = False, add_end: bool = False) -> list[int]:
        """Return the ids of `text` (normalised first if `normalize`), optionally with `<s>`/`</s>`."""
        if self.normalize:
            text = normalize_text(text)
        ids = [self._ids.get(ch, self.unk_id) for ch in text]
        if add_start:
            ids.insert(0, self.start_id)
        if add_end:
            ids.append(self.end_id)
        return ids

    def decode(self, ids) -> str:
        """Return the text of `ids`: stops at the first `</s>`, skips blank/pad, start and unknown."""
        chars = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i >= len(SPECIAL_TOKENS) and i < len(self.tokens):
                chars.append(self.tokens[i])
        return "".join(chars)

    def get_config(self) -> dict:
        """Return the JSON-serialisable constructor arguments."""
        return {"characters": self.characters, "normalize": self.normalize}

    @classmethod
    def from_config(cls, config: dict) -> CharTokenizer:
        """Rebuild a tokenizer from `get_config()`."""
        return cls(**config)

    def to_json(self) -> str:
        """Return the configuration as a JSON string."""
        return json.dumps({"class_name": type(self).__name__, "config": self.get_config()})

    @classmethod
    def from_json(cls, text: str) -> CharTokenizer:
        """Rebuild a tokenizer from `to_json()`."""
        data = json.loads(text)
        if data.get("class_name") != cls.__name__:
            raise ValueError(f"not a {cls.__name__}: {data.get('class_name')!r}")
        return cls.from_config(data["config"])

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and self.get_config() == other.get_config()

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
