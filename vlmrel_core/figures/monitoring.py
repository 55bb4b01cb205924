"""Monitoring figures: drift of the current run against the reference, window by window, with thresholds."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from vlmrel_core.figures.style import CORRECT, LAYOUT, WRONG
from vlmrel_core.results.gate import LiveRun
from vlmrel_core.results.monitoring import DriftComparison


def drift_figure(comparison: DriftComparison, name: str = "") -> go.Figure:
    """Confidence-histogram KL and mean-embedding shift per window (alerting windows red), thresholds dashed.

    Files written before per-window values were stored hold only the whole-run comparison; it is then drawn as
    one point labelled 'all rows', and the figure says the per-window values are absent.
    """
    frame = comparison.window_frame()
    per_window = not frame.empty
    if per_window:
        x = [f"{int(s)}–{int(e)}" for s, e in zip(frame["start"], frame["stop"])]
        kl, shift, alert = frame["kl"].tolist(), frame["embedding_shift"].tolist(), frame["alert"].tolist()
        reasons = ["<br>".join(r) or "no alert" for r in frame["reasons"]]
    else:
        x = [f"all rows (n={comparison.n_current})"]
        kl, shift, alert = [comparison.kl], [comparison.embedding_shift], [comparison.alert]
        reasons = ["<br>".join(comparison.reasons) or "no alert"]
    colours = [WRONG if a else CORRECT for a in alert]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                           subplot_titles=("confidence histogram KL vs reference", "mean embedding cosine shift"))
    figure.add_trace(go.Scatter(x=x, y=kl, mode="lines+markers", name="KL", marker={"color": colours, "size": 10},
                                line={"color": "gray"}, customdata=reasons, hovertemplate="%{x}<br>KL %{y:.3f}<br>%{customdata}"),
                     row=1, col=1)
    figure.add_hline(y=comparison.thresholds["kl"], line_dash="dash", line_color="firebrick", row=1, col=1,
                     annotation_text=f"KL threshold {comparison.thresholds['kl']}")
    if any(v is not None for v in shift):
        figure.add_trace(go.Scatter(x=x, y=shift, mode="lines+markers", name="embedding shift",
                                    marker={"color": colours, "size": 10}, line={"color": "gray"}), row=2, col=1)
        figure.add_hline(y=comparison.thresholds["embedding_shift"], line_dash="dash", line_color="firebrick", row=2, col=1,
                         annotation_text=f"shift threshold {comparison.thresholds['embedding_shift']}")
    label = f" — {name}" if name else ""
    figure.update_layout(
        title=f"Drift{label}: {comparison.windows.n_alert}/{comparison.windows.n} windows alert "
              f"(window {comparison.windows.size}); whole run {'ALERT' if comparison.alert else 'no alert'}",
        showlegend=False, **LAYOUT)
    if not per_window:
        figure.add_annotation(text="per-window values not stored in this drift.json; whole-run comparison shown",
                              xref="paper", yref="paper", x=0, y=-0.12, showarrow=False, xanchor="left")
    return figure


ROUTING_LABELS = {"generate": "served", "fallback": "fallback", "self_consistency": "gray zone → self-consistency"}
ROUTING_COLOURS = {"generate": CORRECT, "fallback": WRONG, "self_consistency": "#e6b800"}


def routing_figure(live: LiveRun) -> go.Figure:
    """How the gate routed a live run's questions: one bar per action (served / fallback / self-consistency)."""
    if not live.actions:
        raise ValueError(f"the live run over {live.data} recorded no routing actions")
    actions = list(live.actions)
    figure = go.Figure(go.Bar(x=[ROUTING_LABELS.get(a, a) for a in actions], y=[live.actions[a] for a in actions],
                              marker={"color": [ROUTING_COLOURS.get(a, "gray") for a in actions]},
                              hovertemplate="%{x}: %{y} questions"))
    figure.update_layout(title=f"Routing of {live.n_decisions} live questions ({live.data})", yaxis_title="questions",
                         **LAYOUT)
    return figure
