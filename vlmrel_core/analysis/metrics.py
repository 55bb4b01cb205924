"""Reliability metrics: how well a score separates correct from wrong answers, and how honest it is as a probability.

Everything here is arrays in, numbers out (no torch, no I/O), so the same code scores a probe in a notebook, a
test and the production gate. Point estimates come from scikit-learn / scipy; this module adds what they lack:
input checks with clear messages, bootstrap confidence intervals, reliability bins that expose their counts,
and risk–coverage curves for selective answering.

Convention: ``correct`` is the 0/1 (or bool) label "the model's answer was right"; a good reliability score is
*higher* when the answer is more likely right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
from numpy.typing import ArrayLike

from vlmrel_core.analysis.auroc_kernels import (  # auroc_rows: re-exported (its home before auroc_kernels)
    auroc_rows, index_counts, resampled_auroc_rows, weighted_auroc_gain_rows,
)

BinStrategy = Literal["uniform", "quantile"]

# Cap on (resamples x samples) materialised at once, so a bootstrap on 100k points stays within tens of MB.
_BOOTSTRAP_MAX_CELLS = 2_000_000
# Give up when this many resamples per requested one were degenerate (e.g. 1 positive among 10k).
_BOOTSTRAP_MAX_DRAW_FACTOR = 20


# --------------------------------------------------------------------------------------------------- validation


def as_binary_labels(correct: ArrayLike, name: str = "correct") -> np.ndarray:
    """1-D int array of 0/1; rejects anything else, because a silently thresholded label hides a data bug."""
    labels = np.asarray(correct)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"{name} is empty")
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"{name} must be 0/1 or bool, got dtype {labels.dtype}")
    if np.isnan(labels.astype(float)).any():
        raise ValueError(f"{name} contains NaN")
    if not np.isin(labels, (0, 1)).all():
        bad = np.unique(labels[~np.isin(labels, (0, 1))])[:5]
        raise ValueError(f"{name} must contain only 0/1, found {bad.tolist()}")
    return labels.astype(np.int64)


def as_finite_1d(values: ArrayLike, name: str) -> np.ndarray:
    """1-D float array with no NaN/inf: one NaN score would otherwise poison every rank-based metric."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        n_bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{name} contains {n_bad} NaN/inf value(s)")
    return array


def labels_and_scores(
    correct: ArrayLike, score: ArrayLike, score_name: str = "score"
) -> tuple[np.ndarray, np.ndarray]:
    labels = as_binary_labels(correct)
    scores = as_finite_1d(score, score_name)
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"correct has {labels.shape[0]} entries but {score_name} has {scores.shape[0]}")
    return labels, scores


def require_both_classes(labels: np.ndarray, what: str) -> None:
    n_correct = int(labels.sum())
    if n_correct == 0 or n_correct == labels.size:
        only = "correct" if n_correct else "wrong"
        raise ValueError(
            f"{what} needs both correct and wrong answers, but all {labels.size} are {only}; "
            "collect more varied data or report accuracy alone"
        )


def _as_probabilities(prob: ArrayLike) -> np.ndarray:
    probs = as_finite_1d(prob, "prob")
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(
            f"prob must lie in [0, 1], got range [{probs.min():.4g}, {probs.max():.4g}]; "
            "calibrate raw scores first (vlmrel_core.gate.calibration)"
        )
    return probs


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# --------------------------------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its (1 - alpha) confidence interval, 95% unless stated otherwise."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": float(self.value), "low": float(self.low), "high": float(self.high)}


