"""Reliability metrics: known answers by hand, and agreement with scikit-learn / scipy where they define the metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from vlmrel_core.analysis.metrics import (
    Estimate,
    auroc_rows,
    area_under_risk_coverage,
    auroc,
    auroc_ci,
    auroc_gain_ci,
    brier_score,
    expected_calibration_error,
    max_calibration_error,
    point_biserial,
    reliability_bins,
    risk_coverage_curve,
)


def _gaussian_signal(n: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Score ~ N(separation * correct, 1): the population AUROC is Phi(separation / sqrt 2)."""
    rng = np.random.default_rng(seed)
    correct = rng.integers(0, 2, n)
    return correct, rng.normal(separation * correct, 1.0)


# ------------------------------------------------------------------------------------------------ AUROC


def test_auroc_hand_computed_and_matches_sklearn() -> None:
    # Pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3 of 4.
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auroc([True, False], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    correct, score = _gaussian_signal(500, 1.0, seed=1)
    assert auroc(correct, score) == pytest.approx(roc_auc_score(correct, score), abs=1e-15)


@pytest.mark.parametrize(
    ("correct", "score", "message"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "both correct and wrong"),
        ([0, 1, 1], [0.1, 0.2], "3 entries"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "only 0/1"),
    ],
)
def test_auroc_rejects_bad_input(correct: list, score: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auroc(correct, score)


def test_vectorised_auroc_equals_sklearn_with_ties() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(20, 60))
    scores = rng.integers(0, 5, size=(20, 60)).astype(float)  # heavy ties
    expected = [roc_auc_score(labels[i], scores[i]) for i in range(20)]
    np.testing.assert_allclose(auroc_rows(labels, scores), expected, rtol=0, atol=1e-12)


def test_auroc_ci_is_the_percentile_bootstrap_of_sklearn_auroc() -> None:
    correct, score = _gaussian_signal(80, 1.0, seed=3)
    estimate = auroc_ci(correct, score, n_boot=300, seed=7)
    # Re-run the same resamples with sklearn (one block of 300 draws; n = 80 never yields a single class here).
    indices = np.random.default_rng(7).integers(0, 80, size=(300, 80))
    assert all(0 < correct[i].sum() < 80 for i in indices)
    replicates = [roc_auc_score(correct[i], score[i]) for i in indices]
    low, high = np.quantile(replicates, [0.025, 0.975])
    assert estimate.value == pytest.approx(roc_auc_score(correct, score))
    assert estimate.low == pytest.approx(low, abs=1e-12)
    assert estimate.high == pytest.approx(high, abs=1e-12)


def test_auroc_ci_covers_the_population_value_and_shrinks_with_n() -> None:
    true_auroc = stats.norm.cdf(1.0 / math.sqrt(2.0))  # 0.7602
    small = auroc_ci(*_gaussian_signal(300, 1.0, seed=4), n_boot=500, seed=0)
    large = auroc_ci(*_gaussian_signal(3000, 1.0, seed=5), n_boot=500, seed=0)
    assert large.low < true_auroc < large.high
    assert small.low <= small.value <= small.high
    assert (large.high - large.low) < 0.5 * (small.high - small.low)  # width ~ 1/sqrt(n): ratio ~0.32
    # Same seed, same answer.
    assert auroc_ci(*_gaussian_signal(300, 1.0, seed=4), n_boot=500, seed=0) == small


def test_auroc_ci_redraws_single_class_resamples() -> None:
    correct = np.zeros(40, dtype=int)
    correct[0] = 1  # ~36% of resamples miss the only correct answer
    score = np.linspace(0, 1, 40)
    estimate = auroc_ci(correct, score, n_boot=200, seed=0)
    assert np.isfinite([estimate.low, estimate.high]).all()
    assert estimate.value == pytest.approx(0.0)  # the only correct answer has the lowest score


