"""Routing with a guarantee: pick the confidence threshold above which answers are served automatically.

The promise to the user is finite-sample: with probability at least 1 - delta over the draw of the calibration
set, the error rate among answers kept by the returned threshold is at most ``target_risk`` (on data from the same
distribution). A plain "empirical risk <= target" threshold breaks that promise about half the time.

Method (Learn-then-Test with fixed-sequence testing, Angelopoulos et al. 2021):

1. Candidate thresholds are the distinct calibration confidences (or a grid you fix in advance), ordered from most
   conservative (highest) to least.
2. For each candidate, the null hypothesis "risk > target" is tested with the exact one-sided Clopper–Pearson
   upper (1 - delta) bound on the error rate of the kept calibration answers (conditionally on which answers are
   kept, their errors are binomial with the candidate's risk).
3. Walk down the sequence while the bound is <= target and return the last passing candidate (largest coverage).
   Each test uses the full delta; stopping at the first failure is what makes that valid (no Bonferroni).

Where the sequence starts: a candidate that keeps fewer than ``n_min`` answers cannot pass even with zero errors
(its Clopper–Pearson bound is 1 - delta^(1/n_kept) > target), and if the walk began there it would stop at once.
The walk therefore starts at the first candidate keeping at least ``min_kept`` answers. ``min_kept`` must not
depend on the labels; by default it is the smallest count at which an observed error rate of half the target
would pass (never below ``n_min``). Candidates, ordering and starting point all depend on the confidences only,
never on correctness, so the one-delta budget is spent once. (Using data points as candidates is the usual
practice, as in Geifman & El-Yaniv's selection with guaranteed risk; a grid fixed before seeing the data removes
even that approximation.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from vlmrel_core.analysis.metrics import RiskCoverage, risk_coverage_curve

METHOD_NAME = "learn_then_test_fixed_sequence_clopper_pearson"
# Default start of the fixed sequence: enough kept answers that an error rate of this fraction of the target passes.
_START_RISK_FRACTION = 0.5


class UnreachableRiskTarget(ValueError):
    """No threshold can be certified at this target risk and delta with this calibration set."""

    def __init__(self, message: str, best_bound: float, kept_samples_needed: int | None) -> None:
        super().__init__(message)
        self.best_bound = best_bound
        self.kept_samples_needed = kept_samples_needed


@dataclass(frozen=True)
class RiskThreshold:
    """The certified routing rule "answer automatically iff confidence >= threshold" and its evidence."""

    threshold: float
    coverage: float
    n_kept: int
    empirical_risk: float
    risk_upper_bound: float
    target_risk: float
    delta: float
    method: str
    n_calibration: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def clopper_pearson_upper(n_errors: ArrayLike, n_kept: ArrayLike, delta: float) -> np.ndarray:
    """Exact one-sided upper (1 - delta) confidence bound on a binomial error rate (1 where n_errors == n_kept)."""
    errors = np.asarray(n_errors, dtype=float)
    kept = np.asarray(n_kept, dtype=float)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.ppf(1.0 - delta, errors + 1.0, np.maximum(kept - errors, 1e-300))
    return np.where(errors >= kept, 1.0, bound)


def min_kept_for_target(target_risk: float, delta: float) -> int:
    """Fewest kept answers whose Clopper–Pearson bound can reach ``target_risk`` at all (i.e. with zero errors)."""
    n = max(1, math.ceil(math.log(delta) / math.log1p(-target_risk)) - 1)
    while clopper_pearson_upper(0, n, delta) > target_risk:
        n += 1
    return n


def kept_samples_needed(empirical_risk: float, target_risk: float, delta: float) -> int | None:
    """Kept answers needed before an observed error rate ``empirical_risk`` certifies ``target_risk``.

    None when the empirical risk is not below the target: more data cannot help then.
    """
    if empirical_risk >= target_risk:
        return None

    def passes(n: int) -> bool:
        return bool(clopper_pearson_upper(math.ceil(empirical_risk * n - 1e-9), n, delta) <= target_risk)

    low = min_kept_for_target(target_risk, delta)
    if passes(low):
        return low
    high = 2 * low
    while not passes(high):
        low, high = high, 2 * high
        if high > 10**10:
            return None
    while high - low > 1:  # the bound is not exactly monotone in n (rounding of errors); this finds a passing n
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def _default_min_kept(target_risk: float, delta: float) -> int:
    return kept_samples_needed(_START_RISK_FRACTION * target_risk, target_risk, delta) or min_kept_for_target(
        target_risk, delta
    )


def select_risk_threshold(
    confidence: ArrayLike,
    correct: ArrayLike,
    target_risk: float,
    delta: float = 0.1,
    candidate_thresholds: ArrayLike | None = None,
    min_kept: int | None = None,
) -> RiskThreshold:
    """Lowest confidence threshold whose selective risk is certified <= ``target_risk`` with prob. >= 1 - delta.

    ``confidence`` and ``correct`` must be held-out calibration data (not the data the score was trained on).
    ``min_kept`` (see module docstring) sets where the fixed sequence starts; fix it before looking at the labels.
    Falls back to the smallest certifiable count when the calibration set is smaller than the default start.
    Raises ``UnreachableRiskTarget`` when no threshold can be certified.
    """
    if not 0.0 < target_risk < 1.0:
        raise ValueError(f"target_risk must be in (0, 1), got {target_risk}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    curve = risk_coverage_curve(correct, confidence, thresholds=candidate_thresholds)
    n_calibration = int(np.asarray(confidence).shape[0])
    bounds = clopper_pearson_upper(curve.n_errors, curve.n_kept, delta)

    n_min = min_kept_for_target(target_risk, delta)
    if min_kept is None:
        start_kept = _default_min_kept(target_risk, delta)
        if start_kept > n_calibration:
            start_kept = n_min
    else:
        start_kept = max(int(min_kept), 1)
    # n_kept is non-decreasing along the curve, so the tested candidates form a suffix of it.
    tested = np.flatnonzero(curve.n_kept >= start_kept)
    passing = bounds[tested] <= target_risk
    n_leading_passes = int(np.argmin(passing)) if not passing.all() else passing.size

    if n_leading_passes == 0:
        raise _unreachable(curve, bounds, tested, target_risk, delta, n_calibration, n_min, start_kept)
    chosen = tested[n_leading_passes - 1]
    return RiskThreshold(
        threshold=float(curve.thresholds[chosen]),
        coverage=float(curve.coverage[chosen]),
        n_kept=int(curve.n_kept[chosen]),
        empirical_risk=float(curve.risk[chosen]),
        risk_upper_bound=float(bounds[chosen]),
        target_risk=float(target_risk),
        delta=float(delta),
        method=METHOD_NAME,
        n_calibration=n_calibration,
    )


def _unreachable(
    curve: RiskCoverage,
    bounds: np.ndarray,
    tested: np.ndarray,
    target_risk: float,
    delta: float,
    n_calibration: int,
    n_min: int,
    start_kept: int,
) -> UnreachableRiskTarget:
    """Build the error that tells the operator how far off the target is and how much data would fix it."""
    header = (
        f"target risk {target_risk:g} at delta {delta:g} cannot be certified from {n_calibration} calibration samples"
    )
    if tested.size == 0:
        return UnreachableRiskTarget(
            f"{header}: no threshold keeps the {start_kept} answers where the test starts; even with zero errors "
            f"a threshold needs at least {n_min} kept answers to reach a Clopper–Pearson bound of {target_risk:g}",
            best_bound=float(np.nanmin(bounds)),
            kept_samples_needed=n_min,
        )
    best = int(np.argmin(bounds))
    best_risk = float(curve.risk[best])
    best_coverage = float(curve.coverage[best])
    needed = kept_samples_needed(best_risk, target_risk, delta)
    first = tested[0]
    lines = [
        f"{header}.",
        f"The fixed sequence starts at threshold {curve.thresholds[first]:.6g} (n_kept={curve.n_kept[first]}, "
        f"errors={curve.n_errors[first]}, upper bound {bounds[first]:.4f} > {target_risk:g}) and stops there.",
        f"Best upper bound at any threshold: {bounds[best]:.4f} at threshold {curve.thresholds[best]:.6g} "
        f"(coverage {best_coverage:.3f}, n_kept {curve.n_kept[best]}, empirical risk {best_risk:.4f}).",
    ]
    if bounds[best] <= target_risk:
        lines.append(
            f"That threshold keeps fewer answers than the {start_kept} where the sequence starts. To test such "
            f"conservative thresholds, fix a smaller min_kept (>= {n_min}) before looking at the labels of a fresh "
            "calibration set; lowering it after seeing this result would void the guarantee."
        )
    elif needed is None:
        lines.append(
            "Its empirical risk is not below the target, so more calibration data at that threshold will not help: "
            "raise the target risk or improve the score."
        )
    else:
        total = math.ceil(needed / best_coverage) if best_coverage > 0 else None
        lines.append(
            f"At that empirical risk about {needed} kept answers are needed"
            + (f", i.e. roughly {total} labelled calibration samples at that coverage." if total else ".")
        )
    return UnreachableRiskTarget(" ".join(lines), best_bound=float(bounds[best]), kept_samples_needed=needed)
