"""Attention figures: attention sharpness vs probe score per question (coloured by correctness), and one
question's attention map over its image (with border "sink" patches optionally masked)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go

from vlmrel_core.figures.style import CORRECT, LAYOUT, WRONG


def attention_probe_scatter(
    attention: np.ndarray, probe_score: np.ndarray, correct: np.ndarray, attention_name: str = "spatial entropy H_s",
    title: str = "Attention vs probe", ids: Sequence[int] | None = None,
) -> go.Figure:
    """One point per question: x = an attention signal, y = the probe's score, green correct / red wrong. With
    ``ids`` each point carries its id as ``customdata`` (so a selected point names its question)."""
    x, y = np.asarray(attention, dtype=float), np.asarray(probe_score, dtype=float)
    ok = np.asarray(correct).astype(bool)
    if not (x.shape == y.shape == ok.shape) or x.ndim != 1:
        raise ValueError(f"attention {x.shape}, probe_score {y.shape} and correct {ok.shape} must be equal 1-d shapes")
    point_ids = None if ids is None else np.asarray(ids)
    if point_ids is not None and point_ids.shape != x.shape:
        raise ValueError(f"ids {point_ids.shape} must match the points {x.shape}")
    figure = go.Figure()
    for name, mask, colour in (("correct", ok, CORRECT), ("wrong", ~ok, WRONG)):
        extra = {} if point_ids is None else {"customdata": point_ids[mask].tolist(),
                                              "hovertemplate": "id %{customdata}<br>x %{x:.3f}<br>probe %{y:.3f}"}
        figure.add_trace(go.Scatter(x=x[mask].tolist(), y=y[mask].tolist(), mode="markers",
                                    name=f"{name} (n={int(mask.sum())})", marker={"color": colour, "size": 6, "opacity": 0.6},
                                    **extra))
    figure.update_layout(title=title, xaxis_title=attention_name, yaxis_title="probe score", **LAYOUT)
    return figure


def selected_id(figure: go.Figure, curve_number: int, point_index: int) -> int | None:
    """The id (customdata) of a point a plotly selection reports by trace and index; None without ids."""
    if not 0 <= curve_number < len(figure.data):
        return None
    data = figure.data[curve_number].customdata
    if data is None or not 0 <= point_index < len(data):
        return None
    return int(data[point_index])


def border_mask(grid_shape: tuple[int, int], width: int = 1) -> np.ndarray:
    """True on the outer ``width`` rings of patches: where attention sinks (register-like patches) often sit."""
    h, w = grid_shape
    if width < 1 or 2 * width >= min(h, w):
        raise ValueError(f"border width {width} leaves no interior in a {h}x{w} grid")
    mask = np.ones((h, w), dtype=bool)
    mask[width : h - width, width : w - width] = False
    return mask


def attention_overlay(
    image: Any, grid: np.ndarray, *, mask_border_sinks: bool = False, border_width: int = 1, opacity: float = 0.5,
    title: str = "Answer→image attention",
) -> go.Figure:
    """The image with the attention grid as a semi-transparent heatmap, one cell per patch. With
    ``mask_border_sinks`` the outer patch rings are blanked (and the colour scale re-fitted to the rest), and a note
    on the figure says so."""
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W, 3|4) or (H, W), got {pixels.shape}")
    values = np.asarray(grid, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"attention grid must be 2-d, got shape {values.shape}")
    height, width = pixels.shape[:2]
    gh, gw = values.shape
    note = None
    if mask_border_sinks:
        values = values.copy()
        sink = border_mask((gh, gw), border_width)
        share = float(np.asarray(grid, dtype=float)[sink].sum() / max(np.asarray(grid, dtype=float).sum(), 1e-12))
        values[sink] = np.nan
        note = f"border patches masked ({border_width} ring{'s' if border_width > 1 else ''}; {share:.0%} of the attention)"
    figure = go.Figure(go.Image(z=pixels[..., :3].astype(np.uint8)))
    figure.add_trace(go.Heatmap(z=values.tolist(), x0=width / gw / 2, dx=width / gw, y0=height / gh / 2, dy=height / gh,
                                opacity=opacity, colorscale="Inferno", colorbar={"title": "attention"},
                                hovertemplate="patch (%{x:.0f}, %{y:.0f})<br>attention %{z:.4f}<extra></extra>"))
    if note:
        figure.add_annotation(text=note, xref="paper", yref="paper", x=0, y=-0.08, showarrow=False, xanchor="left")
    figure.update_layout(title=title, **LAYOUT)
    figure.update_xaxes(showticklabels=False, range=[0, width])
    figure.update_yaxes(showticklabels=False, range=[height, 0], scaleanchor="x")
    return figure
