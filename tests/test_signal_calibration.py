"""Calibrating the probe and every output signal on one split and judging them on another (known answers)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, logit

from vlmrel_core.gate.signal_calibration import calibrate_signals


def test_signal_calibration_known_answers():
    rng = np.random.default_rng(0)
    n = 8000
    true_p = rng.uniform(0.05, 0.95, size=2 * n)
    correct = (rng.uniform(size=2 * n) < true_p).astype(int)
    overconfident = expit(2.5 * logit(true_p))  # logits scaled by 1/T with T = 2.5
    margin = np.abs(logit(true_p)) + logit(true_p)  # not a probability
    fit = {"probe": overconfident[:n], "calibrated": true_p[:n], "top1_top2_margin": margin[:n]}
    ev = {"probe": overconfident[n:], "calibrated": true_p[n:], "top1_top2_margin": margin[n:]}
    reports, fitted = calibrate_signals(fit, correct[:n], ev, correct[n:], probability_signals=("probe", "calibrated"))
    assert fitted["probe"]["temperature_scaling"].temperature == pytest.approx(2.5, rel=0.08)
    probe = reports["probe"]
    assert probe["after"]["temperature_scaling"]["ece"] < 0.03 < probe["before"]["ece"]
    assert reports["calibrated"]["before"]["ece"] < 0.03  # a calibrated set has ECE ≈ 0 already
    assert fitted["calibrated"]["temperature_scaling"].temperature == pytest.approx(1.0, rel=0.08)
    assert reports["top1_top2_margin"]["before"] is None
    assert reports["top1_top2_margin"]["after"]["isotonic"]["ece"] < 0.05
    assert probe["auroc"] == reports["calibrated"]["auroc"]  # monotone maps: same ranking
