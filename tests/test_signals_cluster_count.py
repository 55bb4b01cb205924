"""C_k by component labelling must equal sklearn's DBSCAN on the same cells (the shipped numbers depend on it)."""

import numpy as np
import pytest
from sklearn.cluster import DBSCAN

from vlmrel_core.signals.attention import cluster_count, top_cells_mask


def dbscan_count(grid: np.ndarray, top_quantile: float, eps: float, min_samples: int) -> int:
    coords = np.argwhere(top_cells_mask(grid, top_quantile))
    if coords.shape[0] < min_samples:
        return 0
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(coords).labels_
    return int(np.unique(labels[labels >= 0]).size)


@pytest.mark.parametrize("eps", [1.2, 1.5, 1.9])
def test_cluster_count_equals_dbscan_on_random_maps(eps):
    rng = np.random.default_rng(int(eps * 10))
    for trial in range(150):
        h, w = int(rng.integers(2, 12)), int(rng.integers(2, 12))
        grid = rng.random((h, w)) ** int(rng.integers(1, 6))
        if trial % 3 == 0:
            grid = np.round(grid, 1)  # ties at the quantile keep more cells: bigger, touching clusters
        quantile = float(rng.choice([0.5, 0.7, 0.9]))
        min_samples = int(rng.integers(1, 6))
        assert cluster_count(grid, quantile, eps, min_samples) == dbscan_count(grid, quantile, eps, min_samples), (
            trial, grid.shape, quantile, min_samples)


def test_border_cells_do_not_join_two_clusters():
    mask = np.zeros((5, 9))
    mask[1:4, 0:3] = 1.0  # a 3x3 block: all core
    mask[1:4, 6:9] = 1.0  # another
    mask[2, 3:6] = 1.0  # a 1-cell-wide bridge: its middle cell has 3 neighbours with itself (core at min_samples 3)
    grid = mask + 1e-3  # every kept cell above the 0.5 quantile, the rest below
    for min_samples in (3, 4, 5):
        assert cluster_count(grid, 0.6, 1.5, min_samples) == dbscan_count(grid, 0.6, 1.5, min_samples)
    assert cluster_count(grid, 0.6, 1.5, 4) == 2  # at 4 the bridge's middle is a border cell: two clusters
    assert cluster_count(grid, 0.6, 1.5, 3) == 1


def test_eps_outside_the_grid_shortcut_still_runs_dbscan():
    grid = np.random.default_rng(0).random((6, 6))
    for eps in (1.0, 2 ** 0.5, 2.5):
        assert cluster_count(grid, 0.5, eps, 2) == dbscan_count(grid, 0.5, eps, 2)
