"""gate.monitor_batch: the edited-YAML parser, per-window drift checks of a batch, routing/novelty shares and the
recalibration check, on the shipped late-fusion bundle (no model needed: decisions are built from its references)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlmrel_core.data.loader import VQASample
from vlmrel_core.gate.batch import BatchGateResult
from vlmrel_core.gate.bundle import load_gate_components
from vlmrel_core.gate.config import GateConfigError
from vlmrel_core.gate.monitor_batch import capturing_states, monitor_batch, parse_gate_yaml
from vlmrel_core.gate.records import GateDecision
from vlmrel_core.samples.catalog import sample_catalog

BUNDLE = sample_catalog().gate_dir("late_fusion")
TEXT = (BUNDLE / "gate.yaml").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def components():
    return load_gate_components(capturing_states(parse_gate_yaml(TEXT, BUNDLE)))


def test_shipped_yaml_parses_with_paths_resolved_against_the_bundle():
    config = parse_gate_yaml(TEXT, BUNDLE)
    assert config.resolve(config.monitor.probe.path) == (BUNDLE / "probe").resolve()
    assert capturing_states(config).monitor.logging.capture_states and not config.monitor.logging.capture_states


@pytest.mark.parametrize("old, new, field", [
    ("gray_zone_action: self_consistency_k5", "gray_zone_action: self_consistency_k100000", "gray_zone_action"),
    ("window: 200, ks_alpha", "window: 1, ks_alpha", "monitoring.window"),
    ("  max_new_tokens: 8\n", "  max_new_tokens: 8\n  max_new_tokens: 9\n", "max_new_tokens"),
    ("  max_new_tokens: 8\n", "  self_consistency_k: 100000\n", "self_consistency_k"),
])
def test_bad_edits_name_the_field(old, new, field):
    assert old in TEXT
    with pytest.raises(GateConfigError, match=field):
        parse_gate_yaml(TEXT.replace(old, new), BUNDLE)


def test_unsafe_yaml_is_refused():
    with pytest.raises(GateConfigError, match="YAML"):
        parse_gate_yaml("reliability_monitor: !!python/object:os.system {}", BUNDLE)


def _decision(confidence: float, state: np.ndarray, features: np.ndarray, action: str = "generate",
              reason: str | None = None) -> GateDecision:
    return GateDecision(answer="yes", answer_text="yes", confidence=float(confidence), action=action,
                        accepted=action == "generate", route="answer", certified=False, self_consistency=None,
                        evidence={"state": state.tolist(), "image_features": features.tolist(),
                                  "raw_probe_score": float(confidence)},
                        reason=reason)


def _batch(components, shifted: bool, n: int = 40, labelled: bool = False) -> BatchGateResult:
    rng = np.random.default_rng(0)
    ref = components.novelty.reference_states
    conf_ref = components.calibration.drift_reference.confidence
    rows = rng.choice(ref.shape[0], n)
    states = ref[rows] + (5.0 * ref.std(axis=0) + 1.0 if shifted else 0.0)
    ref_features = components.novelty.image.reference_features  # row-aligned with the reference states
    features = ref_features[rows] + (5.0 * ref_features.std(axis=0) if shifted else 0.0)
    confidence = np.full(n, 0.99) if shifted else rng.choice(conf_ref, n)
    decisions = [_decision(c, s, f, "fallback" if shifted and i % 4 == 0 else "generate",
                           "out of distribution" if shifted and i % 4 == 0 else None)
                 for i, (c, s, f) in enumerate(zip(confidence, states, features))]
    samples = [VQASample(f"q{i}", Path(f"img{i % 20}.png"), "is there a circle?", "yes" if labelled else None)
               for i in range(n)]
    correct = [bool(rng.random() < c) for c in confidence] if labelled else [None] * n
    return BatchGateResult(samples, decisions, correct)


def test_in_domain_windows_stay_quiet_and_a_shift_alerts(components):
    quiet = monitor_batch(components, _batch(components, shifted=False), window=20)
    loud = monitor_batch(components, _batch(components, shifted=True), window=20)
    assert len(quiet.windows) == len(loud.windows) == 2
    assert quiet.window_tests == ["classifier", "novelty_rate", "image_classifier"]
    assert not any(w["window_alarm"] for w in quiet.windows)
    assert all(w["alert"] and w["window_alarm"] for w in loud.windows)
    assert all(w["kl"] > quiet.thresholds["kl"] for w in loud.windows)
    assert loud.novelty_share == pytest.approx(0.25) and quiet.novelty_share == 0.0
    assert loud.routing_shares["fallback"] == pytest.approx(0.25)
    frame = loud.window_frame()
    assert list(frame["start"]) == [0, 20] and "classifier_pvalue" in frame
    assert quiet.recalibration is None  # unlabelled


def test_small_windows_skip_the_ood_tests_and_partial_windows_are_left_out(components):
    batch = monitor_batch(components, _batch(components, shifted=True, n=25), window=10)
    assert [w["start"] for w in batch.windows] == [0, 10] and batch.window_tests == []
    assert any("at least 20" in note for note in batch.notes)


def test_recalibration_needs_enough_labels_and_reports_ece(components):
    small = monitor_batch(components, _batch(components, shifted=False, n=40, labelled=True), window=20)
    assert small.recalibration["done"] is False and "60" in small.recalibration["reason"]
    big = monitor_batch(components, _batch(components, shifted=False, n=80, labelled=True), window=40)
    assert big.recalibration["done"] is True
    assert 0 <= big.recalibration["ece_after"] <= 1 and 0 <= big.recalibration["ece_before"] <= 1


def test_figures_draw_windows_tests_and_routing(components):
    from vlmrel_core.figures.monitor_batch import batch_routing_figure, window_confidence_figure, window_tests_figure
    from vlmrel_core.figures.style import CORRECT, WRONG

    batch = monitor_batch(components, _batch(components, shifted=True), window=20)
    assert len(window_confidence_figure(batch).data) == 1 + len(batch.windows)
    tests = window_tests_figure(batch)
    assert len(tests.data) == 6  # KL, KS, embedding shift, classifier, novelty_rate, image_classifier
    assert all(colour == WRONG for colour in tests.data[0].marker.color)  # every shifted window's KL alarms
    quiet = window_tests_figure(monitor_batch(components, _batch(components, shifted=False), window=20))
    assert all(colour == CORRECT for trace in quiet.data[3:] for colour in trace.marker.color)  # OOD tests quiet
    routing = batch_routing_figure(batch).data[0]
    assert list(routing.y)[-1] == pytest.approx(0.25)
