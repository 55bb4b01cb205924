"""Attention-ranked image-patch masking: grey the patches the answer attended to most (or least, or at random).

Why on the image and not on the tokens: greying the pixels under a patch is a change any model can be given, so late
and early fusion are compared on the same intervention; the attention that ranks the patches is the answer
position's map, L1-normalised per layer and averaged over layers (the paper's pooled map).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

MaskWhich = Literal["high", "low", "random"]
MASK_WHICH: tuple[str, ...] = ("high", "low", "random")
#: Neutral grey used to blank a patch (the SigLIP mean; CLIP's mean is within 25 levels of it).
GREY: tuple[int, int, int] = (128, 128, 128)


def n_masked_patches(n_cells: int, fraction: float) -> int:
    """round(fraction * n_cells), half up, at least 1: 30% of 576 -> 173, of 256 -> 77, of 64 -> 19."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(n_cells, max(1, int(math.floor(fraction * n_cells + 0.5))))


def _grid_for(grid: Any, i: int, n: int) -> tuple[int, int]:
    if isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(v, (int, np.integer)) for v in grid):
        g = grid
    else:
        grids = list(grid)
        if len(grids) != n:
            raise ValueError(f"{len(grids)} grids for {n} images")
        g = grids[i]
    rows, cols = (int(v) for v in g)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid must be a pair of positive ints (rows, cols), got {g!r}")
    return rows, cols


def cell_edges(height: int, width: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel edges of a (rows, cols) grid laid over a height x width image: ys (rows + 1,), xs (cols + 1,)."""
    ys = np.floor(np.arange(rows + 1) * height / rows + 0.5).astype(int)
    xs = np.floor(np.arange(cols + 1) * width / cols + 0.5).astype(int)
    return ys, xs


def patch_masks(
    n_images: int,
    attention_maps: Sequence[np.ndarray] | None,
    grid: tuple[int, int] | Sequence[tuple[int, int]],
    fraction: float = 0.3,
    which: MaskWhich = "high",
    seed: int = 0,
) -> list[np.ndarray]:
    """Which cells `mask_image_patches` greys, per image a boolean (rows, cols) mask, without touching pixels (the
    live masking pass greys the processed pixel tensor instead). Same rules and random draws as there."""
    if which not in MASK_WHICH:
        raise ValueError(f"unknown masking {which!r}; expected one of {MASK_WHICH}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if which != "random":
        if attention_maps is None:
            raise ValueError(f"which={which!r} needs attention maps")
        attention_maps = list(attention_maps)
        if len(attention_maps) != n_images:
            raise ValueError(f"{len(attention_maps)} attention maps for {n_images} images")
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(n_images):
        rows, cols = _grid_for(grid, i, n_images)
        n_cells = rows * cols
        n_mask = n_masked_patches(n_cells, fraction)
        if which == "random":
            chosen = rng.choice(n_cells, size=n_mask, replace=False)
        else:
            attn = np.asarray(attention_maps[i], dtype=np.float64)
            if attn.size != n_cells or (attn.ndim == 2 and attn.shape != (rows, cols)) or attn.ndim > 2:
                raise ValueError(f"attention map {i} has shape {attn.shape}; expected ({rows}, {cols}) or ({n_cells},)")
            if not np.isfinite(attn).all():
                raise ValueError(f"attention map {i} contains NaN or infinite values")
            flat = attn.reshape(-1)
            order = np.argsort(-flat if which == "high" else flat, kind="stable")
            chosen = order[:n_mask]
        mask = np.zeros(n_cells, dtype=bool)
        mask[chosen] = True
        masks.append(mask.reshape(rows, cols))
    return masks


def mask_image_patches(
    images: Sequence[Image.Image],
    attention_maps: Sequence[np.ndarray] | None,
    grid: tuple[int, int] | Sequence[tuple[int, int]],
    fraction: float = 0.3,
    which: MaskWhich = "high",
    seed: int = 0,
    fill: tuple[int, int, int] = GREY,
) -> tuple[list[Image.Image], list[np.ndarray]]:
    """Grey out the image-space squares of the patch grid with the highest / lowest / random ``fraction`` of the
    answer position's attention; returns (masked copies, boolean (rows, cols) masks).

    ``attention_maps``: per image a (rows, cols) grid or a row-major vector over the image tokens (not needed for
    ``which="random"``). ``grid``: one (rows, cols) for all images or one per image. The grid is laid over the whole
    image, which is exact for processors that resize to a square (the embedded models, PaliGemma) and for square
    images under LLaVA's resize + centre crop. Ties are broken by lower cell index; random draws use one
    generator seeded with ``seed`` over the images in order.
    """
    images = list(images)
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL images, got {type(image).__name__} at index {i}")
    masks = patch_masks(len(images), attention_maps, grid, fraction, which, seed)
    return [grey_cells(image, mask, fill) for image, mask in zip(images, masks)], masks


def grey_cells(image: Image.Image, mask: np.ndarray, fill: tuple[int, int, int] = GREY) -> Image.Image:
    """A copy of ``image`` with the cells of the boolean (rows, cols) ``mask`` filled, the grid over the whole image."""
    pixels = np.array(image.convert("RGB"))
    ys, xs = cell_edges(pixels.shape[0], pixels.shape[1], *mask.shape)
    for r, c in zip(*np.nonzero(mask)):
        pixels[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = fill
    return Image.fromarray(pixels)


def attention_grids(attentions: Sequence[np.ndarray], grids: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Per sample: the answer position's attention over image tokens, L1-normalised per layer, averaged over the
    captured layers (the paper's pooled map), laid out row-major on the patch grid."""
    out = []
    for i, (attn, grid) in enumerate(zip(attentions, grids)):
        if grid is None:
            raise ValueError(f"sample {i}: the model's image tokens form no single patch grid (tiled images), "
                             "so patches cannot be masked by attention")
        rows, cols = grid
        attn = np.asarray(attn, dtype=np.float64)
        if attn.ndim == 1:
            attn = attn[None]
        if attn.shape[1] != rows * cols:
            raise ValueError(f"{attn.shape[1]} image tokens do not fill a {rows}x{cols} grid")
        mass = attn.sum(axis=1, keepdims=True)
        if (mass <= 0).any():
            raise ValueError("an attention row over image tokens has zero mass")
        out.append((attn / mass).mean(axis=0).reshape(rows, cols))
    return out
