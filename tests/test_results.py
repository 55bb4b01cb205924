"""Results loaders: every shipped artifact read back through the catalog, values checked against the raw files."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from vlmrel_core import results as R
from vlmrel_core.samples.catalog import ABLATION_TABLES, FAMILIES, RUN_NAMES, sample_catalog

SAMPLES = sample_catalog()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_shipped_run_reads_back_through_the_store(family):
    for name in RUN_NAMES:
        run = R.load_shipped_run(family, name)
        raw = json.loads((SAMPLES.run_dir(family, name) / "manifest.json").read_text())
        assert run.manifest.model_fingerprint == raw["model_fingerprint"]
        assert len(run.rows) == sum(s["n_rows"] for s in raw["shards"]) == raw["n_samples"]
    assert R.load_run_manifest(SAMPLES.run_dir(family, "random")).layers == raw["layers"]


def test_lens_curves_and_attention_maps_match_the_tensors():
    run = R.load_shipped_run("late_fusion", "adversarial")
    logodds = run.reader.tensor("lens_logodds").astype(np.float64)
    sign = np.where(run.rows["label"] == "yes", 1.0, -1.0)
    correct = run.rows["correct"].to_numpy().astype(bool)
    curves = run.lens_curves()
    np.testing.assert_allclose(curves.correct_mean, (logodds * sign[:, None])[correct].mean(axis=0))
    np.testing.assert_allclose(curves.wrong_mean, (logodds * sign[:, None])[~correct].mean(axis=0))
    assert curves.n_correct + curves.n_wrong == len(run.rows)
    assert np.all(curves.correct_low <= curves.correct_mean) and np.all(curves.correct_mean <= curves.correct_high)
    grid = run.attention_map(5, layer=2)
    assert grid.shape == (8, 8)
    np.testing.assert_allclose(grid.ravel(), run.reader.tensor("attention_image")[5, 2, :64], rtol=1e-6)
    with pytest.raises(R.ResultsError, match="layer 9 not extracted"):
        run.attention_map(0, layer=9)


@pytest.mark.parametrize("family", FAMILIES)
def test_report_tables_match_the_raw_files(family):
    report = R.load_report(SAMPLES.report_dir(family))
    raw = json.loads(SAMPLES.report_file(family, "report.json").read_text())
    assert [r.name for r in report.summary.runs] == [r["name"] for r in raw["runs"]]
    first = raw["runs"][0]
    assert report.summary.runs[0].sweep["image"].cv_selected.auroc == first["sweep"]["image"]["cv_selected"]["auroc"]
    assert report.summary.runs[0].claim.holds is first["claim"]["holds"]
    for name, frame in [("table7.csv", report.table7), ("gains.csv", report.gains), ("transfer.csv", report.transfer),
                        ("layer_signals.csv", report.layer_signals), ("sweep.csv", report.sweep.frame)]:
        raw_frame = pd.read_csv(SAMPLES.report_file(family, name))
        assert len(frame) == len(raw_frame) and list(frame.columns) == list(raw_frame.columns)
        np.testing.assert_allclose(frame["auroc" if "auroc" in frame else frame.columns[4]].to_numpy(dtype=float),
                                   raw_frame["auroc" if "auroc" in frame else frame.columns[4]].to_numpy(dtype=float))
    selected = report.sweep.selected()
    cv = first["sweep"]["image"]["cv_selected"]
    assert (selected["pooling"], int(selected["layer"])) == (cv["pooling"], cv["layer"])
    assert report.sweep.plateau("last_token") == first["sweep"]["image"]["plateau"]["last_token"]
    assert report.signal("max_answer_prob")["auroc"] == pytest.approx(
        float(pd.read_csv(SAMPLES.report_file(family, "table7.csv")).query("key == 'max_answer_prob'").iloc[0]["auroc"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_bundle_calibration_and_live_run_match_the_raw_files(family):
    bundle = R.load_gate_bundle(SAMPLES.gate_dir(family))
    raw_report = json.loads(SAMPLES.gate_file(family, "report.json").read_text())
    raw_yaml = yaml.safe_load(SAMPLES.gate_config(family).read_text())["reliability_monitor"]
    assert bundle.threshold == raw_report["threshold"]
    assert list(bundle.gray_zone) == raw_yaml["routing"]["gray_zone_bounds"]
    assert bundle.components.probe.info.layers == [raw_report["layer"]] == [raw_yaml["target_layer"]]
    assert bundle.report.risk_coverage_test.coverage == raw_report["risk_coverage_test"]["coverage"]
    cal = bundle.calibration
    raw_cal = json.loads(SAMPLES.gate_file(family, "calibration.json").read_text())
    assert cal.bundle.probe_calibrator.to_dict()["method"] == raw_cal["probe"]["method"]
    probe = raw_report["calibration"]["probe"]
    assert cal.probe.before.ece == probe["before"]["ece"] and cal.probe.before.bins.prob_true == probe["before"]["bins"]["prob_true"]
    for method in ("temperature_scaling", "isotonic"):
        assert cal.probe.after[method].brier == probe["after"][method]["brier"]
        assert cal.probe.after[method].mce == probe["after"][method]["mce"]
    centres, counts = cal.probe.before.bins.histogram()
    assert counts.sum() == probe["n_eval"] and centres.size == len(probe["before"]["bins"]["bin_edges"]) - 1
    summary = cal.summary()
    assert summary.query("signal == 'probe' and stage == 'isotonic'")["ece"].item() == raw_report["ece_after_by_method"]["isotonic"]
    assert summary.query("signal == 'top1_top2_margin' and stage == 'before'").empty  # not a probability: no 'before'
    live = R.load_live_run(SAMPLES.gate_dir(family))
    raw_live = json.loads(SAMPLES.gate_file(family, "live_run.json").read_text())
    assert live.actions == raw_live["actions"] and live.cost_multiplier == raw_live["cost_multiplier"]
    assert sum(live.actions.values()) == live.n_decisions


@pytest.mark.parametrize("family", FAMILIES)
def test_drift_reads_the_current_schema(family):
    drift = R.load_drift(SAMPLES.gate_file(family, "drift.json"))
    raw = json.loads(SAMPLES.gate_file(family, "drift.json").read_text())
    assert set(drift.comparisons) == set(raw)
    for name, comparison in drift.comparisons.items():
        assert comparison.kl == raw[name]["kl"] and comparison.alert is raw[name]["alert"]
        assert comparison.windows.n == raw[name]["windows"]["n"]
    assert drift["shifted"].alert and not drift["in_domain"].alert


def _windows(n_alert: int) -> list[dict]:
    return [{"index": i, "start": 200 * i, "stop": 200 * (i + 1), "n": 200, "kl": 0.2 * i, "ks_statistic": 0.1,
             "ks_pvalue": 0.5, "embedding_shift": None, "mean_confidence": 0.7, "alert": i < n_alert,
             "reasons": ["kl"] if i < n_alert else []} for i in range(3)]


def test_drift_reads_per_window_values_and_checks_their_counts(tmp_path):
    raw = json.loads(SAMPLES.gate_file("late_fusion", "drift.json").read_text())
    raw["shifted"]["windows"] = {"size": 200, "n": 3, "n_alert": 1, "values": _windows(1)}
    path = tmp_path / "drift.json"
    path.write_text(json.dumps(raw))
    frame = R.load_drift(path)["shifted"].window_frame()
    assert list(frame["kl"]) == [0.0, 0.2, 0.4] and list(frame["alert"]) == [True, False, False]
    raw["shifted"]["windows"]["n_alert"] = 2
    path.write_text(json.dumps(raw))
    with pytest.raises(R.ResultsError, match=r"drift.json is not a valid .*n_alert=2"):
        R.load_drift(path)


@pytest.mark.parametrize("table", ABLATION_TABLES)
def test_ablation_tables_match_the_raw_files(table):
    ablation = R.load_shipped_ablation(table)
    raw = pd.read_csv(SAMPLES.ablation_table(table))
    np.testing.assert_allclose(ablation.frame["delta_pp"], raw["delta_pp"])
    assert ablation.models() == list(dict.fromkeys(raw["model"]))
    overall = ablation.overall()
    assert set(overall["question_type"]) == {"all"} and len(overall) == (raw["question_type"] == "all").sum()


def test_family_results_bundle_everything():
    results = R.load_family_results("early_fusion")
    assert results.report.summary.runs[0].name.startswith("early_fusion/")
    assert results.gate.report.fusion == "early"


def test_damaged_files_fail_naming_the_file(tmp_path):
    report_dir = tmp_path / "report"
    shutil.copytree(SAMPLES.report_dir("late_fusion"), report_dir, ignore=shutil.ignore_patterns("probes"))
    pd.read_csv(report_dir / "sweep.csv").drop(columns=["in_plateau"]).to_csv(report_dir / "sweep.csv", index=False)
    with pytest.raises(R.ResultsError, match=r"sweep.csv is not a layer sweep table: missing columns \['in_plateau'\]"):
        R.load_report(report_dir)
    (report_dir / "report.json").write_text("{not json")
    with pytest.raises(R.ResultsError, match="report.json is not valid JSON"):
        R.load_report_summary(report_dir)
    gate_dir = tmp_path / "gate"
    shutil.copytree(SAMPLES.gate_dir("late_fusion"), gate_dir)
    data = json.loads((gate_dir / "report.json").read_text())
    data["calibration"]["probe"]["before"]["bins"]["counts"].pop()
    (gate_dir / "report.json").write_text(json.dumps(data))
    with pytest.raises(R.ResultsError, match=r"report.json is not a valid GateReport: calibration.probe.before.bins"):
        R.load_gate_report(gate_dir)
    with pytest.raises(R.ResultsError, match="live gate run .* not found: .*nowhere"):
        R.load_live_run(tmp_path / "nowhere")
    with pytest.raises(R.ResultsError, match="no manifest"):
        R.load_run(tmp_path)
    moved = R.load_run(SAMPLES.run_dir("late_fusion", "random"), image_root=tmp_path)
    with pytest.raises(R.ResultsError, match=r"image of row 0 not found at .*images/0000000.png"):
        moved.image_path(0)


def test_repeated_run_blocks_get_the_report_names_of_their_runs():
    report = R.load_report(sample_catalog().report_dir("late_fusion"))
    names = [run.name for run in report.summary.runs]
    assert set(report.table7["run"]) == set(names) == set(report.sweep.runs())
    second = report.table7[report.table7["run"] == "late_fusion/adversarial#2"]
    assert "self_consistency" in set(second["key"]) and "self_consistency" not in set(
        report.table7[report.table7["run"] == "late_fusion/adversarial"]["key"])
    assert not report.table7.duplicated(["run", "grouping", "key"]).any()
    assert not report.layer_signals.duplicated(["run", "signal", "layer"]).any()


def test_name_repeated_runs_leaves_distinct_runs_alone():
    frame = pd.DataFrame({"run": ["a", "a", "b", "a", "a"], "key": ["x", "y", "x", "x", "z"]})
    named = R.report.name_repeated_runs(frame, ["a", "b", "a#2"], ("key",))
    assert named["run"].tolist() == ["a", "a", "b", "a#2", "a#2"]
    again = R.report.name_repeated_runs(frame.iloc[:3], ["a", "b"], ("key",))
    assert again["run"].tolist() == ["a", "a", "b"]