def test_auroc_gain_ci_is_paired() -> None:
    rng = np.random.default_rng(6)
    correct = rng.integers(0, 2, 1000)
    strong = rng.normal(1.5 * correct, 1.0)
    weak = strong + rng.normal(0.0, 1.0, 1000)  # same signal plus noise: strictly worse
    gain = auroc_gain_ci(correct, strong, weak, n_boot=500, seed=0)
    assert gain.value == pytest.approx(auroc(correct, strong) - auroc(correct, weak))
    assert gain.low > 0  # the paired interval detects the gain
    solo = auroc_ci(correct, strong, n_boot=500, seed=0)
    assert gain.high - gain.low < solo.high - solo.low  # pairing cancels shared sampling noise
    same = auroc_gain_ci(correct, strong, strong, n_boot=100, seed=0)
    assert same == Estimate(0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------ point-biserial


def _score_with_exact_correlation(correct: np.ndarray, r: float, seed: int) -> np.ndarray:
    """A score whose Pearson correlation with ``correct`` is exactly ``r``."""
    label_part = correct - correct.mean()
    label_part /= np.linalg.norm(label_part)
    noise = np.random.default_rng(seed).normal(size=correct.size)
    noise -= noise.mean()
    noise -= noise @ label_part * label_part
    noise /= np.linalg.norm(noise)
    return r * label_part + math.sqrt(1 - r * r) * noise


def test_point_biserial_value_matches_scipy() -> None:
    correct, score = _gaussian_signal(400, 0.8, seed=8)
    estimate = point_biserial(correct, score, n_boot=200, seed=0)
    assert estimate.value == pytest.approx(stats.pointbiserialr(correct, score).statistic, abs=1e-12)
    assert estimate.value == pytest.approx(np.corrcoef(correct, score)[0, 1], abs=1e-12)
    assert estimate.low < estimate.value < estimate.high


def test_point_biserial_fisher_reproduces_the_papers_interval() -> None:
    # Paper: R_pb(C_k) = 0.001 [-0.034, 0.036] at n = 3,090 — exactly the Fisher z interval.
    correct = (np.arange(3090) % 2).astype(int)
    score = _score_with_exact_correlation(correct, 0.001, seed=9)
    fisher = point_biserial(correct, score, alpha=0.05, ci_method="fisher")
    assert fisher.value == pytest.approx(0.001, abs=1e-10)
    assert round(fisher.low, 3) == -0.034 and round(fisher.high, 3) == 0.036
    half_width = stats.norm.ppf(0.975) / math.sqrt(3090 - 3)
    assert fisher.low == pytest.approx(math.tanh(math.atanh(0.001) - half_width), abs=1e-9)
    # The default bootstrap interval agrees with Fisher's to within Monte-Carlo noise at this n.
    bootstrap = point_biserial(correct, score, n_boot=400, seed=0)
    assert bootstrap.low == pytest.approx(fisher.low, abs=0.006)
    assert bootstrap.high == pytest.approx(fisher.high, abs=0.006)


def test_point_biserial_constant_score_is_an_error() -> None:
    with pytest.raises(ValueError, match="constant"):
        point_biserial([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3])


# ------------------------------------------------------------------------------------------------ calibration metrics


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reliability_bins_equal_sklearn_calibration_curve(strategy: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 500))
    prob = rng.beta(2, 1, n)
    if seed == 3:  # values exactly on uniform edges, the ends, and many ties
        prob = rng.choice([0.0, 0.1, 0.2, 0.5, 0.7, 1.0], n)
    correct = (rng.uniform(size=n) < prob).astype(int)
    for n_bins in (5, 10, 15):
        bins = reliability_bins(correct, prob, n_bins=n_bins, strategy=strategy)
        expected_true, expected_pred = calibration_curve(correct, prob, n_bins=n_bins, strategy=strategy)
        np.testing.assert_allclose(bins.prob_true, expected_true, rtol=0, atol=1e-12)
        np.testing.assert_allclose(bins.prob_pred, expected_pred, rtol=0, atol=1e-12)
        assert bins.counts.sum() == n and (bins.counts > 0).all()
        assert bins.bin_edges.shape == (n_bins + 1,)
        assert bins.counts.shape == bins.bin_index.shape == bins.prob_true.shape


