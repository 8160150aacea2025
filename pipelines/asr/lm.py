"""Character n-gram language model for shallow fusion in beam search.

An attention decoder trained for half an hour on a few thousand sentences spells English
badly ("feemal" for "female"): it has seen too little text. A character n-gram model trained
on the training transcripts (and any extra text, such as a word list) in seconds is a second
opinion on spelling that beam search adds to the attention and CTC scores (shallow fusion,
Gulcehre et al. 2015; ESPnet's `lm_weight`):

    score = (1 - ctc_weight) * log P_att + ctc_weight * log P_ctc + lm_weight * log P_lm

`CharNgramLM` is an interpolated Kneser-Ney model (Chen and Goodman, 1999) over the
recognizer's token ids: the characters and `</s>`; each sentence's history starts with
`order - 1` start tokens. Each order has its own discount `D = n1 / (n1 + 2 n2)` (Ney et al.,
1994), from the numbers of n-grams seen once and twice (kept within [0.1, 0.9]).
`log_probs(history)` returns the whole next-token distribution as a vector over the
tokenizer's ids (log 0 for blank, `<s>` and `<unk>`), cached per history.

`train` fits one on the training transcripts (`decode.lm_order`, 0 for none) and the recognizer
keeps it inside `model.keras` as an asset (`lm.npz`); `evaluate` and `transcribe` use it in beam
search with `--lm-weight` (0 turns it off).

References:
    Chen and Goodman, "An Empirical Study of Smoothing Techniques for Language Modeling",
    Harvard TR-10-98, 1998.
    Gulcehre et al., "On Using Monolingual Corpora in Neural Machine Translation", 2015.
"""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path

import numpy as np

from pipelines.asr.tokenizer import CharTokenizer
from toolkit.errors import UserError

LM_FILENAME = "lm.npz"
DEFAULT_ORDER = 8
DEFAULT_LM_WEIGHT = 0.3
FORMAT_VERSION = 1
LOG_ZERO = -1e30
CACHE_SIZE = 200_000  # histories whose distributions are kept (about 70 MB)


