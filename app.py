"""vlmrel dashboard — entry point: `streamlit run app.py`.

Declares the pages (`st.navigation`); every page is a thin view over `vlmrel_core` and shares its loaders, model
choice, progress bars and error messages through `dashboard_common`. Nothing is loaded here, so the first page
draws at once; the model is loaded only when a page needs it.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="vlmrel", page_icon=":material/visibility:", layout="wide")

PAGES = [
    st.Page("pages/inspect.py", title="Inspect", icon=":material/search:", default=True),
    st.Page("pages/report.py", title="Report", icon=":material/table_chart:"),
]

st.navigation(PAGES).run()
