"""Calibrators: parameter recovery on data with a known temperature, exact JSON round-trips, ranking preserved."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit, logit, softmax
from sklearn.isotonic import IsotonicRegression

from vlmrel_core.gate.calibration import (
    IsotonicCalibrator,
    TemperatureScaler,
    calibrator_from_dict,
    fit_calibrator,
    prob_to_logit,
)
from vlmrel_core.analysis.metrics import auroc, expected_calibration_error

TRUE_TEMPERATURE = 2.5


def _overconfident_binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated logits z (correct ~ Bernoulli(sigmoid z)) reported as 2.5 z: the right T is 2.5."""
    rng = np.random.default_rng(seed)
    calibrated_logits = rng.normal(0.5, 2.0, n)
    correct = (rng.uniform(size=n) < expit(calibrated_logits)).astype(int)
    return TRUE_TEMPERATURE * calibrated_logits, correct


def _json_round_trip(data: dict) -> dict:
    return json.loads(json.dumps(data))


def test_prob_to_logit_clips_and_inverts() -> None:
    np.testing.assert_allclose(prob_to_logit([0.0, 1.0]), [logit(1e-6), logit(1 - 1e-6)])
    interior = np.array([0.01, 0.3, 0.5, 0.9])
    np.testing.assert_allclose(expit(prob_to_logit(interior)), interior, rtol=1e-12)
    with pytest.raises(ValueError):
        prob_to_logit([0.5, 1.1])


def test_temperature_recovered_from_logits_within_5_percent() -> None:
    logits, correct = _overconfident_binary(20_000, seed=0)
    scaler = TemperatureScaler().fit(logits, correct)
    assert scaler.temperature == pytest.approx(TRUE_TEMPERATURE, rel=0.05)
    assert not scaler.hit_bound


def test_temperature_from_probabilities_equals_fit_on_their_logits() -> None:
    logits, correct = _overconfident_binary(5_000, seed=1)
    probs = expit(logits)
    from_probs = fit_calibrator("temperature_scaling", probs, correct, score_kind="prob")
    from_logits = TemperatureScaler().fit(prob_to_logit(probs), correct)
    assert isinstance(from_probs, TemperatureScaler)
    assert from_probs.temperature == pytest.approx(from_logits.temperature, rel=1e-9)
    np.testing.assert_allclose(from_probs.transform(probs), from_logits.transform(prob_to_logit(probs)))


def test_temperature_scaling_reduces_calibration_error_on_held_out_data() -> None:
    fit_logits, fit_correct = _overconfident_binary(5_000, seed=2)
    test_logits, test_correct = _overconfident_binary(5_000, seed=3)
    scaler = TemperatureScaler().fit(fit_logits, fit_correct)
    ece_raw = expected_calibration_error(test_correct, expit(test_logits))
    ece_calibrated = expected_calibration_error(test_correct, scaler.transform(test_logits))
    assert ece_raw > 0.05
    assert ece_calibrated < 0.02


def test_multiclass_temperature_recovered() -> None:
    rng = np.random.default_rng(4)
    n, k = 8_000, 5
    calibrated_logits = rng.normal(0.0, 2.0, (n, k))
    cumulative = np.cumsum(softmax(calibrated_logits, axis=1), axis=1)
    labels = np.minimum((rng.uniform(size=(n, 1)) > cumulative).sum(axis=1), k - 1)
    scaler = TemperatureScaler().fit(0.5 * calibrated_logits, labels)  # underconfident: T = 0.5
    assert scaler.temperature == pytest.approx(0.5, rel=0.05)
    assert scaler.n_classes == k
    probs = scaler.transform(0.5 * calibrated_logits)
    assert probs.shape == (n, k)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="5-class"):
        scaler.transform(np.zeros((3, 4)))


def test_temperature_round_trip_and_auroc_unchanged() -> None:
    logits, correct = _overconfident_binary(3_000, seed=5)
    scaler = fit_calibrator("temperature_scaling", logits, correct, score_kind="logit")
    serialised = _json_round_trip(scaler.to_dict())
    assert serialised == {"method": "temperature_scaling", "temperature": scaler.temperature,
                          "score_kind": "logit", "n_classes": None}
    rebuilt = calibrator_from_dict(serialised)
    np.testing.assert_array_equal(rebuilt.transform(logits), scaler.transform(logits))
    # Strictly increasing map: the ranking, hence the AUROC, is exactly unchanged.
    assert auroc(correct, scaler.transform(logits)) == auroc(correct, logits)


def test_isotonic_matches_sklearn_and_round_trips_exactly() -> None:
    rng = np.random.default_rng(6)
    scores = rng.uniform(size=1_000)
    correct = (rng.uniform(size=1_000) < scores**2).astype(int)
    calibrator = fit_calibrator("isotonic", scores, correct)
    assert isinstance(calibrator, IsotonicCalibrator)
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, correct)
    queries = np.concatenate([rng.uniform(-0.5, 1.5, 500), scores])  # includes out-of-range points
    np.testing.assert_allclose(calibrator.transform(queries), reference.predict(queries), rtol=0, atol=1e-12)

    serialised = _json_round_trip(calibrator.to_dict())
    assert set(serialised) == {"method", "x_thresholds", "y_thresholds"}
    rebuilt = calibrator_from_dict(serialised)
    np.testing.assert_array_equal(rebuilt.transform(queries), calibrator.transform(queries))

    calibrated = calibrator.transform(np.sort(queries))
    assert calibrated.min() >= 0 and calibrated.max() <= 1
    assert np.all(np.diff(calibrated) >= 0)  # non-decreasing


def test_isotonic_only_creates_ties() -> None:
    rng = np.random.default_rng(7)
    fit_scores = rng.uniform(size=600)
    fit_correct = (rng.uniform(size=600) < fit_scores).astype(int)
    calibrator = IsotonicCalibrator().fit(fit_scores, fit_correct)
    # Fitting data: the PAV fit traces the ROC convex hull, so AUROC cannot drop.
    assert auroc(fit_correct, calibrator.transform(fit_scores)) >= auroc(fit_correct, fit_scores)
    # New data: the order is weakly preserved — a higher score never gets a lower probability.
    new_scores = rng.uniform(size=400)
    order = np.argsort(new_scores)
    assert np.all(np.diff(calibrator.transform(new_scores)[order]) >= 0)
    assert len(np.unique(calibrator.transform(new_scores))) < len(np.unique(new_scores))  # ties were created


def test_factory_and_loader_reject_unknown_or_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibrator("platt", [0.1, 0.9], [0, 1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown calibrator method"):
        calibrator_from_dict({"method": "pickle"})
    with pytest.raises(ValueError, match="positive"):
        calibrator_from_dict({"method": "temperature_scaling", "temperature": -1.0})
    with pytest.raises(ValueError, match="non-decreasing"):
        calibrator_from_dict({"method": "isotonic", "x_thresholds": [0, 1], "y_thresholds": [0.9, 0.1]})
    with pytest.raises(ValueError, match="both correct and wrong"):
        fit_calibrator("isotonic", [0.1, 0.9], [1, 1])
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureScaler().transform([0.0])
