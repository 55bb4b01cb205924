"""Risk-controlled routing: the finite-sample guarantee holds on data where the true risk is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from vlmrel_core.analysis.metrics import risk_coverage_curve
from vlmrel_core.gate.risk import (
    RiskThreshold,
    UnreachableRiskTarget,
    clopper_pearson_upper,
    kept_samples_needed,
    min_kept_for_target,
    select_risk_threshold,
)

TARGET_RISK = 0.1
DELTA = 0.1
N_CALIBRATION = 2_000
N_TRIALS = 300


def _draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """confidence ~ U(0, 1), correct ~ Bernoulli(confidence).

    The selective risk of "keep iff confidence >= t" is E[1 - c | c >= t] = (1 - t) / 2, so the oracle threshold
    for risk 0.1 is t = 0.8 with coverage 0.2.
    """
    confidence = rng.uniform(size=n)
    return confidence, (rng.uniform(size=n) < confidence).astype(int)


def _true_risk(threshold: float) -> float:
    return (1.0 - threshold) / 2.0


def test_clopper_pearson_matches_scipy_binomtest() -> None:
    for errors, kept in [(0, 1), (0, 22), (3, 10), (40, 400), (9, 10)]:
        expected = stats.binomtest(errors, kept, alternative="less").proportion_ci(confidence_level=0.9).high
        assert clopper_pearson_upper(errors, kept, 0.1) == pytest.approx(expected, rel=1e-9)
    assert clopper_pearson_upper(5, 5, 0.1) == 1.0
    assert clopper_pearson_upper(0, 0, 0.1) == 1.0


def test_min_kept_known_answer() -> None:
    # Zero errors among n: bound 1 - delta^(1/n). 1 - 0.1^(1/22) = 0.0992 <= 0.1 < 1 - 0.1^(1/21) = 0.1038.
    assert min_kept_for_target(0.1, 0.1) == 22
    assert kept_samples_needed(0.0, 0.1, 0.1) == 22
    assert kept_samples_needed(0.1, 0.1, 0.1) is None
    needed = kept_samples_needed(0.05, 0.1, 0.1)
    assert clopper_pearson_upper(np.ceil(0.05 * needed), needed, 0.1) <= 0.1


def test_selected_threshold_is_consistent_with_the_calibration_data() -> None:
    confidence, correct = _draw(N_CALIBRATION, np.random.default_rng(0))
    result = select_risk_threshold(confidence, correct, TARGET_RISK, DELTA)
    assert isinstance(result, RiskThreshold)
    kept = confidence >= result.threshold
    assert result.n_kept == kept.sum()
    assert result.coverage == pytest.approx(kept.mean())
    assert result.empirical_risk == pytest.approx(1 - correct[kept].mean())
    n_errors = result.n_kept - correct[kept].sum()
    assert result.risk_upper_bound == pytest.approx(clopper_pearson_upper(n_errors, result.n_kept, DELTA))
    assert result.empirical_risk <= result.risk_upper_bound <= TARGET_RISK
    assert result.to_dict()["method"] == result.method and result.n_calibration == N_CALIBRATION


def test_guarantee_holds_over_repeated_calibration_draws() -> None:
    rng = np.random.default_rng(2024)
    certified_risks, naive_risks, coverages, test_risks = [], [], [], []
    n_refused = 0
    for trial in range(N_TRIALS):
        confidence, correct = _draw(N_CALIBRATION, rng)
        try:
            result = select_risk_threshold(confidence, correct, TARGET_RISK, DELTA)
        except UnreachableRiskTarget:
            # Refusing to certify routes nothing automatically: safe, never a violation. It happens when the
            # first tested threshold (91 kept answers, true risk ~2%) is unlucky; see the module docstring.
            n_refused += 1
            continue
        certified_risks.append(_true_risk(result.threshold))
        coverages.append(result.coverage)
        # Naive rule for contrast: the largest coverage whose *empirical* risk is <= target.
        curve = risk_coverage_curve(correct, confidence)
        naive_risks.append(_true_risk(curve.thresholds[np.flatnonzero(curve.risk <= TARGET_RISK)[-1]]))
        if trial < 50:  # fresh large test draw agrees with the closed-form risk
            test_confidence, test_correct = _draw(100_000, rng)
            kept = test_confidence >= result.threshold
            test_risks.append((1 - test_correct[kept].mean(), _true_risk(result.threshold)))

    monte_carlo_slack = 3 * np.sqrt(DELTA * (1 - DELTA) / N_TRIALS)  # 3 SD of a Binomial(300, 0.1) rate: 0.052
    n_violations = int(np.sum(np.array(certified_risks) > TARGET_RISK))
    assert n_violations / N_TRIALS <= DELTA + monte_carlo_slack  # the guarantee (refusal counts as safe)
    assert n_violations / len(certified_risks) <= DELTA + monte_carlo_slack  # even among certified trials only
    assert n_refused / N_TRIALS < 0.08
    # The check has teeth: thresholding the empirical risk breaks the promise about half the time.
    assert np.mean(np.array(naive_risks) > TARGET_RISK) > 0.3
    # Non-trivial coverage: the oracle keeps 20%.
    assert 0.1 < np.mean(coverages) < 0.2
    realised, closed_form = np.array(test_risks).T
    np.testing.assert_allclose(realised, closed_form, atol=0.01)


def test_fixed_grid_of_candidates() -> None:
    confidence, correct = _draw(N_CALIBRATION, np.random.default_rng(1))
    grid = np.linspace(0.0, 1.0, 101)
    result = select_risk_threshold(confidence, correct, TARGET_RISK, DELTA, candidate_thresholds=grid)
    assert np.isclose(grid, result.threshold).any()
    assert result.risk_upper_bound <= TARGET_RISK and result.coverage > 0.1


def test_unreachable_target_raises_with_the_data_needed() -> None:
    confidence, correct = _draw(100, np.random.default_rng(3))
    with pytest.raises(UnreachableRiskTarget, match="at least 230 kept answers") as too_small:
        select_risk_threshold(confidence, correct, target_risk=0.01, delta=0.1)
    assert isinstance(too_small.value, ValueError)
    assert too_small.value.kept_samples_needed == 230

    # Correctness independent of confidence, 30% errors: no threshold gets near 5%.
    rng = np.random.default_rng(4)
    confidence = rng.uniform(size=1_000)
    correct = (rng.uniform(size=1_000) < 0.7).astype(int)
    with pytest.raises(UnreachableRiskTarget, match="cannot be certified") as hopeless:
        select_risk_threshold(confidence, correct, target_risk=0.05, delta=0.1)
    assert hopeless.value.best_bound > 0.05


@pytest.mark.parametrize(("target_risk", "delta"), [(0.0, 0.1), (1.0, 0.1), (0.1, 0.0), (0.1, 1.5)])
def test_invalid_target_or_delta(target_risk: float, delta: float) -> None:
    with pytest.raises(ValueError):
        select_risk_threshold([0.5, 0.6], [1, 0], target_risk, delta)
