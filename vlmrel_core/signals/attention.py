"""Attention-structure signals: where on the image the answer position looks, and how spread out that is.

Why these exist: the paper tests whether the *shape* of the answer token's attention over image patches
predicts correctness (it does not: R_pb(C_k) ~ 0.001, R_pb(H_s) ~ -0.012). To reproduce that negative
result honestly the signals must match the definitions in paper-notes exactly, so every formula here is the
paper's, with its edge cases (ties at the quantile, zero-mass cells) made explicit instead of accidental.

Everything is a pure function of numpy arrays (no torch, no I/O) so it can be tested in milliseconds and
reused on attention captured by any adapter. Inputs are expected to be already averaged over heads; the
adapter is responsible for capturing during the prefill only and for locating the image-token span.

Note for readers of the results: H_s as defined is the Shannon entropy of the cell values and does not
depend on where the cells are on the grid (any permutation of cells gives the same H_s). Only C_k uses the
layout. H_s and `attention_entropy` therefore differ only by the 1e-9 smoothing term.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.special import entr

__all__ = [
    "SPATIAL_ENTROPY_EPS",
    "image_attention_map",
    "infer_grid_shape",
    "attention_entropy",
    "spatial_entropy",
    "top_cells_mask",
    "cluster_count",
    "delta_spatial_entropy",
    "attention_features",
    "attention_features_batch",
]

#: Smoothing constant inside the log of H_s, exactly as in the paper's definition.
SPATIAL_ENTROPY_EPS: float = 1e-9


# --------------------------------------------------------------------------------------------- validation


def _check_grid_shape(grid_shape: Sequence[int]) -> tuple[int, int]:
    """Return grid_shape as a tuple of two positive ints, or raise a ValueError that says what is wrong."""
    try:
        h, w = (int(v) for v in grid_shape)
    except (TypeError, ValueError):
        raise ValueError(f"grid_shape must be a pair of positive ints (rows, cols), got {grid_shape!r}") from None
    if h <= 0 or w <= 0 or (h, w) != tuple(grid_shape):
        raise ValueError(f"grid_shape must be a pair of positive ints (rows, cols), got {grid_shape!r}")
    return h, w


def _normalise_last_axis(x: np.ndarray, what: str) -> np.ndarray:
    """L1-normalise along the last axis after checking the values are attention-like.

    Why strict: attention weights come out of a softmax, so a negative or NaN value or an all-zero row means
    the capture went wrong (wrong span, wrong dtype cast, masked tokens). Silently repairing it would produce
    a plausible-looking entropy from garbage.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    if np.any(arr < 0):
        raise ValueError(f"{what} contains negative values (min {arr.min():.3g}); attention weights must be >= 0")
    mass = arr.sum(axis=-1, keepdims=True)
    if np.any(mass <= 0):
        where = ""
        if arr.ndim > 1:
            first_bad = np.argwhere(mass[..., 0] <= 0)[0]
            where = f" at index {tuple(int(i) for i in first_bad)}"
        raise ValueError(f"{what} has zero total attention mass{where}; cannot normalise")
    return arr / mass


