"""Monitoring page AppTests: editing the gate YAML (errors inline, naming the field), a small batch through the
gate (routing shares appear and change what is shown), and the shipped shift report's values."""

from __future__ import annotations

import json

import pytest

from conftest import REPO

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402

from test_app import _array  # noqa: E402

pytestmark = pytest.mark.slow


def _page() -> AppTest:
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
    app.run()
    app.switch_page("pages/monitoring.py").run()
    assert not app.exception, app.exception
    return app


def _chart_ids(app: AppTest) -> list[str]:
    return [c.proto.id for c in app.get("plotly_chart")]


def _chart(app: AppTest, key: str) -> dict:
    found = [c for c in app.get("plotly_chart") if c.proto.id.endswith(f"-{key}")]
    assert found, f"no chart {key!r}; charts: {_chart_ids(app)}"
    return json.loads(found[0].proto.spec)


@pytest.mark.parametrize("old, new, field", [
    ("gray_zone_action: self_consistency_k5", "gray_zone_action: self_consistency_k100000", "gray_zone_action"),
    ("  max_new_tokens: 8\n", "  max_new_tokens: 8\n  max_new_tokens: 9\n", "max_new_tokens"),
    ("  max_new_tokens: 8\n", "  self_consistency_k: 100000\n", "self_consistency_k"),
])
def test_an_invalid_yaml_edit_shows_one_error_naming_the_field(old, new, field):
    app = _page()
    assert not app.error
    text = app.text_area(key="gate_yaml").value
    assert old in text
    app.text_area(key="gate_yaml").set_value(text.replace(old, new)).run()
    assert not app.exception, app.exception
    assert len(app.error) == 1 and field in app.error[0].value, [e.value for e in app.error]
    assert app.button(key="run_batch").disabled
    app.text_area(key="gate_yaml").set_value(text).run()
    assert not app.error and not app.button(key="run_batch").disabled


def test_a_small_batch_shows_routing_shares_and_changes_the_page():
    app = _page()
    assert "batch_routing" not in " ".join(_chart_ids(app))
    assert any("No batch run yet" in i.value for i in app.info)
    app.radio(key="batch_source").set_value("shipped shifted split")
    app.number_input(key="batch_limit").set_value(16)
    app.number_input(key="batch_window").set_value(8)
    app.button(key="run_batch").click().run()
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]
    assert not any("No batch run yet" in i.value for i in app.info)
    routing = _chart(app, "batch_routing")
    shares = _array(routing["data"][0]["y"]).tolist()
    assert sum(shares[:3]) == pytest.approx(1.0) and "16 questions" in routing["layout"]["title"]["text"]
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Windows alerting"].endswith("/2") and metrics["Novelty-routed share"].endswith("%")
    tests = _chart(app, "batch_tests")
    assert len(tests["data"]) >= 2  # KL and KS per window at least
    assert len(_chart(app, "batch_confidence")["data"]) == 3  # reference + two windows of 8


def test_the_shift_report_table_shows_the_json_values():
    from vlmrel_core.samples.catalog import sample_catalog

    raw = json.loads(sample_catalog().shift_report().read_text())
    app = _page()
    tables = [d.value for d in app.dataframe if "certified_risk" in d.value.columns]
    assert len(tables) == 1
    table = tables[0].set_index(["model", "shift"])
    jpeg = raw["early_fusion"]["shifts"]["jpeg"]
    assert table.loc[("early_fusion", "jpeg"), "certified_coverage"] == jpeg["certified_rule"]["coverage"]
    assert table.loc[("early_fusion", "jpeg"), "alarm_rate@200"] == jpeg["windows"]["200"]["alarm_rate"]
    assert "shift_alarms" in " ".join(_chart_ids(app))


def test_a_valid_edit_is_what_the_batch_runs_with():
    """route_novel off: the same shifted questions no longer go to the fallback as 'out of distribution'."""
    app = _page()
    app.radio(key="batch_source").set_value("shipped shifted split")
    app.number_input(key="batch_limit").set_value(16)
    app.number_input(key="batch_window").set_value(8)
    app.button(key="run_batch").click().run()
    shipped = {m.label: m.value for m in app.metric}
    assert shipped["Novelty-routed share"] != "0.0%"
    text = app.text_area(key="gate_yaml").value
    app.text_area(key="gate_yaml").set_value(text.replace("route_novel: true", "route_novel: false")).run()
    assert not app.error and "(edited)" in " ".join(c.value for c in app.caption)
    app.button(key="run_batch").click().run()
    assert not app.exception and not app.error
    assert {m.label: m.value for m in app.metric}["Novelty-routed share"] == "0.0%"


def test_an_uploaded_jsonl_with_its_image_runs_and_a_bad_one_shows_one_error():
    from vlmrel_core.samples.catalog import sample_catalog

    folder = sample_catalog().drift_dir()
    image = folder / "images" / "1000000.png"
    rows = [{"question_id": i, "image": "1000000.png", "text": q} for i, q in
            enumerate(["is there a green triangle in the image?", "is there a yellow triangle in the image?"])]
    app = _page()
    app.radio(key="batch_source").set_value("upload (JSONL + images)").run()
    app.file_uploader(key="batch_jsonl").upload("q.jsonl", b'{"question_id": 0, "image": "missing.png"}\n',
                                                 "application/jsonl").run()
    app.button(key="run_batch").click().run()
    assert not app.exception and len(app.error) == 1 and "Reading the questions" in app.error[0].value
    app.file_uploader(key="batch_jsonl").upload("q.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode(),
                                                 "application/jsonl")
    app.file_uploader(key="batch_images").upload("1000000.png", image.read_bytes(), "image/png")
    app.number_input(key="batch_window").set_value(2)
    app.button(key="run_batch").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert "2 questions" in _chart(app, "batch_routing")["layout"]["title"]["text"]
    assert any("Unlabelled batch" in c.value for c in app.caption)
