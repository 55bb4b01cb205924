"""Per-layer figures built from the shipped report and runs: trace values, not only presence."""

import numpy as np
import pytest

from vlmrel_core import results as R
from vlmrel_core.figures.layers import layer_signals_figure, layer_sweep_figure, logit_lens_figure, probe_score_strip
from vlmrel_core.samples.catalog import sample_catalog

SAMPLES = sample_catalog()


@pytest.fixture(scope="module")
def report():
    return R.load_report(SAMPLES.report_dir("late_fusion"))


def test_layer_sweep_draws_each_pooling_with_its_ci_and_marks_the_chosen_layer(report):
    figure = layer_sweep_figure(report.sweep, table7=report.table7)
    part = report.sweep.part()
    lines = {t.name: t for t in figure.data if t.mode == "lines+markers"}
    assert set(lines) == set(part["pooling"])
    last = part[part["pooling"] == "last_token"].sort_values("layer")
    np.testing.assert_allclose(lines["last_token"].y, last["auroc"])
    bands = [t for t in figure.data if t.fill == "toself" and t.legendgroup == "last_token"]
    np.testing.assert_allclose(bands[0].y, list(last["auroc_high"]) + list(last["auroc_low"])[::-1])
    chosen = report.sweep.selected()
    star = next(t for t in figure.data if t.name.startswith("CV-selected"))
    assert star.x == (int(chosen["layer"]),) and star.y == (pytest.approx(float(chosen["auroc"])),)
    plateau = report.sweep.plateau("last_token")
    rects = [s for s in figure.layout.shapes if s.type == "rect"]
    assert rects[0].x0 == min(plateau) - 0.4 and rects[0].x1 == max(plateau) + 0.4
    hlines = sorted(round(s.y0, 6) for s in figure.layout.shapes if s.type == "line" and s.y0 == s.y1)
    for key in ("max_answer_prob", "item_control", "attention_spatial_entropy"):
        assert round(float(report.signal(key)["auroc"]), 6) in hlines


def test_layer_sweep_pooling_filter_keeps_only_the_chosen_lines_with_their_colours(report):
    full = {t.name: t.line.color for t in layer_sweep_figure(report.sweep).data if t.mode == "lines+markers"}
    figure = layer_sweep_figure(report.sweep, poolings=["mean_image"])
    lines = {t.name: t.line.color for t in figure.data if t.mode == "lines+markers"}
    assert lines == {"mean_image": full["mean_image"]}
    with pytest.raises(ValueError, match="unknown pooling"):
        layer_sweep_figure(report.sweep, poolings=["nope"])


def test_logit_lens_curve_separates_correct_from_wrong():
    curves = R.load_shipped_run("late_fusion", "adversarial").lens_curves()
    figure = logit_lens_figure(curves)
    lines = {t.name.split()[0]: t for t in figure.data if t.mode == "lines+markers"}
    np.testing.assert_allclose(lines["correct"].y, curves.correct_mean)
    np.testing.assert_allclose(lines["wrong"].y, curves.wrong_mean)
    assert lines["correct"].y[-1] > 0 > lines["wrong"].y[-1]  # by the last layer the lens favours the given answer


def test_layer_signals_figure_draws_every_signal(report):
    figure = layer_signals_figure(report.layer_signals)
    run = report.layer_signals["run"].iloc[0]
    part = report.layer_signals[report.layer_signals["run"] == run]
    lines = {t.name: t for t in figure.data if t.mode == "lines+markers"}
    assert set(lines) == set(part["signal"])
    probe = part[part["signal"] == next(s for s in lines if s.startswith("probe"))].sort_values("layer")
    np.testing.assert_allclose(lines[probe["signal"].iloc[0]].y, probe["auroc"])
    with pytest.raises(ValueError, match="no per-layer signals for run"):
        layer_signals_figure(report.layer_signals, "nope")


def test_probe_score_strip_holds_the_scores_and_outlines_the_gate_layer():
    figure = probe_score_strip([0, 1, 2, 3], [0.4, 0.55, 0.7, 0.9], chosen_layer=3)
    assert list(figure.data[0].z[0]) == [0.4, 0.55, 0.7, 0.9] and list(figure.data[0].x) == [0, 1, 2, 3]
    assert figure.layout.shapes[0].x0 == 2.5 and figure.layout.shapes[0].x1 == 3.5
    with pytest.raises(ValueError, match="probabilities"):
        probe_score_strip([0], [1.5])
    with pytest.raises(ValueError, match="3 layers but 2 scores"):
        probe_score_strip([0, 1, 2], [0.1, 0.2])
