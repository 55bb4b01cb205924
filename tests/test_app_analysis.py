"""AppTests of the analysis pages (Layer sweep, Calibration, Attention vs hidden state) on the shipped results of
the embedded models: each runs without an exception, shows its key elements, and every widget changes what is
shown (chart data or metric text asserted before and after)."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, SAMPLES

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402

from test_app import _array  # noqa: E402 (plotly typed-array decoding shared with the Inspect tests)

pytestmark = pytest.mark.slow
FRAMES = {"table7_rows_late_fusion": 0, "calibration_metrics": 0, "attn_association": 0, "masking_table": 0}
LATE, EARLY = "late fusion (LLaVA class)", "early fusion (PaliGemma class)"


def _page(path: str) -> AppTest:
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
    app.run()
    app.switch_page(path).run()
    assert not app.exception, app.exception
    return app


def _rerun(app: AppTest) -> AppTest:
    app.run()
    assert not app.exception, app.exception
    return app


def _chart(app: AppTest, key: str) -> dict:
    found = [c for c in app.get("plotly_chart") if c.proto.id.endswith(f"-{key}")]
    assert found, f"no chart {key!r}; charts: {[c.proto.id for c in app.get('plotly_chart')]}"
    return json.loads(found[0].proto.spec)


def _frame(app: AppTest, key: str):
    """A page's dataframe by its key: read-only frames carry no element id, so by position in FRAMES."""
    return app.dataframe[FRAMES[key]].value


def _lines(spec: dict) -> dict[str, list[float]]:
    return {t["name"]: _array(t["y"]).tolist() for t in spec["data"] if t.get("mode") == "lines+markers"}


def _metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


# ------------------------------------------------------------------------------------------- layer sweep


def test_layer_sweep_draws_both_families_and_every_control_changes_the_lines():
    app = _page("pages/layer_sweep.py")
    assert app.title[0].value.startswith("Layer sweep")
    late, early = _chart(app, "sweep_late_fusion"), _chart(app, "sweep_early_fusion")
    assert set(_lines(late)) == {"last_token", "mean_all", "mean_image", "mean_text"} == set(_lines(early))
    assert _lines(late) != _lines(early)
    assert any(t["name"].startswith("CV-selected") for t in late["data"])
    assert {"correct", "wrong"} <= {t["name"].split(" ")[0] for t in _chart(app, "lens_late_fusion")["data"]}
    assert _frame(app, "table7_rows_late_fusion").shape[0] == 20
    assert not app.error

    app.multiselect(key="sweep_poolings").set_value(["mean_image"])
    _rerun(app)
    assert set(_lines(_chart(app, "sweep_late_fusion"))) == {"mean_image"}

    before = _lines(_chart(app, "sweep_late_fusion"))["mean_image"]
    app.radio(key="sweep_grouping").set_value("held-out items")
    _rerun(app)
    assert _lines(_chart(app, "sweep_late_fusion"))["mean_image"] != before
    assert "item" in _chart(app, "sweep_late_fusion")["layout"]["title"]["text"]

    app.selectbox(key="sweep_run").set_value("adversarial#2")
    _rerun(app)
    assert "self-consistency" in _frame(app, "table7_rows_late_fusion")["signal"].tolist()
    assert "adversarial_self_consistency" in _chart(app, "lens_late_fusion")["layout"]["title"]["text"]

    app.multiselect(key="sweep_poolings").set_value([])
    _rerun(app)
    assert [e.value for e in app.error] == ["Choose at least one pooling to draw."]


# ------------------------------------------------------------------------------------------- calibration


def test_calibration_recertifies_live_and_says_when_a_target_is_unreachable():
    app = _page("pages/calibration.py")
    assert app.title[0].value.startswith("Calibration")
    shipped = _metrics(app)
    report = json.loads((SAMPLES.gate_dir("late_fusion") / "report.json").read_text())  # the shipped certificate
    assert shipped["Threshold (calibrated)"] == f"{report['threshold']:.3f}"
    assert shipped["Coverage (test)"] == f"{report['test']['coverage']:.1%}"
    metrics_table = _frame(app, "calibration_metrics")
    assert list(metrics_table["stage"]) == ["before", "temperature scaling", "isotonic"]
    assert all("[" in v for v in metrics_table["ECE"])
    reliability = _chart(app, "reliability")
    assert sum(t["type"] == "bar" for t in reliability["data"]) == 3
    vline = lambda: next(s for s in _chart(app, "risk_coverage")["layout"]["shapes"] if s["type"] == "line" and s["x0"] == s["x1"])
    x_before = vline()["x0"]

    app.slider(key="risk_target").set_value(0.2)
    _rerun(app)
    looser = _metrics(app)
    assert float(looser["Threshold (calibrated)"]) < float(shipped["Threshold (calibrated)"])
    assert float(looser["Coverage (test)"].rstrip("%")) > float(shipped["Coverage (test)"].rstrip("%"))
    assert vline()["x0"] > x_before

    app.select_slider(key="risk_delta").set_value(0.01)
    _rerun(app)
    assert _metrics(app)["Certified upper bound"] != looser["Certified upper bound"]
    assert float(_metrics(app)["Coverage (test)"].rstrip("%")) <= float(looser["Coverage (test)"].rstrip("%"))

    app.slider(key="risk_target").set_value(0.02)
    _rerun(app)
    assert len(app.error) == 1 and app.error[0].value.startswith("Unreachable")
    assert "Threshold (calibrated)" not in _metrics(app)

    app.multiselect(key="cal_stages").set_value(["isotonic"])
    _rerun(app)
    assert [t["legendgroup"] for t in _chart(app, "reliability")["data"] if t["type"] == "bar"] == ["isotonic"]
    assert list(_frame(app, "calibration_metrics")["stage"]) == ["isotonic"]


