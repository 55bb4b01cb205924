"""Figures for a batch the gate just answered (`gate.monitor_batch`) and for the shipped shift report."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vlmrel_core.figures.monitoring import ROUTING_COLOURS, ROUTING_LABELS
from vlmrel_core.figures.style import CORRECT, LAYOUT, WRONG
from vlmrel_core.gate.monitor_batch import BatchMonitoring


def window_confidence_figure(batch: BatchMonitoring) -> go.Figure:
    """The calibration reference's confidences and each window's, side by side (alerting windows red)."""
    figure = go.Figure(go.Box(y=batch.reference_confidence, name=f"reference (n={batch.reference_confidence.size})",
                              marker_color="gray", boxmean=True))
    for w in batch.windows:
        figure.add_trace(go.Box(y=w["confidence"], name=f"window {w['start']}–{w['stop']}", boxmean=True,
                                marker_color=WRONG if w["alert"] else CORRECT))
    if not batch.windows:
        figure.add_trace(go.Box(y=batch.confidence, name=f"batch (n={batch.n}, no full window)", marker_color="#e6b800"))
    figure.update_layout(title=f"Calibrated confidence per window of {batch.window} vs the calibration reference",
                         yaxis_title="calibrated P(correct)", showlegend=False, **LAYOUT)
    return figure


def window_tests_figure(batch: BatchMonitoring) -> go.Figure:
    """Each drift test's value per window with its threshold dashed: KL, KS p-value, embedding shift and the
    gate's OOD window tests (p-values against their Bonferroni alpha); a marker is red where that test alarms."""
    x = [f"{w['start']}–{w['stop']}" for w in batch.windows]
    panels = [("KL (confidence histogram)", "kl", batch.thresholds["kl"]),
              ("KS p-value", "ks_pvalue", batch.thresholds["ks_alpha"])]
    if any(w["embedding_shift"] is not None for w in batch.windows):
        panels.append(("mean embedding cosine shift", "embedding_shift", batch.thresholds["embedding_shift"]))
    panels += [(f"{t} test p-value", t, batch.thresholds["window_test_alpha"]) for t in batch.window_tests]
    figure = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                           subplot_titles=[p[0] for p in panels])
    for row, (title, key, threshold) in enumerate(panels, start=1):
        values = [w["tests"][key]["pvalue"] if key in batch.window_tests else w[key] for w in batch.windows]
        below = key == "ks_pvalue" or key in batch.window_tests  # p-values alarm below alpha, the rest above
        colours = [CORRECT if v is None or (v >= threshold if below else v <= threshold) else WRONG for v in values]
        figure.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=title, line={"color": "gray"},
                                    marker={"color": colours, "size": 9}), row=row, col=1)
        figure.add_hline(y=threshold, line_dash="dash", line_color="firebrick", row=row, col=1,
                         annotation_text=f"threshold {threshold:.3g}")
    figure.update_layout(title=f"Drift tests per window: {batch.n_alert}/{len(batch.windows)} windows alert",
                         height=max(320, 190 * len(panels)), showlegend=False, **LAYOUT)
    return figure


def batch_routing_figure(batch: BatchMonitoring, label: str = "batch") -> go.Figure:
    """Routing shares of the batch, with the novelty-routed part of the fallback shown apart."""
    names, shares, colours = [], [], []
    for action, share in batch.routing_shares.items():
        names.append(ROUTING_LABELS.get(action, action))
        shares.append(share)
        colours.append(ROUTING_COLOURS.get(action, "gray"))
    names.append("of which: fallback, out of distribution")
    shares.append(batch.novelty_share)
    colours.append("#7f3fbf")
    figure = go.Figure(go.Bar(x=names, y=shares, marker={"color": colours}, text=[f"{s:.0%}" for s in shares],
                              hovertemplate="%{x}: %{y:.1%}"))
    figure.update_layout(title=f"Routing of {batch.n} questions ({label})", yaxis_title="share of questions",
                         yaxis_range=[0, 1], **LAYOUT)
    return figure


def shift_alarm_figure(table: pd.DataFrame) -> go.Figure:
    """Alarm rate per shift at each window size, one panel per model (in_domain: the false-alarm rate)."""
    models = list(dict.fromkeys(table["model"]))
    sizes = [c for c in table.columns if c.startswith("alarm_rate@")]
    figure = make_subplots(rows=len(models), cols=1, shared_xaxes=False, subplot_titles=models, vertical_spacing=0.2)
    palette = ["#9ecae1", "#4292c6", "#08306b"]
    for row, model in enumerate(models, start=1):
        part = table[table["model"] == model]
        for i, size in enumerate(sizes):
            figure.add_trace(go.Bar(x=part["shift"], y=part[size], name=f"window {size.split('@')[1]}",
                                    marker_color=palette[i % len(palette)], showlegend=row == 1), row=row, col=1)
    figure.update_layout(title="Shift report: window alarm rate per shift", barmode="group",
                         height=360 * len(models), **LAYOUT)
    return figure


__all__ = ["batch_routing_figure", "shift_alarm_figure", "window_confidence_figure", "window_tests_figure"]
