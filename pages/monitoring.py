"""Monitoring page: is the gate still seeing the data it was calibrated on, and what does it do live? The
shipped drift checks (confidence-histogram KL, KS, mean-embedding shift against the calibration reference, window by
window) and the live run of the gate on fresh questions (routing shares, accuracy of what it served, cost)."""

from __future__ import annotations

import streamlit as st

from dashboard_common import attempt, sidebar_model_choice
from vlmrel_core.figures.monitoring import drift_figure, routing_figure
from vlmrel_core.results.gate import load_live_run
from vlmrel_core.results.monitoring import load_drift

st.title("Monitoring — is the gate still calibrated?")
choice = sidebar_model_choice()
if choice is None:
    st.stop()
bundle_dir = choice.gate_yaml.parent
drift = attempt("Reading the drift checks (drift.json)", lambda: load_drift(bundle_dir))
if drift is not None:
    st.header("Drift against the calibration reference")
    st.dataframe(drift.summary(), hide_index=True, width="stretch", key="drift_summary")
    name = st.radio("Comparison", list(drift.comparisons), horizontal=True, key="drift_comparison",
                    help="in_domain: fresh questions like the calibration data; shifted: a changed image distribution.")
    comparison = drift[name]
    a, b, c = st.columns(3)
    a.metric("Alert", "yes" if comparison.alert else "no")
    b.metric("KL (confidence histogram)", f"{comparison.kl:.3f}", help=f"threshold {comparison.thresholds['kl']}")
    c.metric("Mean confidence", f"{comparison.mean_confidence.get('current', float('nan')):.3f}",
             delta=f"{comparison.mean_confidence.get('current', 0) - comparison.mean_confidence.get('reference', 0):+.3f} "
                   "vs reference", delta_color="off")
    st.plotly_chart(drift_figure(comparison, name), width="stretch", key="drift_figure")
    if comparison.reasons:
        st.caption("Why: " + "; ".join(comparison.reasons))

live = attempt("Reading the live gate run (live_run.json)", lambda: load_live_run(bundle_dir))
if live is not None:
    st.header("The gate answering fresh questions")
    a, b, c, d = st.columns(4)
    a.metric("Accuracy of all answers", f"{live.accuracy_all:.1%}")
    b.metric("Served automatically", f"{live.served_share:.1%}")
    c.metric("Accuracy of served", "—" if live.accuracy_of_served is None else f"{live.accuracy_of_served:.1%}")
    d.metric("Cost multiplier", f"{live.cost_multiplier:.2f}×", help=live.cost_unit)
    st.plotly_chart(routing_figure(live), width="stretch", key="routing_figure")
