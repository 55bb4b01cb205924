"""Layer sweep page: where in depth the hidden state predicts correctness — held-out probe AUROC per layer and
pooling (CI bands, CV-chosen layer, plateau, reference signals), the logit-lens margin, and Table 7, for late and
early fusion side by side. Everything is read from the shipped reports (`vlmrel report`)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard_common import attempt
from dashboard_results import GROUPINGS, family_label, family_report, lens_curves, run_names
from vlmrel_core.figures.layers import layer_sweep_figure, logit_lens_figure
from vlmrel_core.figures.signals import table7_figure
from vlmrel_core.samples.catalog import FAMILIES, sample_catalog

BELOW = {"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0}  # legends under the charts: the columns are narrow

st.title("Layer sweep — where in depth reliability lives")
st.caption("Held-out AUROC of a logistic probe on each decoder layer's hidden state, for predicting whether the "
           "answer is right. Shipped reports of both embedded models; rebuild with `vlmrel report`.")

reports = {family: attempt(f"Reading the {family_label(family)} report", lambda f=family: family_report(f))
           for family in FAMILIES}
if any(report is None for report in reports.values()):
    st.stop()

runs = list(dict.fromkeys(name for family in FAMILIES for name in run_names(family)))
poolings = list(dict.fromkeys(reports[FAMILIES[0]].sweep.frame["pooling"]))
left, middle, right = st.columns([1, 1, 2])
run = left.selectbox("Run (dataset split)", runs, key="sweep_run",
                     help="'#2' is the run extracted with self-consistency samples (a second adversarial run).")
grouping = GROUPINGS[middle.radio("Held-out rows", list(GROUPINGS), key="sweep_grouping", horizontal=True,
                                  help="Images: no test image was seen in training. Items: no test question "
                                       "(object asked about) was seen in training — a harder transfer.")]
chosen_poolings = right.multiselect("Pooling of the hidden state", poolings, default=poolings, key="sweep_poolings")
if not chosen_poolings:
    st.error("Choose at least one pooling to draw.")
    st.stop()

columns = st.columns(len(FAMILIES), gap="large")
for column, family in zip(columns, FAMILIES):
    report = reports[family]
    full_run = f"{family}/{run}"
    with column:
        st.subheader(family_label(family))
        if full_run not in report.sweep.runs():
            st.info(f"No {run!r} run in the {family} report.")
            continue
        figure = attempt("Drawing the layer sweep", lambda: layer_sweep_figure(
            report.sweep, full_run, grouping, table7=report.table7, poolings=chosen_poolings))
        if figure is None:
            continue
        figure.update_layout(height=480, legend=BELOW)
        st.plotly_chart(figure, width="stretch", key=f"sweep_{family}")
        chosen = report.sweep.selected(full_run, grouping)
        plateau = report.sweep.plateau(str(chosen["pooling"]), full_run, grouping)
        a, b = st.columns(2)
        a.metric("CV-chosen layer", f"{int(chosen['layer'])}",
                 help=f"Pooling {chosen['pooling']}; chosen by grouped cross-validation on the training rows only "
                      "(the star on the chart).")
        b.metric("Held-out AUROC there", f"{chosen['auroc']:.3f}",
                 help=f"95% CI [{chosen['auroc_low']:.3f}, {chosen['auroc_high']:.3f}]")
        st.caption(f"Plateau of {chosen['pooling']} (layers within the rule of the best): "
                   f"{', '.join(map(str, plateau)) or 'none'}. Dashed lines: max answer probability, the item "
                   f"control (question-only features) and attention −H_s on the same held-out rows.")
        lens_run = Path(report.summary.run(full_run).run_dir).name  # the shipped run folder ('adversarial', ...)
        curves = attempt("Reading the logit lens", lambda: lens_curves(family, lens_run))
        if curves is not None:
            lens = logit_lens_figure(curves, f"Logit-lens margin, correct vs wrong — {family}/{lens_run}")
            lens.update_layout(legend=BELOW)
            st.plotly_chart(lens, width="stretch", key=f"lens_{family}")

st.header("Table 7 — every signal on the same held-out rows")
st.caption("Held-out AUROC with 95% bootstrap CI of each signal and control (kinds coloured), for the run and "
           "grouping chosen above.")
columns = st.columns(len(FAMILIES), gap="large")
for column, family in zip(columns, FAMILIES):
    report = reports[family]
    with column:
        st.subheader(family_label(family))
        full_run = f"{family}/{run}"
        figure = attempt("Drawing Table 7", lambda: table7_figure(report.table7, full_run, grouping))
        if figure is None:
            continue
        figure.update_layout(legend=BELOW)
        st.plotly_chart(figure, width="stretch", key=f"table7_{family}")
        part = report.table7[(report.table7["run"] == full_run) & (report.table7["grouping"] == grouping)]
        st.dataframe(part[["signal", "kind", "auroc", "auroc_low", "auroc_high", "r_pb", "cost", "n_test"]],
                     hide_index=True, width="stretch", key=f"table7_rows_{family}")
        report_md = attempt("Reading the shipped report", lambda: sample_catalog().report_file(family, "report.md").read_text())
        if report_md is not None:
            with st.expander("Full report"):
                st.markdown(report_md)
