"""Calibration and routing figures: reliability diagram before/after (temperature scaling, isotonic) with the
confidence histogram, risk–coverage with the certified threshold and gray zone, and the confidence gauge."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vlmrel_core.figures.style import GRAY_ZONE, LAYOUT, PALETTE, THRESHOLD
from vlmrel_core.results.gate import GateReport, SignalCalibration

STAGE_LABELS = {"before": "before", "temperature_scaling": "temperature scaling", "isotonic": "isotonic"}


def reliability_figure(
    calibration: SignalCalibration, signal: str = "probe",
    stages: Sequence[str] = ("before", "temperature_scaling", "isotonic"),
) -> go.Figure:
    """Top: accuracy vs mean confidence per non-empty bin for each stage (ECE/MCE/Brier in the legend), with the
    diagonal. Bottom: how many eval rows fall in each confidence bin, per stage."""
    available = {"before": calibration.before, **calibration.after}
    drawn = [s for s in stages if available.get(s) is not None]
    if not drawn:
        raise ValueError(f"none of the stages {list(stages)} was stored for {signal}; it has "
                         f"{[s for s, m in available.items() if m is not None]}")
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06)
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "gray"},
                                name="perfect calibration"), row=1, col=1)
    for i, stage in enumerate(drawn):
        metrics = available[stage]
        colour = PALETTE[i % len(PALETTE)]
        label = f"{STAGE_LABELS.get(stage, stage)}: ECE {metrics.ece:.3f}, MCE {metrics.mce:.3f}, Brier {metrics.brier:.3f}"
        bins = metrics.bins
        figure.add_trace(go.Scatter(x=bins.prob_pred, y=bins.prob_true, mode="lines+markers", name=label,
                                    legendgroup=stage, line={"color": colour}, customdata=bins.counts,
                                    hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>n=%{customdata}"),
                         row=1, col=1)
        centres, counts = bins.histogram()
        figure.add_trace(go.Bar(x=centres.tolist(), y=counts.tolist(), name=f"{STAGE_LABELS.get(stage, stage)} counts",
                                legendgroup=stage, showlegend=False, marker={"color": colour}, opacity=0.6),
                         row=2, col=1)
    figure.update_layout(title=f"Reliability — {signal} (eval split, n={calibration.n_eval})", barmode="group", **LAYOUT)
    figure.update_xaxes(range=[0, 1], row=1, col=1)
    figure.update_xaxes(title_text="confidence", range=[0, 1], row=2, col=1)
    figure.update_yaxes(title_text="accuracy", range=[0, 1], row=1, col=1)
    figure.update_yaxes(title_text="rows", row=2, col=1)
    return figure


def _coverage_at(report: GateReport, confidence: float) -> float:
    """Test coverage when serving answers with calibrated confidence >= ``confidence`` (curve interpolated)."""
    curve = report.risk_coverage_test
    order = np.argsort(curve.thresholds)
    return float(np.interp(confidence, np.asarray(curve.thresholds)[order], np.asarray(curve.coverage)[order]))


def risk_coverage_figure(
    report: GateReport, *, threshold: float | None = None, coverage: float | None = None,
    gray_zone: Sequence[float] | None = None, target_risk: float | None = None, threshold_label: str | None = None,
) -> go.Figure:
    """Risk (error rate among served answers) vs coverage on the test split; the target risk, the threshold's
    coverage and the gray zone (coverages between its bounds) marked. By default the bundle's own threshold, target
    and gray zone; pass ``threshold`` (calibrated), its test ``coverage``, ``gray_zone`` and ``target_risk`` to mark
    a re-certified rule instead (the dashboard's risk slider)."""
    curve = report.risk_coverage_test
    figure = go.Figure(go.Scatter(x=curve.coverage, y=curve.risk, mode="lines+markers", name="risk–coverage (test)",
                                  customdata=curve.thresholds,
                                  hovertemplate="coverage %{x:.3f}<br>risk %{y:.3f}<br>threshold %{customdata:.3f}"))
    zone = report.gray_zone if gray_zone is None else gray_zone
    if zone is not None:
        low, high = float(zone[0]), float(zone[1])
        figure.add_vrect(x0=_coverage_at(report, high), x1=_coverage_at(report, low), fillcolor=GRAY_ZONE, line_width=0,
                         annotation_text=f"gray zone [{low:.2f}, {high:.2f}]", annotation_position="top left")
    if threshold is None:
        threshold, coverage = report.threshold, report.test.get("coverage")
        threshold_label = threshold_label or f"threshold {report.threshold:.3f} ({report.threshold_source})"
    elif coverage is None:
        coverage = _coverage_at(report, threshold)
    if coverage is not None:
        figure.add_vline(x=float(coverage), line_color=THRESHOLD, line_width=2,
                         annotation_text=threshold_label or f"threshold {threshold:.3f}")
    target = target_risk if target_risk is not None else (report.risk_certificate or {}).get(
        "target_risk", report.test.get("target_risk"))
    if target is not None:
        figure.add_hline(y=float(target), line_dash="dash", line_color="firebrick",
                         annotation_text=f"target risk {float(target):.2f}", annotation_position="top right")
    figure.update_layout(title=f"Risk–coverage — layer {report.layer} probe (test n={report.test.get('n')})",
                         xaxis_title="coverage (share of answers served)", yaxis_title="risk (error rate of served)",
                         **LAYOUT)
    figure.update_xaxes(range=[0, 1])
    return figure


def confidence_gauge(
    confidence: float, threshold: float | None = None, gray_zone: Sequence[float] | None = None,
    title: str = "calibrated P(correct)",
) -> go.Figure:
    """A 0–1 gauge of one answer's calibrated confidence, with the serving threshold and the gray zone."""
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must be in [0, 1], got {confidence}")
    steps = [{"range": [float(gray_zone[0]), float(gray_zone[1])], "color": GRAY_ZONE}] if gray_zone else []
    gauge = {"axis": {"range": [0, 1]}, "steps": steps, "bar": {"color": "#1f77b4"}}
    if threshold is not None:
        gauge["threshold"] = {"line": {"color": THRESHOLD, "width": 3}, "value": float(threshold)}
    figure = go.Figure(go.Indicator(mode="gauge+number", value=float(confidence), gauge=gauge, title={"text": title}))
    figure.update_layout(height=260, margin={"t": 40, "b": 10, "l": 20, "r": 20})
    return figure
