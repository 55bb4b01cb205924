"""Per-layer figures: the layer sweep (AUROC with CI bands, chosen layer, plateau, reference signals), the
logit-lens margin curve (correct vs wrong), per-layer signals and a per-layer probe-score strip."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from vlmrel_core.figures.style import CORRECT, LAYOUT, PALETTE, WRONG, band
from vlmrel_core.results.report import SweepTable
from vlmrel_core.results.runs import LensCurves

# Table 7 keys drawn as horizontal reference lines on the sweep, with their labels.
REFERENCE_SIGNALS: dict[str, str] = {
    "max_answer_prob": "max answer prob",
    "item_control": "item control",
    "attention_spatial_entropy": "attention −H_s",
}


def layer_sweep_figure(
    sweep: SweepTable, run: str | None = None, grouping: str = "image", table7: pd.DataFrame | None = None,
    references: dict[str, str] | None = None, poolings: Sequence[str] | None = None,
) -> go.Figure:
    """Held-out probe AUROC vs layer, one line + 95% CI band per pooling (only ``poolings`` if given; colours stay
    fixed per pooling); the CV-selected layer starred, the selected pooling's plateau shaded, and Table 7 reference
    signals (same run and grouping) as dashed lines."""
    part = sweep.part(run, grouping)
    run = str(part["run"].iloc[0])
    chosen = sweep.selected(run, grouping)
    all_poolings = list(dict.fromkeys(part["pooling"]))
    if poolings is not None:
        unknown = sorted(set(poolings) - set(all_poolings))
        if unknown:
            raise ValueError(f"unknown pooling(s) {unknown}; the sweep has {all_poolings}")
    figure = go.Figure()
    for pooling, rows in part.groupby("pooling", sort=False):
        if poolings is not None and pooling not in poolings:
            continue
        colour = PALETTE[all_poolings.index(pooling) % len(PALETTE)]
        rows = rows.sort_values("layer")
        figure.add_trace(band(rows["layer"], rows["auroc_low"], rows["auroc_high"], colour, pooling, pooling))
        figure.add_trace(go.Scatter(x=rows["layer"].tolist(), y=rows["auroc"].tolist(), mode="lines+markers",
                                    name=pooling, legendgroup=pooling, line={"color": colour}))
    figure.add_trace(go.Scatter(x=[int(chosen["layer"])], y=[float(chosen["auroc"])], mode="markers",
                                marker={"symbol": "star", "size": 16, "color": "gold", "line": {"color": "black", "width": 1}},
                                name=f"CV-selected: {chosen['pooling']} L{int(chosen['layer'])}"))
    plateau = sweep.plateau(str(chosen["pooling"]), run, grouping)
    if plateau:
        figure.add_vrect(x0=min(plateau) - 0.4, x1=max(plateau) + 0.4, fillcolor="rgba(0,0,0,0.06)", line_width=0,
                         annotation_text=f"plateau ({chosen['pooling']})", annotation_position="top left")
    if table7 is not None:
        refs = table7[(table7["run"] == run) & (table7["grouping"] == grouping)]
        for key, label in (references or REFERENCE_SIGNALS).items():
            row = refs[refs["key"] == key]
            if not row.empty:
                value = float(row["auroc"].iloc[0])
                figure.add_hline(y=value, line_dash="dash", line_color="gray",
                                 annotation_text=f"{label} {value:.3f}", annotation_position="bottom right")
    figure.add_hline(y=0.5, line_dash="dot", line_color="lightgray")
    figure.update_layout(title=f"Probe AUROC by layer — {run} ({grouping}-grouped held-out rows)",
                         xaxis_title="decoder layer", yaxis_title="held-out AUROC (95% CI)", **LAYOUT)
    figure.update_xaxes(tickmode="array", tickvals=sorted(int(v) for v in part["layer"].unique()))
    return figure


def logit_lens_figure(curves: LensCurves, title: str = "Logit-lens margin by layer") -> go.Figure:
    """Mean label-signed lens margin per layer (log-odds of the right answer), correct vs wrong, 95% CI bands."""
    layers = list(curves.layers)
    figure = go.Figure()
    for name, colour, mean, low, high, n in [
        ("correct", CORRECT, curves.correct_mean, curves.correct_low, curves.correct_high, curves.n_correct),
        ("wrong", WRONG, curves.wrong_mean, curves.wrong_low, curves.wrong_high, curves.n_wrong),
    ]:
        figure.add_trace(band(layers, low, high, colour, name, name))
        figure.add_trace(go.Scatter(x=layers, y=np.asarray(mean).tolist(), mode="lines+markers", name=f"{name} (n={n})",
                                    legendgroup=name, line={"color": colour}))
    figure.add_hline(y=0.0, line_dash="dot", line_color="gray")
    figure.update_layout(title=title, xaxis_title="decoder layer",
                         yaxis_title="lens log-odds of the true answer (label-signed)", **LAYOUT)
    figure.update_xaxes(tickmode="array", tickvals=layers)
    return figure


def layer_signals_figure(layer_signals: pd.DataFrame, run: str | None = None) -> go.Figure:
    """AUROC per layer of every per-layer signal of one run (attention, logit lens, probe), with CI bands."""
    if layer_signals.empty:
        raise ValueError("no per-layer signals to draw")
    run = str(layer_signals["run"].iloc[0]) if run is None else run
    part = layer_signals[layer_signals["run"] == run]
    if part.empty:
        raise ValueError(f"no per-layer signals for run {run!r}; runs: {sorted(set(layer_signals['run']))}")
    figure = go.Figure()
    for i, (signal, rows) in enumerate(part.groupby("signal", sort=False)):
        colour = PALETTE[i % len(PALETTE)]
        rows = rows.sort_values("layer")
        figure.add_trace(band(rows["layer"], rows["auroc_low"], rows["auroc_high"], colour, signal, signal))
        figure.add_trace(go.Scatter(x=rows["layer"].tolist(), y=rows["auroc"].tolist(), mode="lines+markers",
                                    name=signal, legendgroup=signal, line={"color": colour}))
    figure.add_hline(y=0.5, line_dash="dot", line_color="lightgray")
    figure.update_layout(title=f"Per-layer signals — {run}", xaxis_title="decoder layer",
                         yaxis_title="held-out AUROC (95% CI, oriented)", **LAYOUT)
    return figure


def probe_score_strip(
    layers: Sequence[int], scores: Sequence[float], chosen_layer: int | None = None, title: str = "Probe score by layer"
) -> go.Figure:
    """One question's probe score (P(correct)) at each layer as a one-row heatmap; the gate's layer outlined."""
    layers, values = [int(l) for l in layers], np.asarray(scores, dtype=float)
    if len(layers) != values.size:
        raise ValueError(f"{len(layers)} layers but {values.size} scores")
    if values.size and (np.nanmin(values) < 0 or np.nanmax(values) > 1):
        raise ValueError("probe scores must be probabilities in [0, 1]")
    figure = go.Figure(go.Heatmap(z=[values.tolist()], x=layers, y=["probe score"], zmin=0, zmax=1, colorscale="RdYlGn",
                                  text=[[f"{v:.2f}" for v in values]], texttemplate="%{text}",
                                  colorbar={"title": "P(correct)"}))
    if chosen_layer is not None:
        if chosen_layer not in layers:
            raise ValueError(f"chosen layer {chosen_layer} is not among {layers}")
        figure.add_shape(type="rect", x0=chosen_layer - 0.5, x1=chosen_layer + 0.5, y0=-0.5, y1=0.5,
                         line={"color": "black", "width": 3})
    figure.update_layout(title=title, xaxis_title="decoder layer", height=200, **LAYOUT)
    figure.update_xaxes(tickmode="array", tickvals=layers)
    return figure
