"""Shared colours and small helpers so every figure reads the same way (correct = green, wrong = red)."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go

CORRECT = "#2ca02c"
WRONG = "#d62728"
THRESHOLD = "black"
GRAY_ZONE = "rgba(243, 227, 181, 0.6)"
PALETTE = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#e377c2", "#7f7f7f", "#bcbd22")
LAYOUT = {"template": "plotly_white", "margin": {"t": 60, "b": 50, "l": 60, "r": 20}}


def rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha})"


def band(x: Sequence[float], low: Sequence[float], high: Sequence[float], colour: str, name: str, group: str) -> go.Scatter:
    """A filled CI band (high forward, low backward) that hides with its line in the legend."""
    xs = list(x)
    return go.Scatter(x=xs + xs[::-1], y=list(high) + list(low)[::-1], fill="toself", fillcolor=rgba(colour, 0.15),
                      line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=group, name=f"{name} 95% CI")
