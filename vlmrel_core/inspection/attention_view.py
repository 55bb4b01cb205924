"""The answer position's attention over the image as per-layer grids, with attention sinks found and hideable.

Why sinks matter for a picture: a few image tokens often soak up most of the answer position's attention (an
"attention sink"), which paints one bright cell and washes out the rest of the map. A sink is found by mass, not
by position: a cell holding more than ``ratio`` times the uniform share (1 / cells). Hiding sinks sets those cells
to NaN (drawn blank) and renormalises the rest, so the remaining structure is visible; nothing is hidden unless
asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmrel_core.signals.attention import image_attention_map

DEFAULT_SINK_RATIO = 10.0


@dataclass
class AttentionGrids:
    """(n_layers, rows, cols) L1-normalised maps of the answer position's head-averaged attention to image tokens."""

    layers: list[int]
    grids: np.ndarray

    @classmethod
    def from_capture(cls, per_layer: np.ndarray, layers: list[int], grid_shape: tuple[int, int]) -> "AttentionGrids":
        per_layer = np.asarray(per_layer)
        if per_layer.ndim != 2 or per_layer.shape[0] != len(layers):
            raise ValueError(f"expected ({len(layers)}, n_image_tokens) attention, got shape {per_layer.shape}")
        return cls(list(layers), np.stack([image_attention_map(row, grid_shape) for row in per_layer]))

    def grid(self, layer: int) -> np.ndarray:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not captured; captured layers: {self.layers}")
        return self.grids[self.layers.index(layer)]


def sink_mask(grid: np.ndarray, ratio: float = DEFAULT_SINK_RATIO) -> np.ndarray:
    """Cells holding more than ``ratio`` × the uniform share of the map's mass."""
    if ratio <= 1:
        raise ValueError(f"ratio must be > 1 (a multiple of the uniform share), got {ratio}")
    arr = np.asarray(grid, dtype=np.float64)
    total = arr.sum()
    if arr.ndim != 2 or total <= 0:
        raise ValueError(f"expected a 2-D attention grid with positive mass, got shape {arr.shape}")
    return arr / total > ratio / arr.size


def on_border(mask: np.ndarray) -> np.ndarray:
    """Which cells of ``mask`` lie on the image border (first/last row or column)."""
    border = np.zeros(mask.shape, dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    return mask & border


def hide_sinks(grid: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The grid with sink cells set to NaN and the other cells renormalised to sum to 1."""
    arr = np.asarray(grid, dtype=np.float64).copy()
    if mask.shape != arr.shape:
        raise ValueError(f"mask shape {mask.shape} != grid shape {arr.shape}")
    if mask.all():
        raise ValueError("every cell is a sink; nothing would be left to show")
    arr[mask] = np.nan
    return arr / np.nansum(arr)


@dataclass(frozen=True)
class SinkSummary:
    """How many cells are sinks, the share of the map they hold, and how many lie on the image border."""

    n_cells: int
    n_sinks: int
    share: float
    n_on_border: int

    def sentence(self) -> str:
        if self.n_sinks == 0:
            return f"no attention sink (no cell holds more than {DEFAULT_SINK_RATIO:g}× the uniform share)"
        return (f"{self.n_sinks} of {self.n_cells} cells are attention sinks holding {self.share:.0%} of the image "
                f"attention ({self.n_on_border} on the image border)")


def sink_summary(grid: np.ndarray, ratio: float = DEFAULT_SINK_RATIO) -> SinkSummary:
    mask = sink_mask(grid, ratio)
    arr = np.asarray(grid, dtype=np.float64)
    return SinkSummary(int(arr.size), int(mask.sum()), float(arr[mask].sum() / arr.sum()), int(on_border(mask).sum()))
