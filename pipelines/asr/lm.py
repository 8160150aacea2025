"""Character and word n-gram language models for shallow fusion in beam search.

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

A character model still lets through words that are not English ("sintific", "bambosils").
`WordNgramLM` adds a Kneser-Ney word n-gram model over the training transcripts' words and reads
it out one character at a time with a look-ahead over its lexicon; words outside the lexicon
keep a share of the probability (the dev set's out-of-lexicon rate) and are spelled by the
character model, so names and rare words stay possible. On the built-in corpus it lowered test
WER from 27.3% to 23.6% at beam 4 (docs/benchmarks.md, session 8).

`train` fits them on the training transcripts (`decode.lm_order` and `decode.word_lm_order`, 0
for none) and the recognizer keeps them inside `model.keras` as assets (`lm.npz`,
`word_lm.npz`); `evaluate` and `transcribe` use them in beam search with `--lm-weight` (0 turns
it off).

References:
    Chen and Goodman, "An Empirical Study of Smoothing Techniques for Language Modeling",
    Harvard TR-10-98, 1998.
    Gulcehre et al., "On Using Monolingual Corpora in Neural Machine Translation", 2015.
    Hori, Cho and Watanabe, "End-to-end Speech Recognition with Word-based RNN Language
    Models", SLT 2018.
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
WORD_LM_FILENAME = "word_lm.npz"
DEFAULT_ORDER = 8
DEFAULT_WORD_ORDER = 3
DEFAULT_LM_WEIGHT = 0.5  # tuned with the word model on dev (docs/benchmarks.md, session 8)
FORMAT_VERSION = 1
LOG_ZERO = -1e30
CACHE_SIZE = 200_000  # histories whose distributions are kept (about 70 MB)
WORD_CACHE_SIZE = 500  # word histories whose distributions are kept (about 64 MB)


class _RowIndex:
    """`get(key)`: the row of a uint8 `(H, n)` history array whose bytes are `key`, or None.

    A binary search over the rows sorted as byte strings: building it is one `argsort`, not a
    Python object per row, so loading a model with millions of histories stays fast.
    """

    def __init__(self, histories: np.ndarray):
        self._rows, width = histories.shape
        self._dtype = np.dtype(f"V{max(width, 1)}")
        if width:
            keys = np.ascontiguousarray(histories).view(self._dtype).ravel()
            self._order = np.argsort(keys)
            self._keys = keys[self._order]

    def get(self, key: bytes) -> int | None:
        if not key:  # the order-1 table: one row with the empty history
            return 0 if self._rows else None
        i = int(np.searchsorted(self._keys, np.frombuffer(key, self._dtype))[0])
        if i < self._rows and self._keys[i].tobytes() == key:
            return int(self._order[i])
        return None


class _NextCharacterModel:
    """What both language models share: `log_probs(history)` over a tokenizer's ids."""

    tokenizer: CharTokenizer

    def log_probs(self, history) -> np.ndarray:
        raise NotImplementedError

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


class CharNgramLM(_NextCharacterModel):
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
            histories = np.ascontiguousarray(histories, np.uint8)
            counts = np.asarray(counts, np.float32)
            self.tables.append((histories, counts, _RowIndex(histories)))
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
        sequences = []
        for text in texts:
            ids = [i for i in tokenizer.encode(text) if i != tokenizer.unk_id]
            if ids:
                sequences.append(pad + bytes(ids + [tokenizer.end_id]))
        if not sequences:
            raise ValueError("no text to train the language model on")
        by_order, discounts = _kneser_ney_counts(sequences, order)
        tables = []
        for k in range(1, order + 1):
            counts = by_order[k]
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

    # ------------------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the model to `path` (a compressed `.npz`), atomically."""
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
        return _write_npz(path, arrays, meta)

    @classmethod
    def load(cls, path) -> CharNgramLM:
        """Read a model written by `save`.

        Raises:
            UserError: the file is missing or not a language model of this format.
        """
        def read(data, meta):
            order = int(meta["order"])
            tables = [(data[f"histories_{k}"], data[f"counts_{k}"]) for k in range(1, order + 1)]
            tokenizer = CharTokenizer.from_config(meta["tokenizer"])
            return cls(tokenizer, order, tables, meta["discounts"])

        return _read_npz(path, read)


