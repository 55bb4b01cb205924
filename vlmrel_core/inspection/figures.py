"""Plotly figures of one inspected answer: confidence gauge, per-layer probe strip, attention overlay.

Figures only: they draw numbers the library computed (`explain.Inspection`), never compute new ones.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image


def confidence_gauge(confidence: float, threshold: float | None, gray_zone: Sequence[float] | None) -> go.Figure:
    """Calibrated P(correct) on a 0..1 dial; the gate's threshold as a line and the gray zone as a band."""
    steps = [{"range": list(gray_zone), "color": "#f3e3b5"}] if gray_zone else []
    gauge: dict = {"axis": {"range": [0, 1]}, "steps": steps, "bar": {"color": "#2c6fbb"}}
    if threshold is not None:
        gauge["threshold"] = {"line": {"color": "black", "width": 3}, "thickness": 0.9, "value": threshold}
    figure = go.Figure(go.Indicator(mode="gauge+number", value=confidence, number={"valueformat": ".3f"},
                                    gauge=gauge, title={"text": "calibrated P(correct)"}))
    figure.update_layout(height=250, margin={"t": 50, "b": 10, "l": 25, "r": 25})
    return figure


def layer_strip(scores: Mapping[int, float], gate_layer: int) -> go.Figure:
    """One cell per layer coloured by that layer's probe P(correct); the gate's layer is outlined."""
    layers = sorted(scores)
    if not layers:
        raise ValueError("no layer scores to draw")
    values = [scores[l] for l in layers]
    figure = go.Figure(go.Heatmap(
        z=[values], x=[f"L{l}" for l in layers], y=["probe"], zmin=0, zmax=1, colorscale="RdYlGn",
        text=[[f"{v:.2f}" for v in values]], texttemplate="%{text}", hovertemplate="layer %{x}: P(correct) %{z:.3f}<extra></extra>",
        colorbar={"title": "P(correct)", "thickness": 10},
    ))
    if gate_layer in layers:
        i = layers.index(gate_layer)
        figure.add_shape(type="rect", x0=i - 0.5, x1=i + 0.5, y0=-0.5, y1=0.5, line={"color": "black", "width": 3})
    figure.update_layout(height=150, margin={"t": 10, "b": 30, "l": 50, "r": 10}, xaxis_title="decoder layer (outlined: the gate's)")
    return figure


def attention_overlay(image: Image.Image, grid: np.ndarray, layer: int, opacity: float = 0.55) -> go.Figure:
    """The image with the attention grid laid over it (NaN cells — hidden sinks — stay transparent)."""
    arr = np.asarray(grid, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D attention grid, got shape {arr.shape}")
    rows, cols = arr.shape
    side = 384
    shown = image.convert("RGB").resize((side, side), Image.NEAREST)
    figure = go.Figure()
    figure.add_trace(go.Image(z=np.asarray(shown), hoverinfo="skip"))
    cell_h, cell_w = side / rows, side / cols
    figure.add_trace(go.Heatmap(
        z=arr, x=(np.arange(cols) + 0.5) * cell_w - 0.5, y=(np.arange(rows) + 0.5) * cell_h - 0.5,
        colorscale="Inferno", opacity=opacity, zmin=0, zmax=float(np.nanmax(arr)) if np.isfinite(arr).any() else 1,
        hovertemplate="row %{y:.0f}px col %{x:.0f}px: %{z:.3f} of the image attention<extra></extra>",
        colorbar={"title": "share", "thickness": 10},
    ))
    figure.update_layout(height=420, width=460, margin={"t": 30, "b": 10, "l": 10, "r": 10},
                         title={"text": f"answer-position attention, layer {layer}", "font": {"size": 13}})
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    return figure
