"""Report page: where reliability lives in the chosen embedded model — the shipped held-out Table 7 and report."""

from __future__ import annotations

import streamlit as st

from dashboard_common import attempt, sidebar_model_choice
from vlmrel_core.results.report import load_table7
from vlmrel_core.samples.catalog import sample_catalog

st.title("Report — where reliability lives")
choice = sidebar_model_choice()
if choice is None:
    st.stop()
if choice.family is None:
    st.info("Reports ship for the embedded models; write one for your checkpoint with `vlmrel report`.")
    st.stop()

catalog = sample_catalog()
table7 = attempt("Reading the shipped Table 7", lambda: load_table7(catalog.report_file(choice.family, "table7.csv")))
if table7 is not None:
    st.caption("Held-out AUROC of each signal (shipped report; every number from `vlmrel report`).")
    st.dataframe(table7, width="stretch", hide_index=True, key="table7")
report_md = attempt("Reading the shipped report", lambda: catalog.report_file(choice.family, "report.md").read_text())
if report_md is not None:
    with st.expander("Full report"):
        st.markdown(report_md)
