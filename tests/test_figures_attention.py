"""Attention figures from a shipped run and gate bundle: scatter coloured by correctness, overlay on the image."""

import numpy as np
import pytest
from PIL import Image

from vlmrel_core import results as R
from vlmrel_core.figures.attention import attention_overlay, attention_probe_scatter, border_mask, selected_id
from vlmrel_core.samples.catalog import sample_catalog

SAMPLES = sample_catalog()


def test_attention_vs_probe_scatter_splits_points_by_correctness():
    run = R.load_shipped_run("late_fusion", "random")
    bundle = R.load_gate_bundle(SAMPLES.gate_dir("late_fusion"))
    _, confidence = bundle.run_scores(run)
    entropy = run.spatial_entropy()
    correct = run.correct()
    figure = attention_probe_scatter(entropy, confidence, correct)
    right, wrong = figure.data
    assert len(right.x) == correct.sum() and len(wrong.x) == (~correct).sum()
    np.testing.assert_allclose(right.y, confidence[correct])
    np.testing.assert_allclose(wrong.x, entropy[~correct])
    assert right.name == f"correct (n={correct.sum()})"
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        attention_probe_scatter(entropy[:3], confidence, correct)


def test_scatter_points_carry_ids_and_a_selection_names_its_question():
    x, y = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 0, 1, 0])
    figure = attention_probe_scatter(x, y, correct, ids=[10, 11, 12, 13])
    assert list(figure.data[0].customdata) == [10, 12] and list(figure.data[1].customdata) == [11, 13]
    assert selected_id(figure, 1, 1) == 13 and selected_id(figure, 0, 0) == 10
    assert selected_id(figure, 2, 0) is None and selected_id(attention_probe_scatter(x, y, correct), 0, 0) is None
    with pytest.raises(ValueError, match="ids"):
        attention_probe_scatter(x, y, correct, ids=[1])


def test_attention_overlay_places_the_grid_over_the_image_and_masks_border_sinks():
    run = R.load_shipped_run("late_fusion", "adversarial")
    grid = run.attention_map(0)
    path = run.image_path(0)
    assert path == SAMPLES.pope_dir() / run.rows.iloc[0]["image"]
    image = Image.open(path).convert("RGB")
    figure = attention_overlay(image, grid)
    picture, heat = figure.data
    assert picture.z.shape[:2] == (image.height, image.width)
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), grid)
    assert heat.dx == image.width / grid.shape[1] and heat.x0 == heat.dx / 2
    masked = attention_overlay(image, grid, mask_border_sinks=True)
    z = np.asarray(masked.data[1].z, dtype=float)
    ring = border_mask(grid.shape)
    assert np.isnan(z[ring]).all() and np.allclose(z[~ring], grid[~ring])
    share = grid[ring].sum() / grid.sum()
    assert masked.layout.annotations[0].text.startswith("border patches masked") and f"{share:.0%}" in masked.layout.annotations[0].text
    assert not figure.layout.annotations


def test_border_mask_shape_and_limits():
    mask = border_mask((4, 5))
    assert mask.sum() == 4 * 5 - 2 * 3 and not mask[1:3, 1:4].any()
    with pytest.raises(ValueError, match="leaves no interior"):
        border_mask((4, 4), width=2)