def _check_attention_grid(grid: np.ndarray) -> np.ndarray:
    """Validate a 2-D attention grid and return it L1-normalised (idempotent for maps that already sum to 1)."""
    arr = np.asarray(grid, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D attention grid (rows, cols), got shape {arr.shape}")
    return _normalise_last_axis(arr.reshape(-1), "attention grid").reshape(arr.shape)


# ------------------------------------------------------------------------------------------------ the map


def image_attention_map(attn_to_image: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """Turn the answer position's head-averaged attention to the image tokens into the paper's map M.

    The vector is L1-normalised (so maps from different layers/models are comparable distributions and the
    attention sink on text tokens does not matter) and laid out row-major on the patch grid, which is the
    order vision encoders emit patches in.

    Raises ValueError if the vector is not 1-D, its length is not rows*cols, or it has negative/NaN values
    or zero total mass.
    """
    h, w = _check_grid_shape(grid_shape)
    arr = np.asarray(attn_to_image, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"attn_to_image must be a 1-D vector over image tokens, got shape {arr.shape}")
    if arr.shape[0] != h * w:
        raise ValueError(
            f"attn_to_image has {arr.shape[0]} image tokens but grid_shape {(h, w)} has {h * w} cells; "
            "check the image-token span and the grid (e.g. Qwen2-VL's image_grid_thw after spatial merge)"
        )
    return _normalise_last_axis(arr, "attn_to_image").reshape(h, w)


def infer_grid_shape(n_image_tokens: int) -> tuple[int, int]:
    """Square patch grid for `n_image_tokens` (576 -> (24, 24)), for fixed-resolution models only.

    Why only square: LLaVA-1.5 and PaliGemma use square grids, but dynamic-resolution models (Qwen2-VL) do
    not, and guessing a factorisation would silently scramble the layout. Those callers must pass the grid.
    """
    if isinstance(n_image_tokens, bool) or not isinstance(n_image_tokens, (int, np.integer)):
        raise ValueError(f"n_image_tokens must be an int, got {n_image_tokens!r}")
    n = int(n_image_tokens)
    if n <= 0:
        raise ValueError(f"n_image_tokens must be positive, got {n}")
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"{n} image tokens do not form a square grid; pass grid_shape explicitly "
            "(for Qwen2-VL derive it from image_grid_thw and the spatial merge size)"
        )
    return side, side


# ------------------------------------------------------------------------------------------------ entropy


def attention_entropy(attn: np.ndarray) -> float:
    """Shannon entropy (nats) of the L1-normalised attention, with 0*log(0) = 0.

    Accepts a vector or a grid (it is flattened): the value depends only on the distribution, not the layout.
    Ranges from 0 (all mass on one token) to log(n_tokens) (uniform).
    """
    p = _normalise_last_axis(np.asarray(attn, dtype=np.float64).reshape(-1), "attention")
    return float(entr(p).sum())


def spatial_entropy(grid: np.ndarray) -> float:
    """H_s = -sum M_ij log(M_ij + 1e-9) in nats, exactly the paper's formula.

    The grid is L1-normalised first (a no-op for the output of `image_attention_map`), so that a caller who
    passes raw head-averaged weights still gets the paper's quantity. Because of the 1e-9 term a one-hot map
    gives -1e-9 rather than 0 and a uniform map gives log(N) - ~N*1e-9; this is kept rather than clamped so
    numbers match the paper's code.
    """
    m = _check_attention_grid(grid)
    return float(_spatial_entropy_normalised(m.reshape(-1)))


def _spatial_entropy_normalised(m: np.ndarray) -> np.ndarray | float:
    """H_s along the last axis of already-normalised maps (vectorised core shared by all callers)."""
    return -np.sum(m * np.log(m + SPATIAL_ENTROPY_EPS), axis=-1)


def delta_spatial_entropy(per_layer_grids: np.ndarray) -> np.ndarray:
    """Layer-to-layer change of H_s: out[l-1] = H_s(l) - H_s(l-1), length n_layers - 1.

    Why: the paper asks whether attention *sharpens* (negative ΔH_s) as depth increases in correct answers;
    the difference removes per-image offsets in overall spread. Input shape (n_layers, rows, cols).
    """
    grids = np.asarray(per_layer_grids, dtype=np.float64)
    if grids.ndim != 3:
        raise ValueError(f"per_layer_grids must have shape (n_layers, rows, cols), got {grids.shape}")
    if grids.shape[0] == 0:
        raise ValueError("per_layer_grids has no layers")
    flat = _normalise_last_axis(grids.reshape(grids.shape[0], -1), "per_layer_grids")
    return np.diff(_spatial_entropy_normalised(flat))


# ----------------------------------------------------------------------------------------------- clusters


def top_cells_mask(grid: np.ndarray, top_quantile: float = 0.9) -> np.ndarray:
    """Boolean mask of the 'high-attention' cells used by C_k: M >= quantile(M, top_quantile) and M > 0.

    Tie policy (documented choice): every cell tied *at* the threshold is kept, as the paper's "at or above
    the 90th percentile" says, so more than 10% of cells can be kept when values tie (a uniform map keeps all
    cells). Cells with zero attention are never kept: when >= 90% of cells are exactly 0 the percentile itself
    is 0 and "at or above" would otherwise select the whole empty background (a one-hot map would become one
    grid-sized cluster). Real softmax attention is never exactly 0, so this only affects sparse/synthetic maps.
    The quantile uses numpy's default linear interpolation (same as np.percentile(M, 90)).
    """
    if not 0.0 < float(top_quantile) <= 1.0:
        raise ValueError(f"top_quantile must be in (0, 1], got {top_quantile}")
    m = _check_attention_grid(grid)
    threshold = np.quantile(m, top_quantile)
    return (m >= threshold) & (m > 0)


@functools.lru_cache(maxsize=8)  # C_k runs per (sample, layer): build the element once per eps
def _grid_neighbourhood(eps: float) -> np.ndarray | None:
    """The 3×3 structuring element of "within ``eps``" on an integer grid, or None outside (1, 2) or at eps = √2.

    Only then is the neighbour set unambiguous (no cell offset lies exactly on the radius): 1 < eps < √2 is the
    4-neighbourhood, √2 < eps < 2 the 8-neighbourhood (the default eps = 1.5).
    """
    squared = float(eps) * float(eps)
    if not (1.0 < squared < 2.0 or 2.0 < squared < 4.0):
        return None
    structure = ndimage.generate_binary_structure(2, 1 if squared < 2.0 else 2)
    structure.setflags(write=False)  # shared by every call (cached)
    return structure


def cluster_count(grid: np.ndarray, top_quantile: float = 0.9, eps: float = 1.5, min_samples: int = 3) -> int:
    """C_k: number of DBSCAN clusters among the high-attention cells (noise excluded).

    Cells come from `top_cells_mask` (see its tie policy); DBSCAN (sklearn, Euclidean) runs on their integer
    (row, col) coordinates. With eps=1.5 two cells are neighbours iff they touch, including diagonally, and
    min_samples counts the cell itself, as in sklearn. Returns 0 when fewer than `min_samples` cells are kept
    (DBSCAN could not form a cluster anyway; the paper states this case explicitly).

    On the grid DBSCAN's clusters are exactly the connected components of its core cells (cells with at least
    ``min_samples`` kept cells in their neighbourhood, themselves included): border cells join a cluster but never
    link two. So for 1 < eps < 2 the count is a neighbour sum and a component labelling (`scipy.ndimage`), the
    same integer as sklearn's DBSCAN (tests/test_signals_cluster_count.py) at ~1/100 of its cost; other eps run
    DBSCAN itself.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if isinstance(min_samples, bool) or int(min_samples) != min_samples or min_samples < 1:
        raise ValueError(f"min_samples must be a positive int, got {min_samples}")
    mask = top_cells_mask(grid, top_quantile)
    if int(mask.sum()) < min_samples:
        return 0
    structure = _grid_neighbourhood(eps)
    if structure is None:
        from sklearn.cluster import DBSCAN  # only for eps outside (1, 2): kept off the import path of every run

        labels = DBSCAN(eps=eps, min_samples=int(min_samples)).fit(np.argwhere(mask)).labels_
        return int(np.unique(labels[labels >= 0]).size)
    kept = mask.astype(np.int64)
    neighbours = ndimage.correlate(kept, structure.astype(np.int64), mode="constant", cval=0)
    core = mask & (neighbours >= int(min_samples))
    return int(ndimage.label(core, structure=structure)[1])


# ------------------------------------------------------------------------------------------ feature sets


def attention_features(
    per_layer_attn: np.ndarray, grid_shape: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """All attention signals for one sample, per layer.

    per_layer_attn: (n_layers, n_image_tokens) head-averaged attention of the answer position to the image
    tokens. grid_shape: the patch grid; None infers a square grid (fixed-resolution models only).

    Returns {"entropy": (L,), "spatial_entropy": (L,), "cluster_count": (L,) int, "delta_spatial_entropy":
    (L-1,)}. Keys/shapes are the same as one row of `attention_features_batch`.
    """
    arr = np.asarray(per_layer_attn, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"per_layer_attn must have shape (n_layers, n_image_tokens), got {arr.shape}")
    batched = attention_features_batch(arr[None], grid_shape)
    return {key: value[0] for key, value in batched.items()}


def attention_features_batch(
    attn: np.ndarray, grid_shape: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """All attention signals for many samples: attn (n, n_layers, n_image_tokens) -> arrays (n, n_layers).

    Entropies are vectorised; C_k runs one small DBSCAN per (sample, layer), ~1 ms each, so ~100k maps take
    a minute or two. "delta_spatial_entropy" has shape (n, n_layers - 1).
    """
    arr = np.asarray(attn, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"attn must have shape (n_samples, n_layers, n_image_tokens), got {arr.shape}")
    n, n_layers, n_tokens = arr.shape
    if n_layers == 0 or n_tokens == 0:
        raise ValueError(f"attn has an empty layer or token axis: shape {arr.shape}")
    h, w = infer_grid_shape(n_tokens) if grid_shape is None else _check_grid_shape(grid_shape)
    if h * w != n_tokens:
        raise ValueError(f"attn has {n_tokens} image tokens but grid_shape {(h, w)} has {h * w} cells")

    maps = _normalise_last_axis(arr, "attn")  # (n, L, N), each row sums to 1
    entropy = entr(maps).sum(axis=-1)
    h_s = _spatial_entropy_normalised(maps)
    grids = maps.reshape(n, n_layers, h, w)
    c_k = np.array(
        [[cluster_count(grids[i, l]) for l in range(n_layers)] for i in range(n)], dtype=np.int64
    ).reshape(n, n_layers)
    return {
        "entropy": entropy,
        "spatial_entropy": h_s,
        "cluster_count": c_k,
        "delta_spatial_entropy": np.diff(h_s, axis=-1),
    }
