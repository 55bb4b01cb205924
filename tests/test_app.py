"""The dashboard driven headless with Streamlit's AppTest on the embedded models and shipped bundles.

One AppTest per page behaviour: it runs without an exception, its key elements exist, and changing a widget
changes what is shown (values asserted, not just presence).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np

import pytest
from PIL import Image

from conftest import REPO

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402

pytestmark = pytest.mark.slow
ROUTING = {"serve", "fallback", "gray zone → self-consistency"}


@pytest.fixture(autouse=True)
def _probe_cache(tmp_path_factory, monkeypatch):
    """Fitted per-layer probes go to a test folder, not the user's cache (shared by this session's tests)."""
    import dashboard_common

    monkeypatch.setattr(dashboard_common, "LAYER_PROBE_CACHE", tmp_path_factory.getbasetemp() / "layer_probes")


def _app() -> AppTest:
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
    app.run()
    assert not app.exception, app.exception
    return app


def _array(value) -> np.ndarray:
    """A plotly array from a figure's JSON: plain lists, or plotly 6's base64 typed arrays."""
    if isinstance(value, dict) and "bdata" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return array.reshape([int(n) for n in str(shape).split(",")]) if shape else array
    return np.asarray(value, dtype=float)


def _attention_z(app: AppTest) -> np.ndarray:
    return _array(json.loads(app.get("plotly_chart")[2].proto.spec)["data"][1]["z"])


def _metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def test_first_page_is_inspect_and_loads_no_model():
    app = _app()
    assert [t.value for t in app.title] == ["Inspect — will this answer be right?"]
    assert app.button(key="ask") is not None and not app.metric
    assert "press **Ask**" in app.info[0].value
    assert app.text_input(key="question").value  # prefilled from the first shipped question


@pytest.mark.parametrize("family_index", [0, 1])
def test_ask_shows_answer_confidence_routing_layers_attention_and_timings(family_index):
    app = _app()
    model = app.sidebar.radio(key="model_choice")
    model.set_value(model.options[family_index]).run()
    app.button(key="ask").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    metrics = _metrics(app)
    assert metrics["Answer"]
    assert 0.0 <= float(metrics["Confidence"]) <= 1.0
    assert metrics["Routing"] in ROUTING
    assert any(m.value.startswith("**Why:**") for m in app.markdown)
    figures = [json.loads(c.proto.spec) for c in app.get("plotly_chart")]
    gauge, strip, attention = figures[0], figures[1], figures[2]
    assert gauge["data"][0]["value"] == pytest.approx(float(metrics["Confidence"]), abs=5e-4)
    assert gauge["data"][0]["gauge"]["threshold"]["value"] > 0
    layers = list(_array(strip["data"][0]["x"]))
    scores = _array(strip["data"][0]["z"])
    assert layers == [0, 1, 2, 3] and ((scores >= 0) & (scores <= 1)).all()
    assert "layer 3" in attention["layout"]["title"]["text"]  # the gate's layer first
    quote = [m.value for m in app.markdown if "How little attention predicts" in m.value]
    assert quote and "(0.5 = chance)" in quote[0]
    timings = app.dataframe[-1].value
    assert {"gate_generate_s", "inspection_pass_s", "total_s"} <= set(timings["step"])
    assert (timings["seconds"] >= 0).all()

    # The layer slider redraws the map for that layer, without asking the model again.
    app.select_slider(key="attn_layer").set_value(0).run()
    redrawn = json.loads(app.get("plotly_chart")[2].proto.spec)
    assert "layer 0" in redrawn["layout"]["title"]["text"]
    assert not np.allclose(_array(redrawn["data"][1]["z"]), _array(attention["data"][1]["z"]), equal_nan=True)
    assert app.dataframe[-1].value.equals(timings)  # same inspection: nothing re-ran


def test_hiding_sinks_blanks_the_sink_cells():
    app = _app()
    app.button(key="ask").click().run()
    assert not app.error, [e.value for e in app.error]
    for layer in app.select_slider(key="attn_layer").options:
        app.select_slider(key="attn_layer").set_value(int(layer)).run()
        sentence = next(c.value for c in app.caption if "sink" in c.value)
        if not sentence.startswith("no attention sink"):
            break
    else:
        pytest.skip("no layer of this answer has an attention sink")
    assert len(app.get("plotly_chart")) == 3, (app.exception, [e.value for e in app.error], [c.value for c in app.caption])
    before = _attention_z(app)
    app.checkbox(key="hide_sinks").check().run()
    after = _attention_z(app)
    n_sinks = int(sentence.split(" of ")[0])
    assert np.isnan(after).sum() == n_sinks and not np.isnan(before).any()
    assert np.nansum(after) == pytest.approx(1.0) and np.nanmax(after) < np.nanmax(before)
    app.checkbox(key="hide_border").check().run()
    border = _attention_z(app)
    rows, cols = border.shape
    assert np.isnan(border[0]).all() and np.isnan(border[:, -1]).all() and np.isnan(border).sum() >= 2 * (rows + cols) - 4


def test_picking_another_sample_changes_the_question_and_clears_the_answer():
    app = _app()
    app.button(key="ask").click().run()
    assert app.metric
    sample = app.selectbox(key="sample")
    first_question = app.text_input(key="question").value
    questions = [o.split(" · ", 1)[1].rsplit(" (truth", 1)[0] for o in sample.options]
    other = next(i for i, q in enumerate(questions) if q != first_question)
    sample.set_value(sample.options[other].split(" · ")[0].lstrip("#")).run()
    assert app.text_input(key="question").value == questions[other]
    assert not app.metric and "press **Ask**" in app.info[0].value


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    with Image.open(next((REPO / "sample_data" / "shapes_pope" / "images").glob("*.png"))) as image:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def test_upload_an_image_and_ask():
    app = _app()
    app.radio(key="image_source").set_value("upload").run()
    app.file_uploader(key="upload").upload("shapes.png", _png_bytes(), "image/png").run()
    app.text_input(key="question").set_value("is there a red circle in the image?").run()
    app.button(key="ask").click().run()
    assert not app.exception and not app.error
    assert _metrics(app)["Answer"]


def test_a_non_image_upload_is_one_clear_error():
    app = _app()
    app.radio(key="image_source").set_value("upload").run()
    app.file_uploader(key="upload").upload("notes.txt", b"not an image at all", "text/plain").run()
    assert not app.exception
    assert len(app.error) == 1 and "notes.txt: not an image" in app.error[0].value
    assert app.button(key="ask").disabled


def test_first_draw_imports_no_model_code():
    """The first page must draw fast: torch, transformers and scikit-learn load only when someone asks."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom streamlit.testing.v1 import AppTest\n"
        f"app = AppTest.from_file({str(REPO / 'app.py')!r}, default_timeout=120)\napp.run()\n"
        "assert not app.exception, app.exception\n"
        "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
