"""Drift monitor: known KL values, a real shift fires, in-domain resamples stay quiet, recalibration guards."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from vlmrel_core.gate.calibration import IsotonicCalibrator, TemperatureScaler
from vlmrel_core.gate.drift import DriftMonitor, DriftReport, histogram_kl, recalibrate
from vlmrel_core.analysis.metrics import expected_calibration_error

EMBEDDING_DIM = 32


def _reference_monitor(rng: np.random.Generator, **kwargs: object) -> DriftMonitor:
    reference_embeddings = rng.normal(1.0, 1.0, (2_000, EMBEDDING_DIM))
    return DriftMonitor(
        rng.beta(8, 2, 5_000), reference_embedding_mean=reference_embeddings.mean(axis=0), **kwargs
    )


def test_histogram_kl_known_values() -> None:
    same = np.linspace(0.01, 0.99, 100)
    assert histogram_kl(same, same) == pytest.approx(0.0, abs=1e-12)
    # Reference split evenly over two bins, current all in the first: KL = log 2 (up to the eps smoothing).
    reference = np.array([0.25, 0.75])
    current = np.array([0.1, 0.2, 0.3])
    assert histogram_kl(reference, current, bins=2) == pytest.approx(math.log(2), abs=1e-4)
    # Direction is KL(current || reference): compare with scipy on the same smoothed histograms.
    reference = np.array([0.05] * 9 + [0.95])
    current = np.array([0.05] * 5 + [0.95] * 5)
    p_current = np.array([0.5, 0.5]) + 1e-6
    p_reference = np.array([0.9, 0.1]) + 1e-6
    expected = stats.entropy(p_current / p_current.sum(), p_reference / p_reference.sum())
    assert histogram_kl(reference, current, bins=2) == pytest.approx(expected, rel=1e-9)
    assert histogram_kl(current, reference, bins=2) != pytest.approx(expected, rel=1e-3)


def test_histogram_kl_counts_out_of_range_mass_in_edge_bins() -> None:
    reference = np.full(10, 0.95)
    assert histogram_kl(reference, np.full(10, 1.7)) == pytest.approx(0.0, abs=1e-9)  # clipped into the top bin
    assert histogram_kl(reference, np.full(10, -3.0)) > 10  # all mass moved to an empty bin


def test_in_domain_windows_do_not_alert() -> None:
    rng = np.random.default_rng(0)
    monitor = _reference_monitor(rng)
    reports = [
        monitor.check(rng.beta(8, 2, 200), current_embeddings=rng.normal(1.0, 1.0, (200, EMBEDDING_DIM)))
        for _ in range(20)
    ]
    assert sum(report.alert for report in reports) <= 1
    assert max(report.kl for report in reports) < 0.1  # expected KL of a 200-sample window ~ 9 / 400
    assert max(report.embedding_shift for report in reports) < 0.01


def test_shifted_confidence_fires_with_reasons() -> None:
    rng = np.random.default_rng(1)
    monitor = _reference_monitor(rng)
    report = monitor.check(rng.beta(3, 3, 200))  # a harder domain: confidence drops and spreads
    assert isinstance(report, DriftReport)
    assert report.alert and report.kl > 0.15 and report.ks_pvalue < 0.01
    assert any("KL" in reason for reason in report.reasons)
    assert any("KS" in reason for reason in report.reasons)
    assert report.embedding_shift is None  # no embeddings given
    assert report.to_dict()["reasons"] == report.reasons


def test_shifted_embeddings_fire() -> None:
    rng = np.random.default_rng(2)
    monitor = _reference_monitor(rng)
    shifted = rng.normal(1.0, 1.0, (200, EMBEDDING_DIM))
    shifted[:, : EMBEDDING_DIM // 2] -= 1.0  # half of the mean direction disappears: cosine distance ~0.29
    report = monitor.check(rng.beta(8, 2, 200), current_embeddings=shifted)
    assert report.embedding_shift == pytest.approx(1 - 1 / math.sqrt(2), abs=0.05)
    assert report.alert and any("embedding" in reason for reason in report.reasons)
    with pytest.raises(ValueError, match="dimension"):
        monitor.check(rng.beta(8, 2, 200), current_embeddings=np.ones((5, 3)))


def test_streaming_window() -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(rng.beta(8, 2, 5_000), window=200)
    assert all(monitor.update(value) is None for value in rng.beta(8, 2, 199))
    full = monitor.update(0.9)
    assert full is not None and full.n_current == 200 and not full.alert
    # The window slides: after 300 shifted values, only shifted values remain in it and the monitor fires.
    for value in rng.beta(3, 3, 20):
        sliding = monitor.update(value)
        assert sliding is not None and sliding.n_current == 200
    report = monitor.update(rng.beta(3, 3, 280))
    assert report is not None and report.n_current == 200 and report.alert
    assert len(monitor._recent_confidence) == 200
    batch_report = monitor.update(rng.beta(3, 3, 50))  # batches are accepted too
    assert batch_report is not None and batch_report.n_current == 200


def test_recalibrate_refits_and_guards() -> None:
    rng = np.random.default_rng(4)
    raw = rng.uniform(size=400)
    correct = (rng.uniform(size=400) < raw**3).astype(int)  # the old mapping is now badly overconfident
    calibrator = recalibrate("isotonic", raw, correct)
    assert isinstance(calibrator, IsotonicCalibrator)
    held_out = rng.uniform(size=4_000)
    held_out_correct = (rng.uniform(size=4_000) < held_out**3).astype(int)
    ece_before = expected_calibration_error(held_out_correct, held_out)
    ece_after = expected_calibration_error(held_out_correct, calibrator.transform(held_out))
    assert ece_after < 0.5 * ece_before
    monitor = DriftMonitor(raw)
    assert isinstance(monitor.recalibrate("temperature_scaling", raw, correct), TemperatureScaler)
    with pytest.raises(ValueError, match="at least 30"):
        recalibrate("isotonic", raw[:29], correct[:29])
    with pytest.raises(ValueError, match="both correct and wrong"):
        recalibrate("isotonic", raw[:50], np.ones(50, dtype=int))


def test_reliability_modules_do_not_import_torch_or_streamlit() -> None:
    code = (
        "import sys; import vlmrel_core.analysis.metrics, vlmrel_core.gate.calibration, vlmrel_core.gate.risk, vlmrel_core.gate.drift; "
        "bad = [m for m in ('torch', 'streamlit') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