def test_reliability_bins_reject_out_of_range_probabilities() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_bins([0, 1], [0.5, 1.2])
    with pytest.raises(ValueError, match="strategy"):
        reliability_bins([0, 1], [0.5, 0.2], strategy="kmeans")  # type: ignore[arg-type]


def test_calibration_errors_known_answers() -> None:
    # Everyone says 0.8, 60% are right: ECE = MCE = 0.2.
    prob = np.full(10, 0.8)
    correct = np.array([1] * 6 + [0] * 4)
    assert expected_calibration_error(correct, prob) == pytest.approx(0.2)
    assert max_calibration_error(correct, prob) == pytest.approx(0.2)
    # Two perfectly calibrated bins: ECE 0.
    prob = np.array([0.25] * 4 + [0.75] * 4)
    correct = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(correct, prob, n_bins=10) == pytest.approx(0.0)
    # Bins with 3 and 1 samples, gaps 0.1 and 0.5: ECE = (3*0.1 + 1*0.5)/4 = 0.2, MCE = 0.5.
    prob = np.array([0.1, 0.1, 0.1, 0.5])
    correct = np.array([0, 0, 0, 0])
    assert expected_calibration_error(correct, prob, n_bins=10) == pytest.approx(0.2)
    assert max_calibration_error(correct, prob, n_bins=10) == pytest.approx(0.5)


def test_brier_score_matches_definition_and_sklearn() -> None:
    rng = np.random.default_rng(10)
    prob = rng.uniform(size=200)
    correct = (rng.uniform(size=200) < prob).astype(int)
    assert brier_score(correct, prob) == pytest.approx(np.mean((prob - correct) ** 2))
    assert brier_score(correct, prob) == pytest.approx(brier_score_loss(correct, prob))
    assert brier_score([1, 1], [1.0, 0.5]) == pytest.approx(0.125)  # one class is fine for Brier
    with pytest.raises(ValueError):
        brier_score([1, 0], [1.5, 0.5])


# ------------------------------------------------------------------------------------------------ risk-coverage


def test_risk_coverage_curve_hand_example_with_ties() -> None:
    curve = risk_coverage_curve([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.3])
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.8, 0.3])
    np.testing.assert_allclose(curve.coverage, [0.25, 0.75, 1.0])
    np.testing.assert_allclose(curve.risk, [0.0, 1 / 3, 0.5])
    np.testing.assert_array_equal(curve.n_kept, [1, 3, 4])
    np.testing.assert_array_equal(curve.n_errors, [0, 1, 2])
    # AURC = 0 * 0.25 + (1/3) * 0.5 + 0.5 * 0.25
    assert area_under_risk_coverage([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.3]) == pytest.approx(7 / 24)


def test_aurc_without_ties_is_mean_top_k_risk() -> None:
    rng = np.random.default_rng(11)
    confidence = rng.uniform(size=300)
    correct = (rng.uniform(size=300) < confidence).astype(int)
    errors_by_rank = 1 - correct[np.argsort(-confidence)]
    top_k_risk = np.cumsum(errors_by_rank) / np.arange(1, 301)
    assert area_under_risk_coverage(correct, confidence) == pytest.approx(top_k_risk.mean())
    # A perfect ranking of 2 errors among 4 answers: risks 0, 0, 1/3, 1/2.
    assert area_under_risk_coverage([1, 1, 0, 0], [4, 3, 2, 1]) == pytest.approx((1 / 3 + 1 / 2) / 4)


def test_risk_coverage_with_given_thresholds() -> None:
    curve = risk_coverage_curve([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.3], thresholds=[0.5, 0.95])
    np.testing.assert_allclose(curve.thresholds, [0.95, 0.5])  # sorted descending
    np.testing.assert_array_equal(curve.n_kept, [0, 3])
    assert np.isnan(curve.risk[0]) and curve.risk[1] == pytest.approx(1 / 3)
