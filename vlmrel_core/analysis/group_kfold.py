"""scikit-learn's `StratifiedGroupKFold(shuffle=True)` fold assignment with its per-group loop vectorised.

Why: every grouped hold-out and every probe's grouped CV starts from this assignment, and scikit-learn computes it
with one `np.std` call per (group, fold) pair: on the adversarial run's 20-fold image hold-out that was 16,000
calls, seconds per split, paid again in every worker process. Here each group's K candidate placements are scored
in one array operation that performs the same floating-point operations in the same order (a standard deviation
over folds, then the mean over classes), and the greedy choice (lowest score; near-ties, by `np.isclose`, to the
fold with fewer rows; first fold on a full tie) is scikit-learn's. The folds are identical
(tests/test_group_kfold.py compares them with scikit-learn's on random problems and on the shipped runs).
"""

from __future__ import annotations

import math

import numpy as np

# np.isclose's defaults, written out so the scalar test below is the same comparison
_RTOL, _ATOL = 1e-05, 1e-08


def stratified_group_kfold_tests(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    """Test-row indices of each fold of ``StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)``.

    Raises scikit-learn's ValueErrors for a K above the group count or above every class's count; the warning
    for a class smaller than K is not repeated (callers silence it).
    """
    y, groups = np.asarray(y), np.asarray(groups)
    if y.ndim != 1 or groups.shape != y.shape:
        raise ValueError(f"y and groups must be 1-D of one length, got {y.shape} and {groups.shape}")
    _, y_inv, y_cnt = np.unique(y, return_inverse=True, return_counts=True)
    if np.all(n_splits > y_cnt):
        raise ValueError("n_splits=%d cannot be greater than the number of members in each class." % n_splits)
    if n_splits > y.size:
        raise ValueError(f"Cannot have number of splits n_splits={n_splits} greater than the number of samples: "
                         f"n_samples={y.size}.")
    _, groups_inv, groups_cnt = np.unique(groups, return_inverse=True, return_counts=True)
    n_groups, n_classes = groups_cnt.size, y_cnt.size
    if n_splits > n_groups:
        raise ValueError(f"Cannot have number of splits n_splits={n_splits} greater than the number of groups: {n_groups}.")
    y_counts_per_group = np.zeros((n_groups, n_classes))
    np.add.at(y_counts_per_group, (groups_inv, y_inv), 1)  # integer counts: the order of the additions is immaterial
    rng = np.random.RandomState(seed)  # sklearn's check_random_state(int)
    perm = np.arange(n_groups)
    rng.shuffle(perm)
    y_counts_per_group = y_counts_per_group[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(perm.size)
    groups_inv = inv_perm[groups_inv]
    sorted_groups_idx = np.argsort(-np.std(y_counts_per_group, axis=1), kind="stable")

    y_counts_per_fold = np.zeros((n_splits, n_classes))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    diagonal = np.arange(n_splits)
    class_totals = y_cnt.reshape(1, 1, -1)
    for group_idx in sorted_groups_idx:
        group_y_counts = y_counts_per_group[group_idx]
        candidates = np.repeat(y_counts_per_fold[None], n_splits, axis=0)  # candidate i: the group put in fold i
        candidates[diagonal, diagonal] += group_y_counts
        fold_evals = np.mean(np.std(candidates / class_totals, axis=1), axis=1).tolist()
        samples_in_folds = y_counts_per_fold.sum(axis=1).tolist()
        best_fold, min_eval, min_samples = 0, math.inf, math.inf
        for i, (fold_eval, samples) in enumerate(zip(fold_evals, samples_in_folds)):
            close = min_eval != math.inf and abs(fold_eval - min_eval) <= _ATOL + _RTOL * abs(min_eval)
            if fold_eval < min_eval or (close and samples < min_samples):
                best_fold, min_eval, min_samples = i, fold_eval, samples
        y_counts_per_fold[best_fold] += group_y_counts
        fold_of_group[group_idx] = best_fold
    row_folds = fold_of_group[groups_inv]
    return [np.flatnonzero(row_folds == i) for i in range(n_splits)]


def stratified_group_kfold(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs, as ``list(StratifiedGroupKFold(...).split(X, y, groups))`` gives them."""
    tests = stratified_group_kfold_tests(y, groups, n_splits, seed)
    indices = np.arange(np.asarray(y).shape[0])
    pairs = []
    for test in tests:
        mask = np.zeros(indices.size, dtype=bool)
        mask[test] = True
        pairs.append((indices[~mask], indices[mask]))
    return pairs