def bootstrap_replicates(
    n_units: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    n_boot: int,
    seed: int | Sequence[int],
    *,
    cells_per_replicate: int | None = None,
    failure: str = "only {kept} of {drawn} bootstrap resamples were usable (one class or a constant score); "
                   "the minority class is too small for a bootstrap interval",
) -> np.ndarray:
    """``n_boot`` finite bootstrap replicates of a statistic: the one resampling loop of the library.

    ``statistic`` maps a (b, n_units) matrix of unit indices drawn with replacement (rows, or groups for the cluster
    bootstrap) to b values and returns NaN for degenerate resamples (one class only, constant score); those are
    redrawn rather than counted, which is the usual convention and keeps the percentile interval defined (after
    ``20 * n_boot`` draws it gives up with ``failure``). Resamples are drawn in blocks so that at most ~2M cells
    (``cells_per_replicate`` each, default ``n_units``) are materialised at once.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    cells = n_units if cells_per_replicate is None else cells_per_replicate
    block = max(1, min(n_boot, _BOOTSTRAP_MAX_CELLS // max(cells, 1)))
    replicates: list[np.ndarray] = []
    n_kept = 0
    n_drawn = 0
    while n_kept < n_boot:
        if n_drawn >= _BOOTSTRAP_MAX_DRAW_FACTOR * n_boot:
            raise ValueError(failure.format(kept=n_kept, drawn=n_drawn))
        indices = rng.integers(0, n_units, size=(block, n_units))
        values = np.asarray(statistic(indices), dtype=float)
        values = values[np.isfinite(values)]
        replicates.append(values)
        n_kept += values.size
        n_drawn += block
    return np.concatenate(replicates)[:n_boot]


def percentile_interval(replicates: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.quantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _pearson_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Pearson r per row (= point-biserial when one side is 0/1); NaN where either side is constant."""
    labels_centred = labels - labels.mean(axis=1, keepdims=True)
    scores_centred = scores - scores.mean(axis=1, keepdims=True)
    degenerate = (np.ptp(labels, axis=1) == 0) | (np.ptp(scores, axis=1) == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (labels_centred * scores_centred).sum(axis=1) / np.sqrt(
            (labels_centred**2).sum(axis=1) * (scores_centred**2).sum(axis=1)
        )
    return np.where(degenerate, np.nan, np.clip(r, -1.0, 1.0))


# --------------------------------------------------------------------------------------------------- AUROC


def auroc(correct: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve of ``score`` for predicting ``correct`` (0.5 = chance, ties count one half)."""
    from sklearn.metrics import roc_auc_score

    labels, scores = labels_and_scores(correct, score)
    require_both_classes(labels, "AUROC")
    return float(roc_auc_score(labels, scores))


def auroc_ci(
    correct: ArrayLike, score: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> Estimate:
    """AUROC with a percentile-bootstrap (1 - alpha) interval.

    Why bootstrap: the headline comparisons (0.50 vs 0.54 vs 0.72) are only meaningful with their sampling
    error, and the bootstrap needs no normality assumption. Single-class resamples are redrawn.
    """
    from sklearn.metrics import roc_auc_score

    _check_alpha(alpha)
    labels, scores = labels_and_scores(correct, score)
    require_both_classes(labels, "AUROC")
    replicates = bootstrap_replicates(
        labels.size, lambda idx: resampled_auroc_rows(labels, scores, idx), n_boot, seed
    )
    return Estimate(float(roc_auc_score(labels, scores)), *percentile_interval(replicates, alpha))


def auroc_gain_ci(
    correct: ArrayLike,
    score_a: ArrayLike,
    score_b: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Estimate:
    """AUROC(score_a) - AUROC(score_b) with a *paired* percentile-bootstrap interval.

    Both scores are evaluated on the same resampled indices, so the shared difficulty of each question cancels;
    two independent intervals that overlap would wrongly suggest "no difference".
    """
    from sklearn.metrics import roc_auc_score

    _check_alpha(alpha)
    labels, scores_a = labels_and_scores(correct, score_a, "score_a")
    _, scores_b = labels_and_scores(correct, score_b, "score_b")
    require_both_classes(labels, "AUROC")

    def gain_rows(idx: np.ndarray) -> np.ndarray:
        counts = index_counts(idx, labels.size)  # a resample as row multiplicities (bit-identical to ranking it)
        return weighted_auroc_gain_rows(labels, scores_a, scores_b, counts)

    replicates = bootstrap_replicates(labels.size, gain_rows, n_boot, seed)
    gain = float(roc_auc_score(labels, scores_a) - roc_auc_score(labels, scores_b))
    return Estimate(gain, *percentile_interval(replicates, alpha))


# --------------------------------------------------------------------------------------------------- correlation


def point_biserial(
    correct: ArrayLike,
    score: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    ci_method: Literal["bootstrap", "fisher"] = "bootstrap",
) -> Estimate:
    """Point-biserial correlation R_pb between a signal and correctness, with a (1 - alpha) interval.

    The value is ``scipy.stats.pointbiserialr``. The interval is, by default, a percentile bootstrap (resamples
    with one class or a constant score are redrawn), which makes no normality assumption about a score that is
    often skewed or discrete. ``ci_method="fisher"`` gives the Fisher z interval (scipy ``pearsonr``), which is
    what the paper's n = 3,090 interval [-0.034, 0.036] around 0.001 corresponds to; ``n_boot``/``seed`` are
    then unused.
    """
    from scipy import stats

    _check_alpha(alpha)
    labels, scores = labels_and_scores(correct, score)
    require_both_classes(labels, "point-biserial correlation")
    if np.ptp(scores) == 0.0:
        raise ValueError(f"score is constant ({scores[0]!r}); its correlation with correctness is undefined")
    value = float(stats.pointbiserialr(labels, scores).statistic)
    if ci_method == "fisher":
        if labels.size < 4:
            raise ValueError("the Fisher z interval needs at least 4 samples")
        interval = stats.pearsonr(labels.astype(float), scores).confidence_interval(confidence_level=1.0 - alpha)
        return Estimate(value, float(interval.low), float(interval.high))
    if ci_method != "bootstrap":
        raise ValueError(f"ci_method must be 'bootstrap' or 'fisher', got {ci_method!r}")
    labels_float = labels.astype(float)
    replicates = bootstrap_replicates(
        labels.size, lambda idx: _pearson_rows(labels_float[idx], scores[idx]), n_boot, seed
    )
    return Estimate(value, *percentile_interval(replicates, alpha))


# --------------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityBins:
    """A reliability diagram's data.

    ``bin_edges`` has ``n_bins + 1`` entries. ``prob_pred``, ``prob_true``, ``counts`` and ``bin_index`` cover the
    *non-empty* bins only, in increasing order, exactly like ``sklearn.calibration.calibration_curve``;
    ``bin_index`` says which interval of ``bin_edges`` each one is. A sample equal to an inner edge belongs to
    the lower bin (sklearn's convention).
    """

    bin_edges: np.ndarray
    prob_pred: np.ndarray
    prob_true: np.ndarray
    counts: np.ndarray
    bin_index: np.ndarray

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {
            "bin_edges": self.bin_edges.tolist(),
            "prob_pred": self.prob_pred.tolist(),
            "prob_true": self.prob_true.tolist(),
            "counts": self.counts.tolist(),
            "bin_index": self.bin_index.tolist(),
        }


def reliability_bins(
    correct: ArrayLike, prob: ArrayLike, n_bins: int = 10, strategy: BinStrategy = "uniform"
) -> ReliabilityBins:
    """Per-bin mean predicted probability vs accuracy.

    Same binning as ``sklearn.calibration.calibration_curve`` (so plots and ECE agree with it), but also returns
    the counts, which sklearn discards and which ECE and any honest plot need.
    """
    labels = as_binary_labels(correct)
    probs = _as_probabilities(prob)
    if labels.size != probs.size:
        raise ValueError(f"correct has {labels.size} entries but prob has {probs.size}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "uniform":
        bin_edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        bin_edges = np.percentile(probs, np.linspace(0.0, 100.0, n_bins + 1))
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    bin_ids = np.searchsorted(bin_edges[1:-1], probs)
    prob_sums = np.bincount(bin_ids, weights=probs, minlength=n_bins)
    correct_sums = np.bincount(bin_ids, weights=labels, minlength=n_bins)
    totals = np.bincount(bin_ids, minlength=n_bins)
    non_empty = totals > 0
    return ReliabilityBins(
        bin_edges=bin_edges,
        prob_pred=prob_sums[non_empty] / totals[non_empty],
        prob_true=correct_sums[non_empty] / totals[non_empty],
        counts=totals[non_empty],
        bin_index=np.flatnonzero(non_empty),
    )


def expected_calibration_error(
    correct: ArrayLike, prob: ArrayLike, n_bins: int = 15, strategy: BinStrategy = "uniform"
) -> float:
    """ECE: count-weighted mean of |accuracy - mean confidence| over the reliability bins."""
    bins = reliability_bins(correct, prob, n_bins=n_bins, strategy=strategy)
    gaps = np.abs(bins.prob_true - bins.prob_pred)
    return float(np.sum(gaps * bins.counts) / bins.counts.sum())


def max_calibration_error(
    correct: ArrayLike, prob: ArrayLike, n_bins: int = 15, strategy: BinStrategy = "uniform"
) -> float:
    """MCE: the worst bin's |accuracy - mean confidence| (sensitive to tiny bins; read it with the counts)."""
    bins = reliability_bins(correct, prob, n_bins=n_bins, strategy=strategy)
    return float(np.max(np.abs(bins.prob_true - bins.prob_pred)))


def brier_score(correct: ArrayLike, prob: ArrayLike) -> float:
    """Mean squared error of the probability of being correct (sklearn ``brier_score_loss``)."""
    from sklearn.metrics import brier_score_loss

    labels = as_binary_labels(correct)
    probs = _as_probabilities(prob)
    if labels.size != probs.size:
        raise ValueError(f"correct has {labels.size} entries but prob has {probs.size}")
    return float(brier_score_loss(labels, probs, pos_label=1))


# --------------------------------------------------------------------------------------------------- selective answers


@dataclass(frozen=True)
class RiskCoverage:
    """Selective-answering trade-off: answer only when confidence >= threshold.

    Arrays are aligned and ordered by ``thresholds`` descending (coverage ascending). ``risk`` is the error rate
    among the kept answers (NaN where nothing is kept, possible only with user-supplied thresholds).
    """

    thresholds: np.ndarray
    coverage: np.ndarray
    risk: np.ndarray
    n_kept: np.ndarray
    n_errors: np.ndarray

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {
            "thresholds": self.thresholds.tolist(),
            "coverage": self.coverage.tolist(),
            "risk": self.risk.tolist(),
            "n_kept": self.n_kept.tolist(),
            "n_errors": self.n_errors.tolist(),
        }


def risk_coverage_curve(
    correct: ArrayLike, confidence: ArrayLike, thresholds: ArrayLike | None = None
) -> RiskCoverage:
    """Risk and coverage of the rule "keep iff confidence >= t" for every distinct confidence (or given ``t``).

    Tied confidences are kept or dropped together, so the curve does not depend on the order of ties.
    """
    labels, confidences = labels_and_scores(correct, confidence, "confidence")
    if thresholds is None:
        candidate_thresholds = np.unique(confidences)[::-1]
    else:
        candidate_thresholds = np.unique(as_finite_1d(thresholds, "thresholds"))[::-1]
    order = np.argsort(confidences, kind="stable")
    sorted_confidences = confidences[order]
    errors_from_top = np.concatenate(([0], np.cumsum((1 - labels[order])[::-1])))
    n_kept = labels.size - np.searchsorted(sorted_confidences, candidate_thresholds, side="left")
    n_errors = errors_from_top[n_kept]
    with np.errstate(divide="ignore", invalid="ignore"):
        risk = np.where(n_kept > 0, n_errors / n_kept, np.nan)
    return RiskCoverage(
        thresholds=candidate_thresholds,
        coverage=n_kept / labels.size,
        risk=risk,
        n_kept=n_kept,
        n_errors=n_errors,
    )


def area_under_risk_coverage(correct: ArrayLike, confidence: ArrayLike) -> float:
    """AURC: selective risk averaged over coverage (lower is better).

    Computed as a step integral over the curve, i.e. each kept sample contributes the risk at the coverage where
    it enters. Without ties this equals the mean of the risk of the top-k answers over k = 1..n (Geifman &
    El-Yaniv); with ties a tied group shares its group's risk, so the value does not depend on tie order.
    """
    curve = risk_coverage_curve(correct, confidence)
    coverage_steps = np.diff(np.concatenate(([0.0], curve.coverage)))
    return float(np.sum(curve.risk * coverage_steps))
