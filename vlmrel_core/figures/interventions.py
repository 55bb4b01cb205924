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


def live_masking_figure(effects: "dict[str, pd.DataFrame]", title: str = "Masked vs unmasked") -> go.Figure:
    """Accuracy and mean confidence side by side (two panels), per model an unmasked and a masked bar; the masked
    bar's whisker is the paired 95% CI of the change, placed on the unmasked value. ``effects`` maps a model label
    to `interventions.live.paired_effect`'s table."""
    from plotly.subplots import make_subplots

    if not effects:
        raise ValueError("no masking results to draw")
    figure = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "mean confidence"), horizontal_spacing=0.12)
    for column, metric in enumerate(("accuracy", "confidence"), start=1):
        for i, (label, table) in enumerate(effects.items()):
            row = table[table["metric"] == metric]
            if row.empty:
                raise ValueError(f"{label}: no {metric} row in the masking effect")
            row = row.iloc[0]
            colour = PALETTE[i % len(PALETTE)]
            low, high = row["unmasked"] + row["ci_low"], row["unmasked"] + row["ci_high"]
            figure.add_trace(go.Bar(x=[label], y=[row["unmasked"]], name="unmasked", legendgroup="unmasked",
                                    showlegend=column == 1 and i == 0, marker={"color": "lightgray"},
                                    offsetgroup="unmasked", hovertemplate="unmasked %{y:.3f}"), row=1, col=column)
            figure.add_trace(go.Bar(
                x=[label], y=[row["masked"]], name="masked", legendgroup="masked", showlegend=column == 1 and i == 0,
                marker={"color": colour}, offsetgroup="masked",
                error_y={"type": "data", "symmetric": False, "array": [max(high - row["masked"], 0.0)],
                         "arrayminus": [max(row["masked"] - low, 0.0)]},
                customdata=[[row["delta"], row["ci_low"], row["ci_high"], row["n"]]],
                hovertemplate="masked %{y:.3f}<br>Δ %{customdata[0]:+.3f} [%{customdata[1]:+.3f}, %{customdata[2]:+.3f}]"
                              "<br>n=%{customdata[3]}"), row=1, col=column)
    figure.update_layout(title=title, barmode="group", **LAYOUT)
    figure.update_yaxes(range=[0, 1])
    return figure
