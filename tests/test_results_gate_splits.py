"""A gate bundle's split re-derived from its run: it reproduces the shipped certificate, test coverage and
calibration metrics exactly, certifies live at other targets, and says when a target is unreachable."""

import numpy as np
import pytest

from vlmrel_core.analysis.metrics import brier_score, expected_calibration_error, max_calibration_error
from vlmrel_core.gate.risk import UnreachableRiskTarget
from vlmrel_core.results import load_gate_bundle
from vlmrel_core.results.files import ResultsError
from vlmrel_core.results.gate_splits import calibration_metric_cis, certify_on_split, gate_split_scores
from vlmrel_core.results.shipped import load_shipped_run
from vlmrel_core.samples.catalog import sample_catalog

SAMPLES = sample_catalog()


@pytest.fixture(scope="module")
def bundle():
    return load_gate_bundle(SAMPLES.gate_dir("late_fusion"))


@pytest.fixture(scope="module")
def scores(bundle):
    return gate_split_scores(bundle, load_shipped_run("late_fusion", "adversarial"))


def test_split_matches_the_bundle_and_reproduces_its_certificate(bundle, scores):
    split = bundle.report.split
    assert scores.calibration.size == split["n_calibration"] and scores.test.size == split["n_test"]
    assert not set(scores.calibration) & set(scores.test)
    certified = certify_on_split(scores, 0.1, 0.1)
    shipped = bundle.report.risk_certificate
    assert certified.certificate.threshold == pytest.approx(shipped["threshold"])
    assert certified.certificate.n_kept == shipped["n_kept"]
    assert certified.calibrated_threshold == pytest.approx(shipped["calibrated_threshold"], abs=1e-6)
    assert certified.test_coverage == pytest.approx(bundle.report.test["coverage"])
    assert certified.test_risk == pytest.approx(bundle.report.test["realised_risk"])


def test_stored_calibration_metrics_are_recomputed_on_the_test_rows(bundle, scores):
    probe = bundle.calibration.probe
    for method, stored in [("before", probe.before), *probe.after.items()]:
        conf, correct = scores.test_rows(method)
        assert expected_calibration_error(correct, conf, n_bins=10) == pytest.approx(stored.ece)
        assert brier_score(correct, conf) == pytest.approx(stored.brier)


def test_a_looser_target_keeps_more_and_an_impossible_one_is_unreachable(scores):
    tight, loose = certify_on_split(scores, 0.1, 0.1), certify_on_split(scores, 0.2, 0.1)
    assert loose.certificate.coverage > tight.certificate.coverage and loose.test_n_kept > tight.test_n_kept
    assert loose.certificate.risk_upper_bound <= 0.2
    with pytest.raises(UnreachableRiskTarget):
        certify_on_split(scores, 0.01, 0.1)


def test_unknown_method_and_wrong_run_fail_by_name(bundle, scores):
    with pytest.raises(ResultsError, match="no calibration method"):
        scores.test_rows("platt")
    with pytest.raises(ResultsError, match="re-derived split"):
        gate_split_scores(bundle, load_shipped_run("late_fusion", "random"))


def test_calibration_metric_cis_hold_the_point_values_and_narrow_with_n():
    rng = np.random.default_rng(1)
    prob = rng.uniform(size=2000)
    correct = (rng.uniform(size=2000) < prob ** 1.5).astype(int)
    small = calibration_metric_cis(correct[:200], prob[:200], n_boot=300)
    large = calibration_metric_cis(correct, prob, n_boot=300)
    assert large["ece"].value == pytest.approx(expected_calibration_error(correct, prob, n_bins=10))
    assert large["mce"].value == pytest.approx(max_calibration_error(correct, prob, n_bins=10))
    assert large["brier"].value == pytest.approx(brier_score(correct, prob))
    for name, estimate in large.items():
        assert estimate.low <= estimate.value <= estimate.high or name == "ece"  # ECE is biased up: point may sit low
        assert estimate.high - estimate.low < small[name].high - small[name].low
    with pytest.raises(ValueError, match="0/1"):
        calibration_metric_cis([0, 2], [0.1, 0.2])


def test_held_out_samples_are_the_test_questions_in_run_order(scores):
    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.results.gate_splits import held_out_samples

    run = load_shipped_run("late_fusion", "adversarial")
    samples = load_vqa_jsonl(SAMPLES.dataset("adversarial"))
    chosen = held_out_samples(scores, run, samples, limit=7)
    expected = run.rows.iloc[scores.test[:7]]
    assert [s.sample_id for s in chosen] == list(expected["sample_id"])
    assert [s.question for s in chosen] == list(expected["question"])
    with pytest.raises(ResultsError, match="not in the dataset"):
        held_out_samples(scores, run, samples[:10])
