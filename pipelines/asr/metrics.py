"""Word and character error rates with substitutions, deletions and insertions.

The error rate of a corpus is the total edit distance over the total reference length,

    ER = (S + D + I) / N

where S, D and I count substituted, deleted and inserted units (words for WER, characters for
CER) in a minimum-edit (Levenshtein) alignment of each hypothesis with its reference, and N is
the number of reference units. Among alignments with the same distance, substitutions are
preferred to a deletion plus an insertion (the convention jiwer and sclite follow), so S/D/I
match jiwer's counts.

Both texts are normalised with `pipelines.asr.text.normalize_text` first (pass
`normalize=False` to score raw strings). CER counts spaces as characters, like jiwer.

Example:

>>> error_rates(["the cat sat"], ["the cat sad"]).wer
0.3333333333333333
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pipelines.asr.text import normalize_text


@dataclasses.dataclass(frozen=True)
class EditCounts:
    """Edit operations of an alignment: hits, substitutions, deletions, insertions."""

    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def reference_length(self) -> int:
        """N: the number of reference units (hits + substitutions + deletions)."""
        return self.hits + self.substitutions + self.deletions

    @property
    def errors(self) -> int:
        """S + D + I."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def error_rate(self) -> float:
        """(S + D + I) / N; `0.0` for an empty reference and hypothesis, `1.0` per insertion
        when the reference is empty."""
        n = self.reference_length
        if n == 0:
            return float(self.insertions)
        return self.errors / n

    def __add__(self, other: EditCounts) -> EditCounts:
        return EditCounts(
            self.hits + other.hits,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )


def edit_counts(reference: Sequence, hypothesis: Sequence) -> EditCounts:
    """Return the S/D/I/hit counts of a minimum-edit alignment of two sequences.

    Args:
        reference: sequence of hashable units (words or characters).
        hypothesis: sequence of hashable units.

    Returns:
        `EditCounts`.
    """
    ref, hyp = list(reference), list(hypothesis)
    n, m = len(ref), len(hyp)
    # cost[i][j] = (distance, substitutions+hits-first tie-break) of ref[:i] vs hyp[:j]; back
    # pointers say which operation reached each cell.
    INF = float("inf")
    cost = [[INF] * (m + 1) for _ in range(n + 1)]
    back = [[""] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0
    for i in range(1, n + 1):
        cost[i][0], back[i][0] = i, "D"
    for j in range(1, m + 1):
        cost[0][j], back[0][j] = j, "I"
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            same = ref[i - 1] == hyp[j - 1]
            diag = cost[i - 1][j - 1] + (0 if same else 1)
            up = cost[i - 1][j] + 1
            left = cost[i][j - 1] + 1
            best = min(diag, up, left)
            cost[i][j] = best
            if diag == best:
                back[i][j] = "H" if same else "S"
            elif up == best:
                back[i][j] = "D"
            else:
                back[i][j] = "I"
    counts = {"H": 0, "S": 0, "D": 0, "I": 0}
    i, j = n, m
    while i > 0 or j > 0:
        op = back[i][j]
        counts[op] += 1
        if op in ("H", "S"):
            i, j = i - 1, j - 1
        elif op == "D":
            i -= 1
        else:
            j -= 1
    return EditCounts(counts["H"], counts["S"], counts["D"], counts["I"])


@dataclasses.dataclass(frozen=True)
class ErrorRates:
    """Corpus-level WER and CER with their edit counts."""

    words: EditCounts
    chars: EditCounts

    @property
    def wer(self) -> float:
        return self.words.error_rate

    @property
    def cer(self) -> float:
        return self.chars.error_rate

    def as_dict(self) -> dict:
        """The JSON summary: `wer`, `cer` and the word/character S/D/I counts."""
        return {
            "wer": self.wer,
            "cer": self.cer,
            "substitutions": self.words.substitutions,
            "deletions": self.words.deletions,
            "insertions": self.words.insertions,
            "reference_words": self.words.reference_length,
            "char_substitutions": self.chars.substitutions,
            "char_deletions": self.chars.deletions,
            "char_insertions": self.chars.insertions,
            "reference_chars": self.chars.reference_length,
        }


def error_rates(
    references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True
) -> ErrorRates:
    """Corpus WER and CER of `hypotheses` against `references`.

    Args:
        references: list of str. The true transcripts.
        hypotheses: list of str. The recognised transcripts, same length.
        normalize: bool. Whether to apply `normalize_text` to both first. Defaults to `True`.

    Returns:
        `ErrorRates`.
    """
    if len(references) != len(hypotheses):
        raise ValueError(
            "references and hypotheses must have the same length. "
            f"Received: {len(references)} and {len(hypotheses)}"
        )
    words, chars = EditCounts(), EditCounts()
    for ref, hyp in zip(references, hypotheses):
        if normalize:
            ref, hyp = normalize_text(ref), normalize_text(hyp)
        words = words + edit_counts(ref.split(), hyp.split())
        chars = chars + edit_counts(ref, hyp)
    return ErrorRates(words=words, chars=chars)


def wer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> float:
    """Corpus word error rate."""
    return error_rates(references, hypotheses, normalize).wer


def cer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> float:
    """Corpus character error rate."""
    return error_rates(references, hypotheses, normalize).cer
