"""The dashboard's home page, driven headless with Streamlit's AppTest against the shipped gate bundles."""

import pytest

from conftest import REPO, SAMPLES
from vlmrel_core.samples.catalog import FAMILIES

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402


@pytest.mark.parametrize("family_index", [0, 1])
def test_ask_shows_answer_confidence_and_routing(family_index):
    SAMPLES.gate_config(FAMILIES[family_index])  # a missing bundle fails naming its path
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    app.run()
    assert not app.exception
    app.sidebar.radio[0].set_value(app.sidebar.radio[0].options[family_index]).run()
    app.text_input[0].set_value("is there a red circle in the image?").run()
    app.button[0].click().run()
    assert not app.exception
    assert not app.error, [e.value for e in app.error]
    labels = {m.label: m.value for m in app.metric}
    assert labels["Answer"]
    assert labels["Routing"].split()[0] in {"serve", "fallback", "gray"}
    assert len(app.dataframe) == 1  # the shipped held-out report table
