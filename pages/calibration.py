"""Calibration page: is the gate's confidence a probability, and which threshold can be promised? Reliability
before/after temperature scaling and isotonic with ECE/MCE/Brier (bootstrap CIs) on the bundle's test rows, and a
risk target + δ that re-certify the serving threshold live on its calibration rows (Learn-then-Test)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard_common import attempt, sidebar_model_choice
from dashboard_results import calibration_cis, gate_bundle, split_scores
from vlmrel_core.figures.calibration import STAGE_LABELS, reliability_figure, risk_coverage_figure
from vlmrel_core.gate.risk import UnreachableRiskTarget

DELTAS = (0.01, 0.05, 0.1, 0.2)

st.title("Calibration — can the confidence be trusted?")
choice = sidebar_model_choice()
if choice is None:
    st.stop()
gate_yaml = str(choice.gate_yaml)
bundle = attempt("Reading the gate bundle", lambda: gate_bundle(gate_yaml))
if bundle is None:
    st.stop()
scores = attempt("Re-deriving the gate's calibration and test rows", lambda: split_scores(gate_yaml))
if scores is None:
    st.stop()
report = bundle.report
st.caption(f"Gate probe: {report.pooling} layer {report.layer}; calibrator fitted on {scores.calibration.size} "
           f"calibration rows, every number below on {scores.test.size} held-out test rows "
           f"({report.split['spec']['grouping']}-grouped).")

st.header("Reliability before and after calibration")
stages = [s for s in ("before", "temperature_scaling", "isotonic") if s in scores.calibrated]
shown = st.multiselect("Stages", stages, default=stages, key="cal_stages", format_func=lambda s: STAGE_LABELS.get(s, s))
if not shown:
    st.error("Choose at least one stage to draw.")
else:
    left, right = st.columns([3, 2], gap="large")
    with left:
        figure = attempt("Drawing the reliability diagram", lambda: reliability_figure(bundle.calibration.probe, stages=shown))
        if figure is not None:
            figure.update_layout(height=560, legend={"orientation": "h", "yanchor": "top", "y": -0.12, "x": 0})
            st.plotly_chart(figure, width="stretch", key="reliability")
            st.caption("Top: accuracy per confidence bin (on the diagonal = calibrated). Bottom: the confidence "
                       "histogram per stage.")
    with right:
        rows = []
        for stage in shown:
            cis = attempt(f"Bootstrapping the {stage} metrics", lambda s=stage: calibration_cis(gate_yaml, s))
            if cis is not None:
                rows.append({"stage": STAGE_LABELS.get(stage, stage),
                             **{name.upper(): f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]" for name, e in cis.items()}})
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="calibration_metrics")
        st.caption("Point value [95% bootstrap CI over test rows, 1,000 resamples]; 10 equal-width bins. "
                   f"The gate serves with **{STAGE_LABELS.get(scores.chosen_method, scores.chosen_method)}**"
                   + (f" (T = {report.temperature:.3f})." if report.temperature else "."))

st.header("Certified threshold at a risk target")
certificate = report.risk_certificate or {}
a, b = st.columns(2)
target = a.slider("Target risk (error rate among served answers)", 0.02, 0.40, float(certificate.get("target_risk", 0.1)),
                  0.01, key="risk_target")
delta = b.select_slider("δ (chance the guarantee fails)", DELTAS, value=float(certificate.get("delta", 0.1))
                        if float(certificate.get("delta", 0.1)) in DELTAS else 0.1, key="risk_delta")

from vlmrel_core.results.gate_splits import certify_on_split  # noqa: E402 (numbers only; no model)

try:
    routing = certify_on_split(scores, target, delta)
except UnreachableRiskTarget as err:
    st.error(f"Unreachable: {err}", icon=":material/block:")
    routing = None
except ValueError as err:
    st.error(f"Cannot certify: {err}")
    routing = None

if routing is not None:
    cert = routing.certificate
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Threshold (calibrated)", f"{routing.calibrated_threshold:.3f}", help=f"raw probe score ≥ {cert.threshold:.4f}")
    m2.metric("Coverage (test)", f"{routing.test_coverage:.1%}", help=f"{routing.test_n_kept} of {scores.test.size} served; "
              f"calibration coverage {cert.coverage:.1%}")
    m3.metric("Risk of served (test)", "—" if routing.test_risk is None else f"{routing.test_risk:.1%}")
    m4.metric("Certified upper bound", f"{cert.risk_upper_bound:.1%}",
              help=f"Clopper–Pearson bound on the calibration rows ({cert.n_kept} kept, empirical risk "
                   f"{cert.empirical_risk:.1%}); holds with probability ≥ {1 - delta:.0%}.")
    shipped_zone = bundle.gray_zone
    half_width = (shipped_zone[1] - shipped_zone[0]) / 2 if shipped_zone else None
    zone = (max(0.0, routing.calibrated_threshold - half_width), min(1.0, routing.calibrated_threshold + half_width)) \
        if half_width else None
    st.plotly_chart(risk_coverage_figure(report, threshold=routing.calibrated_threshold, coverage=routing.test_coverage,
                                         gray_zone=zone, target_risk=target,
                                         threshold_label=f"certified threshold {routing.calibrated_threshold:.3f}"),
                    width="stretch", key="risk_coverage")
    st.caption("Gray zone: the bundle's band width around the new threshold — answers there go to self-consistency. "
               f"The shipped gate was certified at target {certificate.get('target_risk')} and δ "
               f"{certificate.get('delta')} (threshold {report.threshold:.3f}).")
