"""CTC prefix scores against brute-force enumeration of every alignment path."""

import itertools

import numpy as np
import pytest

from pipelines.asr.ctc import CTCPrefixScorer, ctc_prefix_log_prob, log_softmax

BLANK, EOS = 0, 1  # tiny vocabulary: blank, eos (never emitted by CTC), labels 2 and 3


def collapse(path):
    out = []
    previous = None
    for p in path:
        if p != previous and p != BLANK:
            out.append(p)
        previous = p
    return tuple(out)


def brute_force(log_probs, prefix, full=False):
    """Sum of exp(path log-prob) over all T-step paths whose collapse starts with (or, with
    `full`, equals) `prefix`. EOS has zero CTC probability so it is left out of paths."""
    T, V = log_probs.shape
    labels = [v for v in range(V) if v != EOS]
    total = 0.0
    for path in itertools.product(labels, repeat=T):
        seq = collapse(path)
        ok = seq == tuple(prefix) if full else seq[: len(prefix)] == tuple(prefix)
        if ok:
            total += np.exp(sum(log_probs[t, p] for t, p in enumerate(path)))
    return np.log(total) if total > 0 else -np.inf


@pytest.fixture
def log_probs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4)) * 2.0
    logits[:, EOS] = -1e9  # CTC never emits eos
    return log_softmax(logits)


@pytest.mark.parametrize("prefix", [(2,), (3,), (2, 2), (2, 3), (3, 2, 3), (2, 2, 3)])
def test_prefix_scores_match_brute_force(log_probs, prefix):
    got = ctc_prefix_log_prob(log_probs, prefix, blank_id=BLANK, eos_id=EOS)
    np.testing.assert_allclose(got, brute_force(log_probs, prefix), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prefix", [(), (2,), (2, 3), (3, 3)])
def test_eos_score_is_full_sequence_probability(log_probs, prefix):
    got = ctc_prefix_log_prob(log_probs, (*prefix, EOS), blank_id=BLANK, eos_id=EOS)
    np.testing.assert_allclose(got, brute_force(log_probs, prefix, full=True), rtol=1e-9)


def test_vectorised_candidates_equal_one_by_one(log_probs):
    scorer = CTCPrefixScorer(log_probs, blank_id=BLANK, eos_id=EOS)
    state = scorer.initial_state()
    scores, r_new = scorer.score([state], np.array([[2]]))
    s2 = scorer.next_state(r_new, scores, 0, 0, 2)
    scores, r_new = scorer.score([state], np.array([[3]]))
    s3 = scorer.next_state(r_new, scores, 0, 0, 3)
    batch, _ = scorer.score([s2, s3], np.array([[2, 3, EOS], [3, 2, EOS]]))
    for k, prefix in enumerate([(2,), (3,)]):
        for c, label in enumerate([[2, 3, EOS], [3, 2, EOS]][k]):
            expected = (
                brute_force(log_probs, prefix, full=True)
                if label == EOS
                else (brute_force(log_probs, (*prefix, label)))
            )
            np.testing.assert_allclose(batch[k, c], expected, rtol=1e-9)


def test_prefix_scores_sum_to_parent():
    """psi(g) = p(exactly g) + sum_c psi(g + c): the children partition the parent's paths."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4))
    logits[:, EOS] = -1e9
    lp = log_softmax(logits)
    parent = ctc_prefix_log_prob(lp, (2,), BLANK, EOS)
    children = [ctc_prefix_log_prob(lp, (2, c), BLANK, EOS) for c in (2, 3)]
    children.append(ctc_prefix_log_prob(lp, (2, EOS), BLANK, EOS))
    np.testing.assert_allclose(np.logaddexp.reduce(children), parent, rtol=1e-9)
