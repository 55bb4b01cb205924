"""Monitoring page: is the gate still seeing the data it was calibrated on, and what does it do live? The
shipped drift checks (confidence-histogram KL, KS, mean-embedding shift against the calibration reference, window by
window), the live run of the gate on fresh questions (routing shares, accuracy of what it served, cost), an
editable gate config and a batch of new questions run through it (per-window drift tests, routing, novelty, recalibration),
and the shipped shift report."""

from __future__ import annotations

import tempfile

import streamlit as st

from dashboard_common import attempt, load_gate_cached, sidebar_model_choice, streamlit_progress
from dashboard_monitoring import SOURCES, batch_samples
from vlmrel_core.figures.monitor_batch import (
    batch_routing_figure, shift_alarm_figure, window_confidence_figure, window_tests_figure,
)
from vlmrel_core.figures.monitoring import drift_figure, routing_figure
from vlmrel_core.gate.batch import gate_dataset
from vlmrel_core.gate.bundle import load_gate_components
from vlmrel_core.gate.drift_tests import MIN_WINDOW
from vlmrel_core.gate.monitor_batch import capturing_states, monitor_batch, parse_gate_yaml
from vlmrel_core.results.gate import load_live_run
from vlmrel_core.results.monitoring import load_drift
from vlmrel_core.results.shift import load_shift_report
from vlmrel_core.samples.catalog import sample_catalog

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

# ------------------------------------------------------------------------------------ the gate config, editable
st.header("Gate configuration")
gate_text = attempt("Reading the bundle's gate.yaml", lambda: choice.gate_yaml.read_text(encoding="utf-8"))
if gate_text is not None and st.session_state.get("gate_yaml_source") != str(choice.gate_yaml):
    st.session_state["gate_yaml_source"] = str(choice.gate_yaml)
    st.session_state["gate_yaml"] = gate_text
    st.session_state.pop("batch_result", None)
edited = st.text_area("gate.yaml (edits apply to the batch below only; the shipped file is not changed)", height=320,
                      key="gate_yaml", help="Read by the library's strict loader (no duplicate keys, aliases or custom "
                                            "tags) and validated field by field; paths resolve against the bundle folder.")
config = attempt("Validating the edited gate config", lambda: parse_gate_yaml(edited, bundle_dir))
if config is not None:
    st.caption("Config valid" + (" (edited)" if edited != gate_text else " (as shipped)") + ".")

# ------------------------------------------------------------------------------------ a batch of new questions
st.header("Run a batch of new questions through the gate")
source = st.radio("Questions", list(SOURCES), horizontal=True, key="batch_source")
uploaded_jsonl = uploaded_images = None
if SOURCES[source] is None:
    uploaded_jsonl = st.file_uploader("Questions (JSONL: image, question, optional label)", type=["jsonl"],
                                      key="batch_jsonl")
    uploaded_images = st.file_uploader("The images it names", type=["png", "jpg", "jpeg"], accept_multiple_files=True,
                                       key="batch_images")
a, b = st.columns(2)
limit = a.number_input("Questions (first N)", min_value=1, max_value=2000, value=100, step=10, key="batch_limit")
window = b.number_input("Window (decisions per drift check)", min_value=2, max_value=1000, value=25, step=5,
                        key="batch_window", help=f"OOD window tests need at least {MIN_WINDOW} per window.")
if st.button("Run batch", key="run_batch", disabled=config is None):
    upload_folder = tempfile.TemporaryDirectory(prefix="vlmrel_batch_")  # removed once the gate has run
    samples = attempt("Reading the questions", lambda: batch_samples(SOURCES[source], uploaded_jsonl, uploaded_images,
                                                                     int(limit), upload_folder.name))
    if samples:
        loaded = attempt("Loading the model", lambda: load_gate_cached(str(choice.gate_yaml)).loaded)
        if loaded is not None:
            def run_batch():
                components = load_gate_components(capturing_states(config), loaded.fingerprint, loaded.hidden_size)
                with streamlit_progress(f"Gate answering {len(samples)} questions") as progress:
                    result = gate_dataset(components.gate(loaded), samples, progress=progress)
                return result.summary(), monitor_batch(components, result, int(window))

            outcome = attempt("Running the batch", run_batch)
            if outcome is not None:
                st.session_state["batch_result"] = (f"{source}, {len(samples)} questions", *outcome)
    upload_folder.cleanup()

shown = st.session_state.get("batch_result")
if shown is None:
    st.info("No batch run yet: choose the questions and press **Run batch**.")
else:
    label, summary, batch = shown
    a, b, c, d = st.columns(4)
    a.metric("Batch served automatically", f"{summary['served_share']:.1%}")
    b.metric("Batch accuracy of served", "—" if summary["accuracy_of_served"] is None else f"{summary['accuracy_of_served']:.1%}")
    c.metric("Novelty-routed share", f"{batch.novelty_share:.1%}", help="fallback with reason 'out of distribution'")
    d.metric("Windows alerting", f"{batch.n_alert}/{len(batch.windows)}")
    st.plotly_chart(batch_routing_figure(batch, label), width="stretch", key="batch_routing")
    st.plotly_chart(window_confidence_figure(batch), width="stretch", key="batch_confidence")
    if batch.windows:
        st.plotly_chart(window_tests_figure(batch), width="stretch", key="batch_tests")
        st.dataframe(batch.window_frame(), hide_index=True, width="stretch", key="batch_windows")
    for note in batch.notes:
        st.caption(note)
    alerts = [f"window {w['start']}–{w['stop']}: " + "; ".join(w["reasons"]) for w in batch.windows if w["alert"]]
    if alerts:
        st.warning("Drift alerts — " + " | ".join(alerts))
    recal = batch.recalibration
    if recal is None:
        st.caption("Unlabelled batch: no recalibration check.")
    elif recal["done"]:
        st.subheader("Recalibration")
        a, b = st.columns(2)
        a.metric("ECE before (held-out half)", f"{recal['ece_before']:.3f}")
        b.metric("ECE after refit", f"{recal['ece_after']:.3f}", delta=f"{recal['ece_after'] - recal['ece_before']:+.3f}",
                 delta_color="inverse")
        st.caption(f"{recal['method']} refitted on {recal['n_fit']} answers, judged on {recal['n_eval']}: {recal['note']}")
    else:
        st.caption(f"Recalibration not run: {recal['reason']}")

# ------------------------------------------------------------------------------------ the shipped shift report
shift = attempt("Reading the shift report", lambda: load_shift_report(sample_catalog().shift_report()))
if shift is not None:
    st.header("Shift report: the certified gate under each shift")
    st.dataframe(shift.table(), hide_index=True, width="stretch", key="shift_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3f")
                                for c in ("accuracy", "certified_risk", "certified_coverage", "novelty_routed_share",
                                          "image_novel_share")})
    st.caption("In-domain windows: false-alarm rate of the window tests at the largest window; false-reject rate: "
               "in-domain inputs routed as out of distribution.")
    st.dataframe(shift.in_domain_rates(), hide_index=True, width="stretch", key="shift_in_domain")
    st.plotly_chart(shift_alarm_figure(shift.table()), width="stretch", key="shift_alarms")
