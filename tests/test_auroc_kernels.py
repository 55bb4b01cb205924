"""The resample-as-weights AUROC must equal ranking every resample, bit for bit (the report's numbers rest on it)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vlmrel_core.analysis.auroc_kernels import auroc_rows, index_counts, resampled_auroc_rows, weighted_auroc_rows


@pytest.mark.parametrize("seed", range(6))
def test_resampled_auroc_rows_is_bit_identical_to_ranking_each_resample(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 900))
    labels = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(np.int64)
    scores = rng.normal(size=n)
    if seed % 2:  # heavy ties, as in discrete signals (cluster counts, rounded probabilities)
        scores = np.round(scores, 1)
    indices = rng.integers(0, n, size=(300, n))
    expected = auroc_rows(labels[indices], scores[indices])
    got = resampled_auroc_rows(labels, scores, indices)
    assert np.array_equal(np.isnan(expected), np.isnan(got))
    assert np.array_equal(expected[~np.isnan(expected)], got[~np.isnan(got)])  # exact, not approx


def test_single_class_resamples_are_nan_in_both_forms():
    labels = np.array([1, 0, 0, 0])
    scores = np.array([0.3, 0.1, 0.2, 0.4])
    indices = np.array([[1, 2, 3, 3], [0, 1, 2, 3]])
    assert np.isnan(resampled_auroc_rows(labels, scores, indices)[0])
    assert resampled_auroc_rows(labels, scores, indices)[1] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_index_counts_are_multiplicities():
    counts = index_counts(np.array([[0, 0, 2], [1, 2, 2]]), 4)
    np.testing.assert_array_equal(counts, [[2, 0, 1, 0], [0, 1, 2, 0]])
    assert weighted_auroc_rows(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.5]), counts).shape == (2,)