class CharNgramLM:
    """Interpolated Kneser-Ney character n-gram model over a `CharTokenizer`'s ids.

    Build one with `CharNgramLM.train(texts, tokenizer, order)`; `save`/`load` round-trip it.

    Args:
        tokenizer: `CharTokenizer`.
        order: int. Longest n-gram (history of `order - 1` tokens).
        tables: list of `order` pairs `(histories, counts)`: for n-gram length `k` (1-based),
            `histories` is a uint8 array `(H, k - 1)` of token ids and `counts` a float32
            array `(H, vocab_size)` of counts (raw counts for `k == order`, Kneser-Ney
            continuation counts below).
        discounts: list of `order` floats, the absolute discount of each order.

    Example:

    ```python
    lm = CharNgramLM.train(["the cat sat", "the dog sat"], CharTokenizer(), order=4)
    log_p = lm.log_probs(CharTokenizer().encode("the c"))  # over the tokenizer's ids
    ```
    """

    def __init__(self, tokenizer: CharTokenizer, order: int, tables, discounts):
        if order < 1:
            raise ValueError(f"order must be positive. Received: order={order}")
        if len(tables) != order or len(discounts) != order:
            raise ValueError("tables and discounts need one entry per order")
        self.tokenizer = tokenizer
        self.order = int(order)
        self.discounts = [float(d) for d in discounts]
        self.tables = []
        for histories, counts in tables:
            histories = np.asarray(histories, np.uint8)
            counts = np.asarray(counts, np.float32)
            index = {bytes(h): i for i, h in enumerate(histories)}
            self.tables.append((histories, counts, index))
        vocab = tokenizer.vocab_size
        self.valid = np.zeros((vocab,), bool)  # what the model can predict
        self.valid[len(tokenizer.tokens) - len(tokenizer.characters):] = True
        self.valid[tokenizer.end_id] = True
        self._cache: dict[bytes, np.ndarray] = {}

    # ------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts, tokenizer: CharTokenizer | None = None, order: int = DEFAULT_ORDER):
        """Count the n-grams of `texts` (one sentence each, normalised by the tokenizer).

        Raises:
            ValueError: `order` is not positive or `texts` has no characters.
        """
        tokenizer = tokenizer or CharTokenizer()
        if order < 1:
            raise ValueError(f"order must be positive. Received: order={order}")
        if tokenizer.vocab_size > 256:
            raise ValueError("CharNgramLM needs a tokenizer of at most 256 ids")
        pad = bytes([tokenizer.start_id] * (order - 1))
        grams = collections.Counter()
        for text in texts:
            ids = [i for i in tokenizer.encode(text) if i != tokenizer.unk_id]
            if not ids:
                continue
            sequence = pad + bytes(ids + [tokenizer.end_id])
            grams.update(sequence[i - order : i] for i in range(order, len(sequence) + 1))
        if not grams:
            raise ValueError("no text to train the language model on")
        tables, discounts = [], []
        level = dict(grams)  # the highest order: raw counts
        by_order = {order: level}
        for k in range(order - 1, 0, -1):  # lower orders: distinct left extensions
            continuation = collections.Counter(g[1:] for g in by_order[k + 1])
            by_order[k] = dict(continuation)
        for k in range(1, order + 1):
            counts = by_order[k]
            n1 = sum(1 for c in counts.values() if c == 1)
            n2 = sum(1 for c in counts.values() if c == 2)
            # Ney's estimate, kept inside [0.1, 0.9]: with no n-gram seen twice it would be 1
            # and give every seen n-gram's mass to the lower order.
            discounts.append(min(max(n1 / (n1 + 2 * n2), 0.1), 0.9) if n1 + n2 else 0.5)
            rows: dict[bytes, int] = {}
            for gram in counts:
                rows.setdefault(gram[:-1], len(rows))
            histories = np.zeros((len(rows), k - 1), np.uint8)
            for history, row in rows.items():
                histories[row] = np.frombuffer(history, np.uint8)
            table = np.zeros((len(rows), tokenizer.vocab_size), np.float32)
            for gram, count in counts.items():
                table[rows[gram[:-1]], gram[-1]] = count
            tables.append((histories, table))
        return cls(tokenizer, order, tables, discounts)

    # ------------------------------------------------------------------------------------------

    def log_probs(self, history) -> np.ndarray:
        """Log-probabilities `(vocab_size,)` of the next token after `history` (token ids).

        `history` holds the sentence's tokens so far, without `<s>`; only the last
        `order - 1` count. Ids the model never predicts (blank, `<s>`, `<unk>`) get `LOG_ZERO`.
        """
        history = [int(t) for t in history][-(self.order - 1) :] if self.order > 1 else []
        key = bytes([self.tokenizer.start_id] * (self.order - 1 - len(history)) + history)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        p = self.valid / self.valid.sum()
        for k in range(1, self.order + 1):
            _, counts, index = self.tables[k - 1]
            row = index.get(key[len(key) - (k - 1) :] if k > 1 else b"")
            if row is None:
                continue
            c = counts[row]
            total = c.sum()
            d = self.discounts[k - 1]
            p = (np.maximum(c - d, 0.0) + d * np.count_nonzero(c) * p) / total
        with np.errstate(divide="ignore"):
            result = np.where(self.valid, np.log(np.maximum(p, 1e-30)), LOG_ZERO)
        result = result.astype(np.float32)
        if len(self._cache) >= CACHE_SIZE:  # bounded memory in a long transcription
            self._cache.clear()
        self._cache[key] = result
        return result

    def sentence_log_prob(self, text: str) -> float:
        """Natural-log probability of a whole sentence, `</s>` included."""
        ids = self.tokenizer.encode(text) + [self.tokenizer.end_id]
        return float(sum(self.log_probs(ids[:i])[t] for i, t in enumerate(ids)))

    def perplexity(self, texts) -> float:
        """Per-token perplexity over `texts` (`</s>` counted as a token)."""
        total, tokens = 0.0, 0
        for text in texts:
            total += self.sentence_log_prob(text)
            tokens += len(self.tokenizer.encode(text)) + 1
        return float(np.exp(-total / max(tokens, 1)))

    # ------------------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the model to `path` (a compressed `.npz`), atomically."""
        path = Path(path)
        arrays = {}
        for k, (histories, counts, _) in enumerate(self.tables, start=1):
            arrays[f"histories_{k}"] = histories
            arrays[f"counts_{k}"] = counts
        meta = {
            "format": FORMAT_VERSION,
            "order": self.order,
            "discounts": self.discounts,
            "tokenizer": self.tokenizer.get_config(),
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> CharNgramLM:
        """Read a model written by `save`.

        Raises:
            UserError: the file is missing or not a language model of this format.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                if meta.get("format") != FORMAT_VERSION:
                    raise ValueError(f"format {meta.get('format')}")
                order = int(meta["order"])
                tables = [(data[f"histories_{k}"], data[f"counts_{k}"])
                          for k in range(1, order + 1)]  # fmt: skip
        except (OSError, ValueError, KeyError) as error:
            raise UserError(
                f"{path}: not a language model written by this toolkit ({error})"
            ) from None
        tokenizer = CharTokenizer.from_config(meta["tokenizer"])
        return cls(tokenizer, order, tables, meta["discounts"])
