"""Table 7 as a figure: every signal's and control's held-out AUROC with its 95% CI, for one run."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from vlmrel_core.figures.style import LAYOUT, PALETTE

KIND_ORDER = ("probe", "output", "attention", "logit lens", "consistency", "control", "fusion")


def table7_figure(table7: pd.DataFrame, run: str | None = None, grouping: str = "image") -> go.Figure:
    """Horizontal forest plot: one row per signal, AUROC point with CI whiskers, coloured by kind."""
    run = str(table7["run"].iloc[0]) if run is None else run
    part = table7[(table7["run"] == run) & (table7["grouping"] == grouping)]
    if part.empty:
        raise ValueError(f"no Table 7 rows for {run!r}/{grouping}; runs: {sorted(set(table7['run']))}")
    figure = go.Figure()
    kinds = list(dict.fromkeys(part["kind"]))
    kinds.sort(key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))
    for i, kind in enumerate(kinds):
        rows = part[part["kind"] == kind]
        figure.add_trace(go.Scatter(
            x=rows["auroc"].tolist(), y=rows["signal"].tolist(), mode="markers", name=kind,
            marker={"color": PALETTE[i % len(PALETTE)], "size": 9},
            error_x={"type": "data", "symmetric": False, "array": (rows["auroc_high"] - rows["auroc"]).tolist(),
                     "arrayminus": (rows["auroc"] - rows["auroc_low"]).tolist()},
            customdata=rows["cost"].tolist(), hovertemplate="%{y}<br>AUROC %{x:.3f}<br>cost %{customdata}",
        ))
    figure.add_vline(x=0.5, line_dash="dot", line_color="gray")
    figure.update_layout(title=f"Table 7 — {run} ({grouping}-grouped held-out rows)", xaxis_title="AUROC (95% CI)",
                         height=max(320, 26 * len(part) + 120), **LAYOUT)
    figure.update_yaxes(autorange="reversed")
    return figure