def test_calibration_follows_the_sidebar_model():
    app = _page("pages/calibration.py")
    late = _metrics(app)
    late_curve = _array(_chart(app, "risk_coverage")["data"][0]["y"]).tolist()
    app.sidebar.radio(key="model_choice").set_value(EARLY)
    _rerun(app)
    assert _array(_chart(app, "risk_coverage")["data"][0]["y"]).tolist() != late_curve
    assert _metrics(app) != late


# ------------------------------------------------------------------------------------------- attention


def _scatter_x(app: AppTest) -> list[float]:
    return [v for t in _chart(app, "attn_scatter")["data"] for v in _array(t["x"]).tolist()]


def test_attention_page_signal_layer_sample_and_model_change_what_is_shown():
    app = _page("pages/attention.py")
    assert app.title[0].value == "Attention vs hidden state"
    association = _frame(app, "attn_association")
    assert list(association["signal"]) == ["−attention entropy (layer-mean map)", "probe score"]
    assert float(association["AUROC [95% CI]"][1].split()[0]) > 0.6
    x_mean = _scatter_x(app)

    app.selectbox(key="attn_signal").set_value("cluster_count")
    _rerun(app)
    assert _scatter_x(app) != x_mean
    assert _frame(app, "attn_association")["signal"][0] == "−C_k (layer-mean map)"

    app.selectbox(key="attn_signal_layer").set_value(2)
    _rerun(app)
    at_layer = _scatter_x(app)
    assert _frame(app, "attn_association")["signal"][0] == "−C_k (layer 2)"
    assert "layer 2" in _chart(app, "attn_overlay")["layout"]["title"]["text"]

    overlay = _array(_chart(app, "attn_overlay")["data"][1]["z"]).tolist()
    options = app.selectbox(key="attn_sample").options
    app.selectbox(key="attn_sample").select_index(5)
    _rerun(app)
    assert _array(_chart(app, "attn_overlay")["data"][1]["z"]).tolist() != overlay
    assert len(options) == len(x_mean)

    app.sidebar.radio(key="model_choice").set_value(EARLY)
    _rerun(app)
    assert _scatter_x(app) != at_layer
    assert not app.error


# ------------------------------------------------------------------------------------------- masking


def _masked_bars(app: AppTest) -> list[float]:
    return [_array(t["y"]).tolist()[0] for t in _chart(app, "masking_effect")["data"] if t["name"] == "masked"]


def test_masking_sliders_rerun_the_questions_and_change_the_effect(monkeypatch, tmp_path):
    """VLMREL_MASKING_QUESTIONS keeps the AppTest fast: 12 held-out questions per change instead of 300."""
    import dashboard_common

    monkeypatch.setenv("VLMREL_MASKING_QUESTIONS", "12")
    monkeypatch.setattr(dashboard_common, "LAYER_PROBE_CACHE", tmp_path / "layer_probes")
    app = _page("pages/masking.py")
    assert app.title[0].value.startswith("Neuron masking")
    assert not app.error
    table = _frame(app, "masking_table")
    assert list(table["model"].unique()) == [LATE, EARLY] and set(table["n"]) == {12}
    assert (table["delta"] == 0).all()  # nothing masked yet: the unmasked run itself
    unmasked = _masked_bars(app)

    app.slider(key="masking_patches").set_value(0.5)
    _rerun(app)
    greyed = _frame(app, "masking_table")
    assert (greyed["delta"] != 0).any() and _masked_bars(app) != unmasked

    app.slider(key="masking_patches").set_value(0.0)
    app.slider(key="masking_random").set_value(0.8)
    _rerun(app)
    zeroed = _frame(app, "masking_table")
    assert not zeroed["delta"].equals(greyed["delta"]) and (zeroed["delta"] != 0).any()

    app.slider(key="masking_random").set_value(0.0)
    app.slider(key="masking_top_k").set_value(16)
    _rerun(app)
    top = _frame(app, "masking_table")
    assert not top["delta"].equals(zeroed["delta"])

    app.selectbox(key="masking_layer").set_value(0)
    _rerun(app)
    assert not _frame(app, "masking_table")["delta"].equals(top["delta"])

    app.checkbox(key="masking_compare").uncheck()
    _rerun(app)
    assert list(_frame(app, "masking_table")["model"].unique()) == [LATE]

    before = {m.label: m.value for m in app.metric}
    app.selectbox(key="masking_example").set_value(3)
    _rerun(app)
    assert app.caption[-1].value != "" and {m.label for m in app.metric} == set(before)


# ------------------------------------------------------------------------------------------- monitoring


def test_monitoring_shows_drift_per_comparison_and_the_live_run():
    app = _page("pages/monitoring.py")
    assert app.title[0].value.startswith("Monitoring")
    assert not app.error
    first = _metrics(app)
    assert first["Alert"] == "no" and first["Served automatically"].endswith("%")
    routing = _chart(app, "routing_figure")["data"][0]
    from vlmrel_core.results.gate import load_live_run
    from vlmrel_core.samples.catalog import sample_catalog

    assert sum(_array(routing["y"]).tolist()) == load_live_run(sample_catalog().gate_dir("late_fusion")).n_decisions
    app.radio(key="drift_comparison").set_value("shifted")
    _rerun(app)
    shifted = _metrics(app)
    assert shifted["Alert"] == "yes" and shifted["KL (confidence histogram)"] != first["KL (confidence histogram)"]
    assert "ALERT" in _chart(app, "drift_figure")["layout"]["title"]["text"]
    app.sidebar.radio(key="model_choice").set_value(EARLY)
    _rerun(app)
    assert _metrics(app)["Accuracy of all answers"] != shifted["Accuracy of all answers"]
