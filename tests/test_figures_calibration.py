"""Calibration figures from the shipped gate bundles: reliability bins, risk–coverage, gauge."""

import numpy as np
import pytest

from vlmrel_core import results as R
from vlmrel_core.figures.calibration import confidence_gauge, reliability_figure, risk_coverage_figure
from vlmrel_core.samples.catalog import sample_catalog

SAMPLES = sample_catalog()


@pytest.fixture(scope="module")
def bundle():
    return R.load_gate_bundle(SAMPLES.gate_dir("late_fusion"))


def test_reliability_diagram_draws_stored_bins_before_and_after(bundle):
    probe = bundle.calibration.probe
    figure = reliability_figure(probe)
    curves = [t for t in figure.data if t.type == "scatter" and t.name != "perfect calibration"]
    assert [t.legendgroup for t in curves] == ["before", "temperature_scaling", "isotonic"]
    assert list(curves[0].x) == probe.before.bins.prob_pred and list(curves[0].y) == probe.before.bins.prob_true
    assert list(curves[2].y) == probe.after["isotonic"].bins.prob_true
    assert f"ECE {probe.after['isotonic'].ece:.3f}" in curves[2].name
    bars = [t for t in figure.data if t.type == "bar"]
    assert sum(bars[0].y) == probe.n_eval and len(bars[0].x) == 10
    # a non-probability signal has no 'before' stage: the figure draws the rest
    margin = bundle.calibration.signals["top1_top2_margin"]
    assert [t.legendgroup for t in reliability_figure(margin).data if t.type == "bar"] == ["temperature_scaling", "isotonic"]
    with pytest.raises(ValueError, match="none of the stages"):
        reliability_figure(margin, stages=("before",))


def test_risk_coverage_marks_threshold_target_and_gray_zone(bundle):
    report = bundle.report
    figure = risk_coverage_figure(report)
    assert list(figure.data[0].x) == report.risk_coverage_test.coverage
    assert list(figure.data[0].y) == report.risk_coverage_test.risk
    vline = next(s for s in figure.layout.shapes if s.type == "line" and s.x0 == s.x1)
    assert vline.x0 == pytest.approx(report.test["coverage"])
    hline = next(s for s in figure.layout.shapes if s.type == "line" and s.y0 == s.y1)
    assert hline.y0 == report.risk_certificate["target_risk"] == 0.1
    rect = next(s for s in figure.layout.shapes if s.type == "rect")
    curve = report.risk_coverage_test
    order = np.argsort(curve.thresholds)
    expected = np.interp(report.gray_zone, np.asarray(curve.thresholds)[order], np.asarray(curve.coverage)[order])
    assert (rect.x0, rect.x1) == (pytest.approx(expected[1]), pytest.approx(expected[0]))
    assert rect.x0 < report.test["coverage"] < rect.x1  # the threshold lies inside its gray zone


def test_risk_coverage_marks_a_recertified_rule_instead_of_the_bundle_one(bundle):
    report = bundle.report
    figure = risk_coverage_figure(report, threshold=0.6, coverage=0.7, gray_zone=(0.55, 0.65), target_risk=0.2,
                                  threshold_label="live")
    vline = next(s for s in figure.layout.shapes if s.type == "line" and s.x0 == s.x1)
    hline = next(s for s in figure.layout.shapes if s.type == "line" and s.y0 == s.y1)
    assert vline.x0 == 0.7 and hline.y0 == 0.2
    assert any(a.text == "live" for a in figure.layout.annotations)
    rect = next(s for s in figure.layout.shapes if s.type == "rect")
    assert rect.x0 < rect.x1 and rect.x0 != next(
        s for s in risk_coverage_figure(report).layout.shapes if s.type == "rect").x0


def test_confidence_gauge_carries_value_threshold_and_gray_zone(bundle):
    figure = confidence_gauge(0.8, bundle.threshold, bundle.gray_zone)
    gauge = figure.data[0]
    assert gauge.value == 0.8 and gauge.gauge.threshold.value == bundle.threshold
    assert tuple(gauge.gauge.steps[0].range) == bundle.gray_zone
    assert confidence_gauge(0.3).data[0].gauge.steps == ()
    with pytest.raises(ValueError, match="confidence must be in"):
        confidence_gauge(1.2)
