"""Intervention figures: accuracy change under each ablation / masking condition, paired 95% CIs, per family."""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go

from vlmrel_core.figures.style import LAYOUT, PALETTE
from vlmrel_core.results.monitoring import AblationTable

def condition_label(row: "pd.Series") -> str:
    """Words for one table row's condition, with its k / share and (if not the default) its ablation mode."""
    condition, k, fraction = row["condition"], row["k"], row["fraction"]
    if condition == "top_k":
        text = f"top-{int(k)} probe dims"
    elif condition == "random_k":
        text = f"random {int(k)} dims"
    elif condition == "random_fraction":
        text = f"random {float(fraction):.0%} of dims"
    elif condition.startswith("mask_"):
        which = {"high": "most-attended", "low": "least-attended", "random": "random"}.get(condition[5:], condition[5:])
        text = f"grey {float(fraction):.0%} {which} patches"
    else:
        text = str(condition)
    return text if row["mode"] in ("zero", "grey") else f"{text} ({row['mode']})"


def masking_effect_figure(
    table: AblationTable, question_type: str = "all", conditions: Sequence[str] | None = None, title: str | None = None
) -> go.Figure:
    """Grouped bars: accuracy change (pp) per condition, one colour per model side by side, paired 95% CI whiskers."""
    rows = table.overall(question_type)
    if conditions is not None:
        rows = rows[rows["condition"].isin(conditions)]
        if rows.empty:
            raise ValueError(f"no rows for conditions {list(conditions)}")
    figure = go.Figure()
    for i, (model, part) in enumerate(rows.groupby("model", sort=False)):
        labels = [condition_label(r) for _, r in part.iterrows()]
        delta = part["delta_pp"].astype(float)
        figure.add_trace(go.Bar(
            x=labels, y=delta.tolist(), name=f"{model} ({part['fusion'].iloc[0]} fusion)", marker={"color": PALETTE[i % len(PALETTE)]},
            error_y={"type": "data", "symmetric": False, "array": (part["ci_high_pp"] - delta).tolist(),
                     "arrayminus": (delta - part["ci_low_pp"]).tolist()},
            customdata=part["n"].tolist(), hovertemplate="%{x}<br>Δ %{y:+.2f} pp<br>n=%{customdata}",
        ))
    figure.add_hline(y=0.0, line_color="gray")
    figure.update_layout(title=title or f"Accuracy change under interventions ({question_type} questions)",
                         barmode="group", yaxis_title="Δ accuracy, pp (paired 95% CI)", **LAYOUT)
    return figure
