"""vlmrel dashboard — entry point: `streamlit run app.py`.

Declares the pages (`st.navigation`); every page is a thin view over `vlmrel_core` and shares its loaders, model
choice, progress bars and error messages through `dashboard_common` (and the cached result readers of
`dashboard_results`). Nothing is loaded here, so the first page draws at once; the model is loaded only when a
page needs it.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="vlmrel", page_icon=":material/visibility:", layout="wide")

PAGES = [
    st.Page("pages/inspect.py", title="Inspect", icon=":material/search:", default=True),
    st.Page("pages/layer_sweep.py", title="Layer sweep", icon=":material/stacked_line_chart:"),
    st.Page("pages/calibration.py", title="Calibration", icon=":material/tune:"),
    st.Page("pages/attention.py", title="Attention vs hidden state", icon=":material/visibility:"),
    st.Page("pages/masking.py", title="Neuron masking", icon=":material/grid_off:"),
    st.Page("pages/monitoring.py", title="Monitoring", icon=":material/monitor_heart:"),
]

st.navigation(PAGES).run()
