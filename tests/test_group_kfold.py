"""The vectorised StratifiedGroupKFold must give scikit-learn's folds exactly (every split and CV rests on them)."""

import warnings

import numpy as np
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from vlmrel_core.analysis.group_kfold import stratified_group_kfold, stratified_group_kfold_tests
from vlmrel_core.analysis.splits import group_keys, labels_of
from vlmrel_core.engine.store import RunReader
from vlmrel_core.samples.catalog import sample_catalog


def sklearn_folds(y, groups, k, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))


def assert_same(y, groups, k, seed):
    expected = sklearn_folds(y, groups, k, seed)
    got = stratified_group_kfold(y, groups, k, seed)
    assert len(got) == len(expected)
    for (tr, te), (tr_e, te_e) in zip(got, expected):
        np.testing.assert_array_equal(te, te_e)
        np.testing.assert_array_equal(tr, tr_e)
        assert te.dtype == te_e.dtype


@pytest.mark.parametrize("seed", range(12))
def test_random_problems_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 1500))
    n_groups = int(rng.integers(5, max(6, n // 2)))
    groups = rng.integers(0, n_groups, size=n).astype(str)
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(np.int64)
    if seed % 3 == 0:
        y = rng.integers(0, 3, size=n)  # multiclass, as sklearn allows
    k = int(min(rng.integers(2, 21), np.unique(groups).size))
    assert_same(y, groups, k, seed)


def test_equal_groups_tie_break_like_sklearn():
    groups = np.repeat(np.arange(40), 5).astype(str)  # every group alike: all placements tie
    y = np.tile([1, 1, 0, 1, 0], 40)
    for k in (2, 5, 20):
        assert_same(y, groups, k, 3)


@pytest.mark.parametrize("grouping", ["image", "item"])
def test_shipped_run_splits_match_sklearn(grouping):
    rows = RunReader(sample_catalog().run_dir("late_fusion", "random")).rows
    y, groups = labels_of(rows), group_keys(rows, grouping)
    k = int(min(20, np.unique(groups).size))
    assert_same(y, groups, k, 0)
    assert_same(y[::2], groups[::2], 5, 0)


def test_errors_match_sklearn():
    with pytest.raises(ValueError, match="greater than the number of groups"):
        stratified_group_kfold_tests(np.array([0, 1, 0, 1, 0, 1]), np.array(["a", "a", "a", "b", "b", "b"]), 3, 0)
    with pytest.raises(ValueError, match="number of members in each class"):
        stratified_group_kfold_tests(np.array([0, 1, 0, 1, 0, 1]), np.arange(6).astype(str), 4, 0)
