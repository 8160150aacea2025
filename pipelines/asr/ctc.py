"""CTC prefix scoring for joint CTC/attention beam search (NumPy).

The CTC prefix probability of a label prefix `h` is the total probability of every CTC path
whose collapsed label sequence *starts with* `h`:

    psi(h) = sum over label sequences s with s[:|h|] = h of p_ctc(s | x).

Watanabe et al. (2017), Algorithm 2, computes it incrementally: for each hypothesis `g` keep the
forward variables r_t^n(g) (paths of x_1..t collapsing to g that end in a non-blank) and
r_t^b(g) (ending in blank). Extending g by a label c != eos:

    phi_t    = r_t^b(g) + r_t^n(g)      (only r_t^b(g) when c equals the last label of g)
    r_t^n(h) = (r_{t-1}^n(h) + phi_{t-1}) * y_t(c)
    r_t^b(h) = (r_{t-1}^b(h) + r_{t-1}^n(h)) * y_t(blank)
    psi(h)   = r_1^n(h) + sum_{t>=2} phi_{t-1} * y_t(c)

and psi(g + eos) = r_T^n(g) + r_T^b(g), the probability of exactly g. Everything here runs in
log space and is vectorised over hypotheses and candidate labels, so one beam-search step is one
loop over the T encoder frames.

References:
    Watanabe et al., "Hybrid CTC/Attention Architecture for End-to-End Speech Recognition",
    IEEE JSTSP 2017.
"""

from __future__ import annotations

import numpy as np

# Joint CTC/attention beam search defaults, shared by `decode`, `evaluate`, `transcribe`, the CLI
# and `DecodeConfig` (kept in this light module so the CLI parses without importing Keras).
DEFAULT_BEAM_SIZE = 4
# 0.3 against 0.5 with the word LM at 0.5, session 10's model on the 400 dev utterances:
# CER 6.31% -> 5.74%, WER 17.3% -> 15.5% (docs/benchmarks.md, session 11).
DEFAULT_CTC_WEIGHT = 0.3

NEG_INF = -1e30


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class CTCPrefixScorer:
    """Incremental CTC prefix scores for the hypotheses of one utterance.

    Args:
        log_probs: (T, V) CTC log-probabilities of one utterance (only its true frames).
        blank_id: int. The CTC blank. Defaults to `0`.
        eos_id: int. The end-of-sentence id: extending by it scores the whole hypothesis.

    A *state* is `(r, psi, last)`: r of shape (T, 2) (log r^n, log r^b), the prefix log-score
    psi, and the last label of the hypothesis (`-1` for the empty one).

    Example:

    >>> scorer = CTCPrefixScorer(log_probs, blank_id=0, eos_id=2)
    >>> state = scorer.initial_state()
    >>> scores, new_states = scorer.score([state], np.array([[4, 5, 2]]))
    """

    def __init__(self, log_probs, blank_id: int = 0, eos_id: int = 2):
        self.log_probs = np.asarray(log_probs, dtype=np.float64)
        if self.log_probs.ndim != 2:
            raise ValueError(f"log_probs must be (T, V). Received shape {self.log_probs.shape}")
        self.blank_id = int(blank_id)
        self.eos_id = int(eos_id)
        self.num_frames = self.log_probs.shape[0]

    def initial_state(self):
        """State of the empty hypothesis: r^n = -inf, r^b_t = sum of blank log-probs up to t."""
        T = self.num_frames
        r = np.full((T, 2), NEG_INF)
        r[:, 1] = np.cumsum(self.log_probs[:, self.blank_id])
        return r, 0.0, -1

    def score(self, states, candidates):
        """Prefix log-scores of every hypothesis extended by each of its candidate labels.

        Args:
            states: list of K states (see the class docstring).
            candidates: int array (K, C): the labels to try for each hypothesis.

        Returns:
            `(scores, r_new)`: scores (K, C), the prefix log-probability psi of each extension
            (for `eos_id`, the full log-probability of the hypothesis); r_new (K, C, T, 2), the
            forward variables of each extension (use `next_state` to build a chosen one's state).
        """
        candidates = np.asarray(candidates, dtype=np.int64)
        K, C = candidates.shape
        T = self.num_frames
        r_prev = np.stack([s[0] for s in states])  # (K, T, 2)
        last = np.array([s[2] for s in states])  # (K,)
        x = self.log_probs[:, candidates]  # (T, K, C)
        blank = self.log_probs[:, self.blank_id]  # (T,)
        # phi_t: paths of g ready to emit c at t+1 (no blank needed unless c repeats g's last).
        r_sum = np.logaddexp(r_prev[:, :, 0], r_prev[:, :, 1])  # (K, T)
        phi = np.broadcast_to(r_sum[:, None, :], (K, C, T)).copy()  # (K, C, T)
        repeat = candidates == last[:, None]  # (K, C)
        phi[repeat] = np.broadcast_to(r_prev[:, None, :, 1], (K, C, T))[repeat]
        r = np.full((K, C, T, 2), NEG_INF)
        empty = last < 0  # (K,)
        r[:, :, 0, 0] = np.where(empty[:, None], x[0], NEG_INF)
        psi = r[:, :, 0, 0].copy()  # (K, C)
        # Frames before the earliest end of any prefix cannot emit the new label: start after it
        # (everything before stays -inf; ESPnet starts at the prefix length for the same reason).
        finite = np.isfinite(r_sum).any(axis=0)  # (T,)
        start = int(np.argmax(finite)) + 1 if finite.any() else T
        for t in range(max(start, 1), T):
            r[:, :, t, 0] = np.logaddexp(r[:, :, t - 1, 0], phi[:, :, t - 1]) + x[t]
            r[:, :, t, 1] = np.logaddexp(r[:, :, t - 1, 0], r[:, :, t - 1, 1]) + blank[t]
            psi = np.logaddexp(psi, phi[:, :, t - 1] + x[t])
        eos = candidates == self.eos_id
        if eos.any():
            full = r_sum[:, T - 1]  # (K,)
            psi = np.where(eos, full[:, None], psi)
        return psi, r

    @staticmethod
    def next_state(r_new, scores, k: int, c: int, label: int):
        """State of hypothesis k extended by its c-th candidate `label`."""
        return r_new[k, c], float(scores[k, c]), int(label)


def ctc_prefix_log_prob(log_probs, prefix, blank_id: int = 0, eos_id: int = 2) -> float:
    """Log-probability psi(prefix) of one label prefix (or of exactly `prefix[:-1]` if it ends in
    `eos_id`), computed label by label with `CTCPrefixScorer`."""
    scorer = CTCPrefixScorer(log_probs, blank_id=blank_id, eos_id=eos_id)
    state = scorer.initial_state()
    score = 0.0
    for label in prefix:
        scores, r_new = scorer.score([state], np.array([[label]]))
        score = float(scores[0, 0])
        state = scorer.next_state(r_new, scores, 0, 0, label)
    return score
