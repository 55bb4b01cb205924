"""Known-answer tests for the attention-structure signals (H_s, ΔH_s, C_k) defined in paper-notes."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from vlmrel_core.signals.attention import (
    attention_entropy,
    attention_features,
    attention_features_batch,
    cluster_count,
    delta_spatial_entropy,
    image_attention_map,
    infer_grid_shape,
    spatial_entropy,
    top_cells_mask,
)


def one_hot(h: int, w: int, r: int = 0, c: int = 0) -> np.ndarray:
    g = np.zeros((h, w))
    g[r, c] = 1.0
    return g


def blobs(h: int, w: int, corners: list[tuple[int, int]], size: int = 3, hi: float = 10.0) -> np.ndarray:
    """Background of distinct small positive values (no ties) plus size×size high-attention squares."""
    g = 1.0 + 0.01 * np.arange(h * w, dtype=float).reshape(h, w) / (h * w)
    for r, c in corners:
        g[r : r + size, c : c + size] = hi
    return g / g.sum()


# ------------------------------------------------------------------------------------------ map and grid


def test_image_attention_map_normalises_and_lays_out_row_major():
    m = image_attention_map(np.arange(1.0, 7.0), (2, 3))
    assert m.shape == (2, 3)
    assert m.sum() == pytest.approx(1.0, abs=1e-12)
    assert m[0, 2] == pytest.approx(3 / 21)  # third token -> row 0, col 2
    assert m[1, 0] == pytest.approx(4 / 21)  # fourth token -> row 1, col 0
    np.testing.assert_allclose(m, np.arange(1.0, 7.0).reshape(2, 3) / 21)
    np.testing.assert_allclose(image_attention_map(5 * np.arange(1.0, 7.0), (2, 3)), m)  # scale-free


@pytest.mark.parametrize(
    "vec, grid, match",
    [
        (np.ones(5), (2, 3), "5 image tokens.*6 cells"),
        (np.array([0.5, -0.1, 0.3, 0.3]), (2, 2), "negative"),
        (np.array([0.5, np.nan, 0.3, 0.2]), (2, 2), "NaN"),
        (np.array([0.5, np.inf, 0.3, 0.2]), (2, 2), "NaN or infinite"),
        (np.zeros(4), (2, 2), "zero total"),
        (np.ones((2, 2)), (2, 2), "1-D"),
        (np.ones(4), (2, 0), "positive ints"),
        (np.ones(4), (2, 2.5), "positive ints"),
        (np.ones(4), (4,), "positive ints"),
    ],
)
def test_image_attention_map_rejects_bad_input(vec, grid, match):
    with pytest.raises(ValueError, match=match):
        image_attention_map(vec, grid)


def test_infer_grid_shape_square_only():
    assert infer_grid_shape(576) == (24, 24)
    assert infer_grid_shape(256) == (16, 16)
    assert infer_grid_shape(1) == (1, 1)
    with pytest.raises(ValueError, match="pass grid_shape"):
        infer_grid_shape(575)
    with pytest.raises(ValueError, match="positive"):
        infer_grid_shape(0)


# ----------------------------------------------------------------------------------------------- entropy


def test_attention_entropy_known_values():
    assert attention_entropy(np.ones(8)) == pytest.approx(math.log(8), abs=1e-12)
    assert attention_entropy(np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx(math.log(2), abs=1e-12)
    assert attention_entropy(np.array([0.0, 3.0, 0.0])) == 0.0
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert attention_entropy(np.array([7.0, 2.0, 1.0])) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.8018185525433373, abs=1e-12)


def test_spatial_entropy_one_hot_is_zero():
    h_s = spatial_entropy(one_hot(24, 24, 5, 7))
    assert h_s == pytest.approx(0.0, abs=1e-8)
    assert h_s == pytest.approx(-math.log(1 + 1e-9), rel=1e-6)  # the paper's +1e-9, not clamped


@pytest.mark.parametrize("h, w", [(24, 24), (16, 16), (3, 5), (1, 7)])
def test_spatial_entropy_uniform_is_log_n(h, w):
    n = h * w
    h_s = spatial_entropy(np.full((h, w), 1.0 / n))
    assert h_s == pytest.approx(math.log(n), abs=1e-6)
    assert h_s == pytest.approx(-math.log(1.0 / n + 1e-9), abs=1e-12)  # exact formula incl. the 1e-9


def test_spatial_entropy_hand_value_and_layout_independence():
    grid = np.array([[0.5, 0.25], [0.25, 0.0]])
    assert spatial_entropy(grid) == pytest.approx(1.5 * math.log(2), abs=1e-8)
    assert spatial_entropy(4 * grid) == pytest.approx(1.5 * math.log(2), abs=1e-8)  # normalised first
    # H_s is a function of the values only: moving cells around does not change it (C_k does notice).
    assert spatial_entropy(grid[::-1, ::-1]) == pytest.approx(spatial_entropy(grid), abs=1e-15)
    with pytest.raises(ValueError, match="2-D"):
        spatial_entropy(np.ones(4))


def test_delta_spatial_entropy_hand_computed():
    layers = np.stack(
        [
            one_hot(2, 2),  # H_s ~ 0
            np.full((2, 2), 0.25),  # ln 4
            np.array([[0.5, 0.5], [0.0, 0.0]]),  # ln 2
        ]
    )
    d = delta_spatial_entropy(layers)
    assert d.shape == (2,)
    np.testing.assert_allclose(d, [math.log(4), -math.log(2)], atol=1e-7)
    assert delta_spatial_entropy(layers[:1]).shape == (0,)
    with pytest.raises(ValueError, match="n_layers, rows, cols"):
        delta_spatial_entropy(np.ones((4, 4)))


# ---------------------------------------------------------------------------------------------- clusters


def test_cluster_count_one_hot_is_zero_and_tie_policy():
    g = one_hot(24, 24, 3, 3)
    # 575 of 576 cells are 0, so the 90th percentile is 0: zero-mass cells are excluded (documented choice),
    # leaving one cell, fewer than min_samples=3 -> 0 clusters.
    assert np.quantile(g, 0.9) == 0.0
    assert top_cells_mask(g).sum() == 1
    assert cluster_count(g) == 0


def test_cluster_count_two_cells_is_zero():
    g = np.zeros((6, 6))
    g[2, 2] = g[2, 3] = 1.0
    assert cluster_count(g) == 0


def test_cluster_count_uniform_keeps_all_tied_cells():
    # Every cell ties at the threshold and "at or above" keeps them all: one grid-sized cluster.
    g = np.full((5, 5), 1 / 25)
    assert top_cells_mask(g).all()
    assert cluster_count(g) == 1


def test_cluster_count_one_blob():
    g = blobs(8, 8, [(2, 3)])  # 9 of 64 cells (>10%) are high
    mask = top_cells_mask(g)
    assert mask.sum() == 9 and mask[2:5, 3:6].all()
    assert cluster_count(g) == 1


def test_cluster_count_two_separated_blobs():
    g = blobs(10, 10, [(0, 0), (6, 6)])
    assert top_cells_mask(g).sum() == 18
    assert cluster_count(g) == 2


def test_cluster_count_diagonal_contact_merges():
    # eps=1.5 makes diagonal neighbours (distance sqrt 2) connected: corner-touching blobs are one cluster.
    g = blobs(10, 10, [(0, 0), (3, 3)])
    assert cluster_count(g) == 1
    g2 = blobs(10, 10, [(0, 0), (4, 4)])  # one empty cell between them (distance 2 > 1.5)
    assert cluster_count(g2) == 2


def test_cluster_count_isolated_cells_are_noise():
    g = blobs(10, 10, [(0, 0), (6, 6)])
    g[0, 9] = g[9, 0] = g.max()  # two isolated high cells: kept, but DBSCAN noise
    assert top_cells_mask(g).sum() == 20
    assert cluster_count(g) == 2


def test_cluster_count_line_of_three_is_one_cluster():
    # Exactly 3 cells kept; only the middle one is core (3 points within eps incl. itself), ends attach to it.
    g = 1.0 + 0.01 * np.arange(25, dtype=float).reshape(5, 5) / 25
    g[2, 1:4] = 10.0
    assert top_cells_mask(g).sum() == 3
    assert cluster_count(g) == 1
    assert cluster_count(g, min_samples=4) == 0


def test_cluster_count_rejects_bad_parameters():
    g = blobs(8, 8, [(2, 3)])
    with pytest.raises(ValueError, match="top_quantile"):
        cluster_count(g, top_quantile=0.0)
    with pytest.raises(ValueError, match="eps"):
        cluster_count(g, eps=0)
    with pytest.raises(ValueError, match="min_samples"):
        cluster_count(g, min_samples=0)
    with pytest.raises(ValueError, match="zero total"):
        cluster_count(np.zeros((3, 3)))


# ------------------------------------------------------------------------------------------ feature sets


def _three_layers_10x10() -> np.ndarray:
    return np.stack(
        [
            np.full(100, 0.01),  # uniform: H_s = ln 100, C_k = 1
            blobs(10, 10, [(0, 0), (6, 6)]).ravel(),  # C_k = 2
            one_hot(10, 10, 4, 4).ravel(),  # H_s ~ 0, C_k = 0
        ]
    )


def test_attention_features_single_sample():
    attn = _three_layers_10x10()
    f = attention_features(attn, (10, 10))
    assert set(f) == {"entropy", "spatial_entropy", "cluster_count", "delta_spatial_entropy"}
    assert f["entropy"].shape == f["spatial_entropy"].shape == f["cluster_count"].shape == (3,)
    assert f["delta_spatial_entropy"].shape == (2,)
    np.testing.assert_array_equal(f["cluster_count"], [1, 2, 0])
    assert f["spatial_entropy"][0] == pytest.approx(math.log(100), abs=1e-6)
    assert f["spatial_entropy"][2] == pytest.approx(0.0, abs=1e-8)
    assert f["entropy"][2] == 0.0
    np.testing.assert_allclose(f["entropy"], f["spatial_entropy"], atol=1e-6)  # differ only by the 1e-9 term
    np.testing.assert_allclose(f["delta_spatial_entropy"], np.diff(f["spatial_entropy"]), atol=1e-15)
    blob_h = spatial_entropy(blobs(10, 10, [(0, 0), (6, 6)]))
    np.testing.assert_allclose(
        f["delta_spatial_entropy"], [blob_h - math.log(100), -blob_h], atol=1e-6
    )
    inferred = attention_features(attn)  # 100 tokens -> 10x10
    np.testing.assert_array_equal(inferred["cluster_count"], f["cluster_count"])


def test_attention_features_batch_shapes_and_rows():
    a = _three_layers_10x10()
    batch = np.stack([a, a[::-1], 3 * a])
    f = attention_features_batch(batch, (10, 10))
    assert f["entropy"].shape == f["spatial_entropy"].shape == f["cluster_count"].shape == (3, 3)
    assert f["delta_spatial_entropy"].shape == (3, 2)
    assert f["cluster_count"].dtype.kind == "i"
    np.testing.assert_array_equal(f["cluster_count"], [[1, 2, 0], [0, 2, 1], [1, 2, 0]])
    single = attention_features(a[::-1], (10, 10))
    for key in f:
        np.testing.assert_allclose(f[key][1], single[key], atol=1e-12)
    np.testing.assert_allclose(f["spatial_entropy"][2], f["spatial_entropy"][0], atol=1e-12)  # scale-free


def test_attention_features_batch_errors():
    a = _three_layers_10x10()
    with pytest.raises(ValueError, match="100 image tokens but grid_shape"):
        attention_features_batch(a[None], (10, 9))
    with pytest.raises(ValueError, match="n_samples, n_layers, n_image_tokens"):
        attention_features_batch(a, (10, 10))
    bad = np.stack([a, a])
    bad[1, 2] = 0.0
    with pytest.raises(ValueError, match=r"zero total attention mass at index \(1, 2\)"):
        attention_features_batch(bad, (10, 10))
    with pytest.raises(ValueError, match="pass grid_shape"):
        attention_features(np.ones((2, 12)))


def test_signals_package_imports_no_heavy_frameworks():
    code = (
        "import sys, vlmrel_core.signals; "
        "bad = [m for m in ('torch', 'transformers', 'streamlit') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