def _write_npz(path, arrays: dict, meta: dict) -> Path:
    """Write `arrays` and the JSON `meta` to `path` (compressed `.npz`), atomically."""
    path = Path(path)
    arrays = dict(arrays, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def _read_npz(path, read):
    """`read(data, meta)` on the `.npz` at `path`; a clean `UserError` if it is not ours."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')}")
            return read(data, meta)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{path}: not a language model written by this toolkit ({error})") from None


def _kneser_ney_counts(sequences, order: int):
    """Interpolated Kneser-Ney counts of `sequences` (bytes or tuples, already padded).

    Returns:
        `(by_order, discounts)`: `by_order[k]` maps each k-gram to its count (raw counts for
        `k == order`, continuation counts below) and `discounts[k - 1]` is order k's discount.
    """
    grams = collections.Counter()
    for sequence in sequences:
        grams.update(sequence[i - order : i] for i in range(order, len(sequence) + 1))
    by_order = {order: dict(grams)}  # the highest order: raw counts
    for k in range(order - 1, 0, -1):  # lower orders: distinct left extensions
        by_order[k] = dict(collections.Counter(g[1:] for g in by_order[k + 1]))
    discounts = []
    for k in range(1, order + 1):
        n1 = sum(1 for c in by_order[k].values() if c == 1)
        n2 = sum(1 for c in by_order[k].values() if c == 2)
        # Ney's estimate, kept inside [0.1, 0.9]: with no n-gram seen twice it would be 1
        # and give every seen n-gram's mass to the lower order.
        discounts.append(min(max(n1 / (n1 + 2 * n2), 0.1), 0.9) if n1 + n2 else 0.5)
    return by_order, discounts


class WordNgramLM(_NextCharacterModel):
    """Word n-gram model over a lexicon, read out one character at a time.

    Beam search extends hypotheses character by character, so the word model is turned into
    a next-character distribution with a look-ahead over the lexicon (Hori et al., 2018):
    inside a word the probability of the next character is the probability mass of the
    lexicon words that extend the prefix with it, divided by the mass of the prefix. The
    characters of an in-lexicon word therefore multiply to that word's n-gram probability.
    A word outside the lexicon (a name, a rare word) keeps a share `oov_rate` of the mass of
    each word position and is spelled by the character model `char_lm`; the two ways of
    producing a word are mixed exactly, so the result is a normalised distribution:

        num(p)  = (1 - oov_rate) * sum_{w starts with p} P(w | h)
                  + oov_rate * (1 - P(</s> | h)) * P_char(p | context)
        P(c | p) = num(p + c) / num(p)

    and at a word end (space or `</s>`) the word's own probability (both routes) is split by
    the word model's probability that the sentence ends after it. Words are never empty: no
    space starts a word, and `</s>` starts one only as the empty sentence. `P(w | h)` is an
    interpolated Kneser-Ney model over words and `</s>` with per-order discounts.

    Args:
        char_lm: `CharNgramLM` for words outside the lexicon; its tokenizer is this model's.
        words: sorted list of the lexicon's words (id = position; `</s>` is `len(words)`).
        order: int. Longest word n-gram.
        tables: list of `order` tuples `(histories, offsets, ids, counts)`: for order k the
            `(H, k - 1)` int32 word-id histories (`-1` is `<s>`), and in CSR form the ids
            (`ids[offsets[i]:offsets[i + 1]]`) and counts that follow history i.
        discounts: list of `order` floats.
        oov_rate: float in (0, 1). Share of word positions given to words outside the lexicon.

    Example:

    ```python
    texts = ["the cat sat", "the dog sat"]
    char_lm = CharNgramLM.train(texts, order=4)
    lm = WordNgramLM.train(texts, char_lm, order=2)
    log_p = lm.log_probs(CharTokenizer().encode("the c"))  # "a" is likely: "cat"
    ```

    Reference:
        Hori, Cho and Watanabe, "End-to-end Speech Recognition with Word-based RNN Language
        Models", SLT 2018.
    """

    def __init__(self, char_lm: CharNgramLM, words, order: int, tables, discounts, oov_rate):
        if order < 1 or len(tables) != order or len(discounts) != order:
            raise ValueError("WordNgramLM needs a positive order and one table per order")
        if not 0.0 < oov_rate < 1.0:
            raise ValueError(f"oov_rate must be in (0, 1). Received: oov_rate={oov_rate}")
        self.char_lm = char_lm
        self.tokenizer = char_lm.tokenizer
        self.words = list(words)
        self.order = int(order)
        self.discounts = [float(d) for d in discounts]
        self.oov_rate = float(oov_rate)
        self.tables = [tuple(np.asarray(a) for a in table) for table in tables]
        self._word_ids = {w: i for i, w in enumerate(self.words)}
        self._end = len(self.words)
        # Per order: history tuple -> its row in the table.
        self._rows = [{tuple(h): i for i, h in enumerate(table[0].tolist())}
                      for table in self.tables]  # fmt: skip
        tokens = self.tokenizer.tokens
        first = len(tokens) - len(self.tokenizer.characters)
        self._letters = [tokens[i] for i in range(first, len(tokens)) if tokens[i] != " "]
        self._letter_ids = np.array([tokens.index(ch) for ch in self._letters])
        self._sorted = np.array(self.words)  # searchsorted over the lexicon
        self._space = tokens.index(" ")
        self._cache: dict[bytes, np.ndarray] = {}
        self._dist_cache: dict[tuple, np.ndarray] = {}

    @classmethod
    def train(cls, texts, char_lm: CharNgramLM, order: int = DEFAULT_WORD_ORDER,
              dev_texts=None):  # fmt: skip
        """Fit the word model on `texts`; the lexicon is their words.

        `oov_rate` is the share of `dev_texts`' words outside the lexicon (within
        [0.005, 0.5]), or 0.05 without them.

        Raises:
            ValueError: `order` is not positive or `texts` has no words.
        """
        if order < 1:
            raise ValueError(f"order must be positive. Received: order={order}")
        tokenizer = char_lm.tokenizer
        sentences = [tokenizer.decode(tokenizer.encode(t)).split() for t in texts]
        sentences = [s for s in sentences if s]
        if not sentences:
            raise ValueError("no text to train the language model on")
        words = sorted({w for s in sentences for w in s})
        word_ids = {w: i for i, w in enumerate(words)}
        pad, end = (-1,) * (order - 1), len(words)
        by_order, discounts = _kneser_ney_counts(
            [pad + tuple(word_ids[w] for w in s) + (end,) for s in sentences], order
        )
        tables = []
        for k in range(1, order + 1):
            grams = sorted(by_order[k].items())
            histories = np.array([g[:-1] for g, _ in grams], np.int32).reshape(len(grams), k - 1)
            starts = [i for i in range(len(grams)) if i == 0 or grams[i][0][:-1] !=
                      grams[i - 1][0][:-1]]  # fmt: skip
            tables.append((
                histories[starts], np.array(starts + [len(grams)], np.int64),
                np.array([g[-1] for g, _ in grams], np.int32),
                np.array([c for _, c in grams], np.float32),
            ))
        oov_rate = 0.05
        if dev_texts:
            dev_words = [w for t in dev_texts
                         for w in tokenizer.decode(tokenizer.encode(t)).split()]  # fmt: skip
            if dev_words:
                unknown = sum(1 for w in dev_words if w not in word_ids)
                oov_rate = min(max(unknown / len(dev_words), 0.005), 0.5)
        return cls(char_lm, words, order, tables, discounts, oov_rate)

    def _distribution(self, history: tuple) -> np.ndarray:
        """P(next word | the last `order - 1` word ids), a float64 `(len(words) + 1,)` vector."""
        cached = self._dist_cache.get(history)
        if cached is not None:
            return cached
        p = np.full((len(self.words) + 1,), 1.0 / (len(self.words) + 1))
        for k in range(1, self.order + 1):
            row = self._rows[k - 1].get(history[len(history) - (k - 1) :] if k > 1 else ())
            if row is not None:
                _, offsets, ids, counts = self.tables[k - 1]
                span = slice(offsets[row], offsets[row + 1])
                c = counts[span].astype(np.float64)
                d, total = self.discounts[k - 1], c.sum()
                p *= d * len(c) / total
                p[ids[span]] += np.maximum(c - d, 0.0) / total
        if len(self._dist_cache) >= WORD_CACHE_SIZE:
            self._dist_cache.clear()
        self._dist_cache[history] = p
        return p

    def _prefix_queries(self, partial: str) -> list[str]:
        """`[partial + c, partial + c + "\\x7f"]` for each letter c: the bounds of each range."""
        return [q for ch in self._letters for q in (partial + ch, partial + ch + "\x7f")]

    def _context(self, words) -> tuple:
        context = tuple(self._word_ids.get(w, -2) for w in words[-(self.order - 1) :])
        return (-1,) * (self.order - 1 - len(context)) + context if self.order > 1 else ()

    def log_probs(self, history) -> np.ndarray:
        """Log-probabilities `(vocab_size,)` of the next character after `history` (token ids).

        `history` holds the sentence's tokens so far, without `<s>`.
        """
        history = [int(t) for t in history]
        key = bytes(history)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        tokens = self.tokenizer.tokens
        *done, partial = "".join(tokens[t] for t in history).split(" ")
        char_lp = self.char_lm.log_probs(history).astype(np.float64)
        result = np.full((self.tokenizer.vocab_size,), LOG_ZERO)
        context = self._context(done)
        p = self._distribution(context)
        in_word = 1.0 - self.oov_rate
        with np.errstate(divide="ignore"):
            log_oov = np.log(self.oov_rate * (1.0 - p[self._end]))
            start = len(history) - len(partial)  # the partial word's spelling by char_lm
            log_oov += sum(float(self.char_lm.log_probs(history[:j])[history[j]])
                           for j in range(start, len(history)))  # fmt: skip
            # Lexicon words starting with `partial` (then with `partial + c`, for each letter c)
            # are a contiguous range of the sorted lexicon: masses are cumulative-sum differences.
            lo, hi = np.searchsorted(self._sorted, [partial, partial + "\x7f"])
            cum = np.concatenate([[0.0], np.cumsum(p[lo:hi])])
            bounds = np.searchsorted(self._sorted[lo:hi], self._prefix_queries(partial))
            masses = in_word * np.maximum(cum[bounds[1::2]] - cum[bounds[::2]], 0.0)
            if partial:
                log_num = np.logaddexp(np.log(in_word * cum[-1]), log_oov)
                log_spell = log_oov + char_lp  # an unknown word goes on as char_lm spells it
            else:  # a word starts: no empty words, so char_lm's letters are renormalised
                log_num = np.log(1.0 - p[self._end]) if done else 0.0
                stop = np.exp(char_lp[self._space]) + np.exp(char_lp[self.tokenizer.end_id])
                log_spell = log_oov + char_lp - np.log(max(1.0 - stop, 1e-30))
            letters = self._letter_ids
            result[letters] = np.logaddexp(np.log(masses), log_spell[letters]) - log_num
            if partial:  # the word may end here; how likely the sentence ends after it
                word = self._word_ids.get(partial)
                ends = np.logaddexp(char_lp[self._space], char_lp[self.tokenizer.end_id])
                log_word = np.logaddexp(
                    np.log(in_word * p[word]) if word is not None else LOG_ZERO,
                    log_oov + ends,
                )
                p_end = self._distribution(self._context(done + [partial]))[self._end]
                result[self._space] = log_word + np.log(1.0 - p_end) - log_num
                result[self.tokenizer.end_id] = log_word + np.log(p_end) - log_num
            elif not done:  # the empty sentence, as likely as the word model says
                result[self.tokenizer.end_id] = np.log(p[self._end])
        result = np.maximum(result, LOG_ZERO).astype(np.float32)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = result
        return result

    def save(self, path) -> Path:
        """Write the word model (not `char_lm`) to `path`, a compressed `.npz`, atomically."""
        arrays = {}
        for k, table in enumerate(self.tables, start=1):
            for name, array in zip(("histories", "offsets", "ids", "counts"), table):
                arrays[f"{name}_{k}"] = array
        meta = {"format": FORMAT_VERSION, "order": self.order, "discounts": self.discounts,
                "oov_rate": self.oov_rate, "words": self.words}  # fmt: skip
        return _write_npz(path, arrays, meta)

    @classmethod
    def load(cls, path, char_lm: CharNgramLM) -> WordNgramLM:
        """Read a model written by `save`, with the character model it was trained with.

        Raises:
            UserError: the file is missing or not a word model of this format.
        """
        def read(data, meta):
            return cls(char_lm, meta["words"], meta["order"], [
                tuple(data[f"{name}_{k}"] for name in ("histories", "offsets", "ids", "counts"))
                for k in range(1, int(meta["order"]) + 1)
            ], meta["discounts"], meta["oov_rate"])

        return _read_npz(path, read)


def save_language_model(lm, dir_path) -> None:
    """Write `lm` (`CharNgramLM` or `WordNgramLM`) into `dir_path` (a Keras asset folder)."""
    dir_path = Path(dir_path)
    if isinstance(lm, WordNgramLM):
        lm.char_lm.save(dir_path / LM_FILENAME)
        lm.save(dir_path / WORD_LM_FILENAME)
    else:
        lm.save(dir_path / LM_FILENAME)


def load_language_model(dir_path):
    """The language model `save_language_model` wrote into `dir_path`, or None."""
    dir_path = Path(dir_path)
    if not (dir_path / LM_FILENAME).is_file():
        return None
    char_lm = CharNgramLM.load(dir_path / LM_FILENAME)
    if (dir_path / WORD_LM_FILENAME).is_file():
        return WordNgramLM.load(dir_path / WORD_LM_FILENAME, char_lm)
    return char_lm
