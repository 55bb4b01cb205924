"""AUROC intervals that resample whole groups (images or asked objects) instead of single rows.

Why: questions about the same image or the same item are not independent, and a tiny model's errors are largely
per item. A row bootstrap (`metrics.auroc_ci`) then treats 10 held-out items asked 100 times each as 1,000
independent draws and gives an interval far too narrow for a claim about *held-out items*. Resampling the groups
(the cluster bootstrap) keeps that dependence. The point estimate is the ordinary AUROC; only the interval differs.

Implementation: a resample is a vector of group multiplicities, so each replicate is a *weighted* AUROC (a
Mann–Whitney count with weights, ties one half), vectorised over replicates. With all weights 1 it equals
`sklearn.metrics.roc_auc_score`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

from vlmrel_core.analysis.auroc_kernels import index_counts, weighted_auroc_gain_rows, weighted_auroc_rows
from vlmrel_core.analysis.metrics import (
    Estimate, bootstrap_replicates, labels_and_scores, percentile_interval, require_both_classes,
)


def _group_index(groups: ArrayLike, n: int) -> tuple[np.ndarray, int]:
    keys = np.asarray(groups)
    if keys.ndim != 1 or keys.shape[0] != n:
        raise ValueError(f"groups must be 1-D with one key per row ({n}), got shape {keys.shape}")
    _, index = np.unique(keys, return_inverse=True)
    n_groups = int(index.max()) + 1
    if n_groups < 2:
        raise ValueError("a group bootstrap needs at least 2 groups")
    return index, n_groups


def _group_bootstrap(
    group_index: np.ndarray, n_groups: int, statistic: Callable[[np.ndarray], np.ndarray], n_boot: int, seed: int
) -> np.ndarray:
    """``n_boot`` finite replicates of ``statistic(weights (b, n))``, a resample being a draw of whole groups whose
    multiplicities weight the rows; degenerate resamples are redrawn (`metrics.bootstrap_replicates`)."""
    n_rows = group_index.size

    def on_weights(drawn: np.ndarray) -> np.ndarray:
        return statistic(index_counts(drawn, n_groups)[:, group_index])

    return bootstrap_replicates(n_groups, on_weights, n_boot, seed, cells_per_replicate=n_rows,
                                failure="only {kept} of {drawn} group resamples had both classes; too few groups")


def grouped_auroc_ci(
    correct: ArrayLike, score: ArrayLike, groups: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> Estimate:
    """AUROC with a percentile interval from resampling whole groups."""
    labels, scores = labels_and_scores(correct, score)
    require_both_classes(labels, "AUROC")
    index, n_groups = _group_index(groups, labels.size)
    replicates = _group_bootstrap(index, n_groups, lambda w: weighted_auroc_rows(labels, scores, w), n_boot, seed)
    return Estimate(float(roc_auc_score(labels, scores)), *percentile_interval(replicates, alpha))


def grouped_auroc_gain_ci(
    correct: ArrayLike,
    score_a: ArrayLike,
    score_b: ArrayLike,
    groups: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Estimate:
    """AUROC(a) − AUROC(b), paired (same resampled groups for both), resampling whole groups."""
    labels, scores_a = labels_and_scores(correct, score_a, "score_a")
    _, scores_b = labels_and_scores(correct, score_b, "score_b")
    require_both_classes(labels, "AUROC")
    index, n_groups = _group_index(groups, labels.size)

    replicates = _group_bootstrap(index, n_groups, lambda w: weighted_auroc_gain_rows(labels, scores_a, scores_b, w),
                                  n_boot, seed)
    value = float(roc_auc_score(labels, scores_a) - roc_auc_score(labels, scores_b))
    return Estimate(value, *percentile_interval(replicates, alpha))
