"""Known-answer tests for output-confidence signals (answer-restricted yes/no confidence, logit margin,
entropy, mean token log-prob)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from vlmrel_core.signals.output import mean_token_logprob, output_signals


def test_output_signals_single_hand_computed_row():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    s = output_signals(logits, yes_token_ids=[0], no_token_ids=[1])
    z = math.e**2 + math.e + 1 + math.e**-1
    p = np.array([math.e**2, math.e, 1.0, math.e**-1]) / z
    assert s["p_yes"][0] == pytest.approx(p[0], rel=1e-12)
    assert s["p_no"][0] == pytest.approx(p[1], rel=1e-12)
    assert s["yes_no_mass"][0] == pytest.approx(p[0] + p[1], rel=1e-12)
    assert s["max_answer_prob"][0] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-12)  # 0.7310585786
    assert s["max_answer_prob"][0] == pytest.approx(0.7310585786300049, abs=1e-12)
    assert s["yes_no_log_odds"][0] == pytest.approx(1.0, abs=1e-12)
    assert s["yes_no_margin"][0] == pytest.approx(1.0, abs=1e-12)
    assert s["top1_top2_margin"][0] == pytest.approx(1.0, abs=1e-12)
    assert s["token_entropy"][0] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    assert s["token_entropy"][0] == pytest.approx(0.9475369639754255, abs=1e-9)  # ln Z - E[x]
    assert s["top1_prob"][0] == pytest.approx(p[0], rel=1e-12)


def test_output_signals_multiple_ids_and_no_winning():
    probs = np.array([[0.4, 0.1, 0.3, 0.2], [0.1, 0.1, 0.6, 0.2]])
    s = output_signals(np.log(probs), yes_token_ids=[0, 1], no_token_ids=[2])
    np.testing.assert_allclose(s["p_yes"], [0.5, 0.2], rtol=1e-12)
    np.testing.assert_allclose(s["p_no"], [0.3, 0.6], rtol=1e-12)
    np.testing.assert_allclose(s["max_answer_prob"], [0.5 / 0.8, 0.6 / 0.8], rtol=1e-12)
    np.testing.assert_allclose(s["yes_no_log_odds"], [math.log(5 / 3), math.log(1 / 3)], atol=1e-12)
    np.testing.assert_allclose(s["yes_no_margin"], [math.log(5 / 3), math.log(3)], atol=1e-12)
    np.testing.assert_allclose(s["top1_top2_margin"], [math.log(4 / 3), math.log(3)], atol=1e-12)
    np.testing.assert_allclose(s["top1_prob"], [0.4, 0.6], rtol=1e-12)
    np.testing.assert_allclose(s["token_entropy"], -(probs * np.log(probs)).sum(axis=1), rtol=1e-12)
    for v in s.values():
        assert v.shape == (2,)


def test_output_signals_is_shift_invariant_and_stable_for_huge_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 20))
    a = output_signals(logits, [0], [1])
    b = output_signals(logits + np.array([[1000.0], [-1000.0], [0.0]]), [0], [1])
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-9)

    # yes/no far below the rest: p_yes + p_no underflows to 0 in float64, a naive ratio would be 0/0 = NaN.
    logits = np.array([[-800.0, -801.0, 800.0, 799.0]])
    s = output_signals(logits, [0], [1])
    assert s["p_yes"][0] == 0.0 and s["p_no"][0] == 0.0
    assert s["max_answer_prob"][0] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-12)
    assert s["yes_no_margin"][0] == pytest.approx(1.0, abs=1e-9)
    assert s["top1_top2_margin"][0] == pytest.approx(1.0, abs=1e-9)
    assert all(np.isfinite(v).all() for v in s.values())


def test_duplicate_ids_are_collapsed_not_double_counted():
    logits = np.log(np.array([[0.4, 0.1, 0.3, 0.2]]))
    s = output_signals(logits, [0, 0, 1], [2])
    assert s["p_yes"][0] == pytest.approx(0.5, rel=1e-12)


def test_empty_batch():
    s = output_signals(np.zeros((0, 5)), [0], [1])
    assert all(v.shape == (0,) for v in s.values())


@pytest.mark.parametrize(
    "logits, yes, no, match",
    [
        (np.zeros((2, 4)), [4], [1], "outside the vocabulary"),
        (np.zeros((2, 4)), [-1], [1], "outside the vocabulary"),
        (np.zeros((2, 4)), [0, 1], [1, 2], "overlap"),
        (np.zeros((2, 4)), [], [1], "yes_token_ids is empty"),
        (np.zeros((2, 4)), [0], [1.0], "must contain ints"),
        (np.zeros((2, 4)), [True], [1], "must contain ints"),
        (np.array([[0.0, np.nan, 1.0]]), [0], [2], "NaN or infinite"),
        (np.array([[0.0, -np.inf, 1.0]]), [0], [2], "NaN or infinite"),
        (np.zeros(4), [0], [1], r"shape \(n, vocab_size\)"),
        (np.zeros((2, 1)), [0], [0], "at least 2 tokens"),
    ],
)
def test_output_signals_validation(logits, yes, no, match):
    with pytest.raises(ValueError, match=match):
        output_signals(logits, yes, no)


def test_max_answer_prob_and_margin_rank_identically_but_top1_top2_does_not():
    rng = np.random.default_rng(0)
    n, vocab = 400, 50
    logits = rng.normal(scale=2.0, size=(n, vocab))
    s = output_signals(logits, yes_token_ids=[3, 7], no_token_ids=[5])
    # Labels that depend partly on the answer-restricted confidence, so AUROC is not just 0.5.
    y = (s["yes_no_margin"] + rng.normal(scale=1.0, size=n) > np.median(s["yes_no_margin"])).astype(int)
    auc_prob = roc_auc_score(y, s["max_answer_prob"])
    auc_margin = roc_auc_score(y, s["yes_no_margin"])
    auc_top = roc_auc_score(y, s["top1_top2_margin"])
    assert auc_prob == auc_margin
    assert spearmanr(s["max_answer_prob"], s["yes_no_margin"]).statistic == pytest.approx(1.0, abs=1e-12)
    assert auc_margin > 0.7
    assert abs(auc_top - auc_margin) > 0.1


def test_top1_top2_margin_can_reverse_the_yes_no_ranking():
    # A: yes beats no by 5 but a third token is 0.1 behind yes. B: yes beats no by 1, nothing else close.
    logits = np.array([[5.0, 0.0, 4.9], [1.0, 0.0, -5.0]])
    s = output_signals(logits, [0], [1])
    assert s["yes_no_margin"][0] > s["yes_no_margin"][1]
    assert s["max_answer_prob"][0] > s["max_answer_prob"][1]
    assert s["top1_top2_margin"][0] < s["top1_top2_margin"][1]
    np.testing.assert_allclose(s["top1_top2_margin"], [0.1, 1.0], atol=1e-12)


def test_mean_token_logprob_ragged():
    out = mean_token_logprob([np.array([-0.1, -0.3]), np.array([-2.0]), [0.0, -1.0, -2.0], -0.5])
    np.testing.assert_allclose(out, [-0.2, -2.0, -1.0, -0.5], atol=1e-12)
    assert mean_token_logprob([]).shape == (0,)


@pytest.mark.parametrize(
    "batch, match",
    [
        ([np.array([-0.1]), np.array([])], "sample 1 has no generated tokens"),
        ([np.array([-0.1, 2.5])], "must be <= 0"),
        ([np.array([-0.1, np.nan])], "NaN"),
        ([np.zeros((2, 2))], "1-D"),
    ],
)
def test_mean_token_logprob_validation(batch, match):
    with pytest.raises(ValueError, match=match):
        mean_token_logprob(batch)


def test_numpy_log_space_reductions_match_scipy_bit_for_bit():
    """`_log_softmax` / `_logsumexp` replace scipy's (whose array-API dispatch cost ~0.5 ms a batch-1 call): the
    same operations, so the same bits, including ties at the maximum and huge or tiny logits."""
    from scipy.special import log_softmax, logsumexp

    from vlmrel_core.signals.output import _log_softmax, _logsumexp

    rng = np.random.default_rng(0)
    for trial in range(300):
        logits = rng.normal(size=(int(rng.integers(1, 5)), int(rng.integers(2, 70)))) * [1e-3, 1.0, 30.0, 1e4][trial % 4]
        if trial % 3 == 0:
            logits[:, 1] = logits[:, 0]  # a tie at (possibly) the maximum
        if trial % 5 == 0:
            logits = np.round(logits)
        assert np.array_equal(_log_softmax(logits), log_softmax(logits, axis=1))
        assert np.array_equal(_logsumexp(logits), logsumexp(logits, axis=1))
