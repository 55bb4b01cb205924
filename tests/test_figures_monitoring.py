"""Drift and intervention figures: the shipped drift.json (no per-window values), a per-window file, ablation bars."""

import json

import numpy as np
import pytest

from vlmrel_core import results as R
from vlmrel_core.figures.interventions import masking_effect_figure
from vlmrel_core.figures.monitoring import drift_figure, routing_figure
from vlmrel_core.samples.catalog import sample_catalog

SAMPLES = sample_catalog()


def test_the_shipped_drift_checks_carry_per_window_values():
    shifted = R.load_drift(SAMPLES.gate_file("late_fusion", "drift.json"))["shifted"]
    figure = drift_figure(shifted, "shifted")
    assert len(figure.data[0].y) >= 2 and "per-window values not stored" not in str(figure.layout.annotations)


def test_drift_figure_on_a_file_without_window_values_shows_the_whole_run_and_says_so(tmp_path):
    """Bundles written before drift.json carried ``windows.values`` still draw (one bar for the whole run)."""
    raw = json.loads(SAMPLES.gate_file("late_fusion", "drift.json").read_text())
    for entry in raw.values():
        entry["windows"].pop("values")
    (tmp_path / "drift.json").write_text(json.dumps(raw))
    shifted = R.load_drift(tmp_path)["shifted"]
    figure = drift_figure(shifted, "shifted")
    assert list(figure.data[0].y) == [shifted.kl] and list(figure.data[1].y) == [shifted.embedding_shift]
    assert figure.data[0].marker.color == ("#d62728",)  # alert → red
    assert "per-window values not stored" in figure.layout.annotations[-1].text
    thresholds = sorted(s.y0 for s in figure.layout.shapes)
    assert thresholds == sorted([shifted.thresholds["kl"], shifted.thresholds["embedding_shift"]])


def test_drift_figure_draws_each_window(tmp_path):
    raw = json.loads(SAMPLES.gate_file("late_fusion", "drift.json").read_text())
    values = [{"index": i, "start": 200 * i, "stop": 200 * (i + 1), "n": 200, "kl": kl, "ks_statistic": 0.1,
               "ks_pvalue": 0.3, "embedding_shift": 0.01 * (i + 1), "mean_confidence": 0.7, "alert": kl > 0.15,
               "reasons": ["KL"] if kl > 0.15 else []} for i, kl in enumerate([0.05, 0.1, 0.4])]
    raw["in_domain"]["windows"] = {"size": 200, "n": 3, "n_alert": 1, "values": values}
    (tmp_path / "drift.json").write_text(json.dumps(raw))
    figure = drift_figure(R.load_drift(tmp_path)["in_domain"])
    assert list(figure.data[0].x) == ["0–200", "200–400", "400–600"] and list(figure.data[0].y) == [0.05, 0.1, 0.4]
    assert list(figure.data[0].marker.color) == ["#2ca02c", "#2ca02c", "#d62728"]
    np.testing.assert_allclose(figure.data[1].y, [0.01, 0.02, 0.03])
    assert "1/3 windows alert" in figure.layout.title.text


def test_masking_effect_bars_side_by_side_with_paired_cis():
    table = R.load_shipped_ablation("adversarial")
    figure = masking_effect_figure(table)
    assert [t.name.split()[0] for t in figure.data] == ["late_fusion", "early_fusion"]
    rows = table.overall()
    late = rows[rows["model"] == "late_fusion"]
    np.testing.assert_allclose(figure.data[0].y, late["delta_pp"])
    np.testing.assert_allclose(figure.data[0].error_y.array, late["ci_high_pp"] - late["delta_pp"])
    np.testing.assert_allclose(figure.data[0].error_y.arrayminus, late["delta_pp"] - late["ci_low_pp"])
    assert figure.data[0].x[0] == "top-5 probe dims" and "grey 30% most-attended patches" in figure.data[0].x
    masks = masking_effect_figure(table, conditions=["mask_high", "mask_random"])
    assert len(masks.data[1].x) == 2
    with pytest.raises(ValueError, match="no rows for conditions"):
        masking_effect_figure(table, conditions=["nope"])


def test_routing_figure_has_one_bar_per_action_with_the_counts():
    live = R.load_live_run(SAMPLES.gate_dir("late_fusion"))
    bar = routing_figure(live).data[0]
    assert dict(zip(bar.x, bar.y)) == {
        {"generate": "served", "fallback": "fallback", "self_consistency": "gray zone → self-consistency"}[k]: v
        for k, v in live.actions.items()}
    with pytest.raises(ValueError, match="no routing actions"):
        routing_figure(live.model_copy(update={"actions": {}}))
