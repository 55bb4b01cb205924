"""Drift between cached runs through a gate bundle: alerts, recalibration, and every window's values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cosine

from gate_helpers import late_bundle, late_run, write_synthetic_run  # noqa: F401
from vlmrel_core.analysis.splits import SplitSpec, make_split
from vlmrel_core.engine.store import RunReader
from vlmrel_core.gate.drift import histogram_kl
from vlmrel_core.gate.drift_runs import drift_between_runs


def test_drift_fires_on_a_shifted_run_and_not_on_an_in_domain_one(tmp_path, late_run, late_bundle):
    fingerprint = late_bundle.probe.info.model_fingerprint
    in_domain = write_synthetic_run(tmp_path / "in", fingerprint, n=400, seed=1, dataset_hash="h1")
    shifted = write_synthetic_run(tmp_path / "shift", fingerprint, n=400, seed=2, dataset_hash="h2", shift=0.5)
    config = late_bundle.out_dir / "gate.yaml"
    quiet = drift_between_runs(config, late_run, in_domain, recalibrate_on_alert=True)
    assert not quiet["alert"] and quiet["recalibration"] is None
    assert quiet["reference_rows"].startswith("held-out rows only")  # the probe's training rows are left out
    assert quiet["current_rows"] == "all rows" and quiet["n_current"] == 400
    loud = drift_between_runs(config, late_run, shifted, recalibrate_on_alert=True)
    assert loud["alert"] and loud["embedding_shift"] > 0.05 and loud["reasons"]
    recal = loud["recalibration"]
    assert recal["done"] and recal["n_fit"] + recal["n_eval"] == 400 and recal["calibrator"]["method"] == "temperature_scaling"


def _confidences(components, run_dir, drop_training_rows):
    """The run's calibrated confidences and states, computed here without drift_runs (independent check)."""
    reader = RunReader(run_dir)
    states = reader.states("last_token", [3])[:, 0].astype(np.float64)
    keep = np.arange(len(reader.rows))
    if drop_training_rows:
        parts = make_split(reader.rows, SplitSpec.from_dict(components.probe.info.split["spec"]))
        keep = np.setdiff1d(keep, parts.train)
    return components.calibrator.transform(components.probe.score(states[keep])), states[keep]


def test_every_window_carries_its_own_values(tmp_path, late_run, late_bundle):
    components = late_bundle.components()
    components.config = components.config.model_copy(deep=True).with_base_dir(late_bundle.out_dir)
    components.config.monitor.monitoring.window = 90
    shifted = write_synthetic_run(tmp_path / "shift", late_bundle.probe.info.model_fingerprint, n=400, seed=4,
                                  dataset_hash="h4", shift=0.3)
    calls = []
    result = drift_between_runs(components, late_run, shifted, recalibrate_on_alert=False,
                                progress=lambda done, total, stage="": calls.append((done, total)))
    windows = result["windows"]
    assert windows["size"] == 90 and windows["n"] == len(windows["values"]) == 400 // 90
    ref_conf, ref_states = _confidences(components, late_run, drop_training_rows=True)
    cur_conf, cur_states = _confidences(components, shifted, drop_training_rows=False)
    assert result["n_reference"] == ref_conf.size and result["n_current"] == 400
    monitoring = components.config.monitor.monitoring
    for i, value in enumerate(windows["values"]):
        assert (value["index"], value["start"], value["stop"], value["n"]) == (i, 90 * i, 90 * (i + 1), 90)
        window = slice(value["start"], value["stop"])
        assert value["kl"] == pytest.approx(histogram_kl(ref_conf, cur_conf[window], bins=monitoring.bins), rel=1e-9)
        ks = stats.ks_2samp(ref_conf, cur_conf[window])
        assert value["ks_statistic"] == pytest.approx(ks.statistic) and value["ks_pvalue"] == pytest.approx(ks.pvalue)
        shift = cosine(cur_states[window].mean(axis=0), ref_states.mean(axis=0))
        assert value["embedding_shift"] == pytest.approx(shift, rel=1e-9)
        assert value["mean_confidence"] == pytest.approx(cur_conf[window].mean())
        expected_alert = (value["kl"] > monitoring.kl_divergence_threshold or value["ks_pvalue"] < monitoring.ks_alpha
                          or shift > monitoring.embedding_shift_threshold)
        assert value["alert"] == expected_alert == bool(value["reasons"])
    assert windows["n_alert"] == sum(v["alert"] for v in windows["values"]) > 0
    # The windows differ from each other: values are per window, not the whole run's copied in.
    assert len({v["kl"] for v in windows["values"]}) == windows["n"]
    assert result["kl"] == pytest.approx(histogram_kl(ref_conf, cur_conf, bins=monitoring.bins), rel=1e-9)
    assert calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == sorted(c[0] for c in calls)
