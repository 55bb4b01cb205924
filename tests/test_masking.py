"""Attention-ranked patch masking: which cells are greyed, how many, and the clear errors."""

import numpy as np
import pytest
from PIL import Image

from vlmrel_core.interventions import masking


# ------------------------------------------------------------------------------------------ patch masking


def test_patch_masking_greys_the_highest_lowest_or_random_30_percent():
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    attention = np.random.default_rng(0).permutation(64).astype(float).reshape(8, 8)
    assert masking.n_masked_patches(64, 0.3) == 19 and masking.n_masked_patches(576, 0.3) == 173 and masking.n_masked_patches(256, 0.3) == 77
    for which, expected in (("high", attention >= 64 - 19), ("low", attention < 19)):
        (masked,), (mask,) = masking.mask_image_patches([white], [attention], (8, 8), 0.3, which)
        assert mask.sum() == 19
        np.testing.assert_array_equal(mask, expected)
        pixels = np.asarray(masked)
        cells = pixels.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4)  # (row, col, y, x, rgb)
        assert (cells[mask] == 128).all() and (cells[~mask] == 255).all()
    # a row-major vector over image tokens is the same map
    _, (vec_mask,) = masking.mask_image_patches([white], [attention.reshape(-1)], (8, 8), 0.3, "high")
    np.testing.assert_array_equal(vec_mask, attention >= 45)
    _, masks_a = masking.mask_image_patches([white, white], None, (8, 8), 0.3, "random", seed=4)
    _, masks_b = masking.mask_image_patches([white, white], None, (8, 8), 0.3, "random", seed=4)
    _, masks_c = masking.mask_image_patches([white, white], None, (8, 8), 0.3, "random", seed=5)
    assert all(m.sum() == 19 for m in masks_a)
    assert all(np.array_equal(a, b) for a, b in zip(masks_a, masks_b))
    assert not all(np.array_equal(a, c) for a, c in zip(masks_a, masks_c))
    assert np.asarray(white).min() == 255  # the input is not modified
    # a size the grid does not divide: cells still tile the whole image
    (full,), _ = masking.mask_image_patches([Image.new("RGB", (70, 50), (0, 0, 0))], None, (8, 8), 1.0, "random")
    assert (np.asarray(full) == 128).all()

    with pytest.raises(ValueError, match="fraction"):
        masking.mask_image_patches([white], [attention], (8, 8), 0.0)
    with pytest.raises(ValueError, match="fraction"):
        masking.mask_image_patches([white], [attention], (8, 8), 1.2)
    with pytest.raises(ValueError, match="expected"):
        masking.mask_image_patches([white], [attention[:4]], (8, 8))
    with pytest.raises(ValueError, match="needs attention"):
        masking.mask_image_patches([white], None, (8, 8), which="high")
    with pytest.raises(ValueError, match="unknown masking"):
        masking.mask_image_patches([white], [attention], (8, 8), which="top")
