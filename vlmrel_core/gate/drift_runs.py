"""Drift between two cached runs, seen through a gate bundle: has the data moved away from what it was fitted on?

Why offline on runs: a cached extraction of recent traffic holds the same probe-layer states the live gate reads,
so the drift check (and, with labels, a recalibration) needs no model. The result carries every window's values,
so drift can be plotted over the current run, not only judged as a whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vlmrel_core.analysis.metrics import expected_calibration_error
from vlmrel_core.analysis.probes import ProbeError
from vlmrel_core.analysis.splits import SplitSpec, group_keys, holdout_indices, labels_of, make_split
from vlmrel_core.engine.store import RunReader
from vlmrel_core.gate.bundle import GateComponents, GateSource, as_components
from vlmrel_core.gate.config import ReliabilityMonitorConfig
from vlmrel_core.gate.drift import DriftMonitor, recalibrate
from vlmrel_core.progress import Progress, report as report_progress


def _run_confidences(components: GateComponents, reader: RunReader, exclude_training_rows: bool) -> dict[str, Any]:
    probe = components.probe
    try:
        probe.check_manifest(reader.manifest)
    except ProbeError as err:
        raise ProbeError(f"{reader.run_dir}: {err}") from err
    layer = probe.info.layers[0]
    pooling = components.config.monitor.probe.pooling
    states = reader.states(pooling, [layer])[:, 0].astype(np.float64)
    rows = reader.rows
    keep = np.arange(len(rows))
    note = "all rows"
    spec = probe.info.split.get("spec") if isinstance(probe.info.split, dict) else None
    if exclude_training_rows and reader.manifest.dataset_hash == probe.info.dataset_hash and spec:
        parts = make_split(rows, SplitSpec.from_dict(spec))
        keep = np.setdiff1d(keep, parts.train)
        note = f"held-out rows only ({keep.size} of {len(rows)}): this run is the probe's training data"
    raw, conf = components.confidences(states[keep])
    correct = labels_of(rows)[keep] if "correct" in rows.columns else None
    return {"states": states[keep], "raw": raw, "confidence": conf, "correct": correct,
            "rows": rows.iloc[keep].reset_index(drop=True), "note": note}


def _monitor(m: ReliabilityMonitorConfig, reference: Mapping[str, Any]) -> DriftMonitor:
    return DriftMonitor(
        reference["confidence"], reference["states"], kl_threshold=m.monitoring.kl_divergence_threshold,
        window=m.monitoring.window, alpha=m.monitoring.ks_alpha,
        embedding_shift_threshold=m.monitoring.embedding_shift_threshold, bins=m.monitoring.bins,
    )


def window_values(
    monitor: DriftMonitor, confidence: np.ndarray, states: np.ndarray, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Every full tumbling window of ``monitor.window`` rows, in run order, checked against the reference.

    A last partial window is left out (its KS/KL would not be comparable with full windows).
    """
    size = monitor.window
    starts = list(range(0, confidence.size - size + 1, size))
    values = []
    for index, start in enumerate(starts):
        stop = start + size
        check = monitor.check(confidence[start:stop], states[start:stop])
        values.append({
            "index": index, "start": start, "stop": stop, "n": check.n_current, "kl": check.kl,
            "ks_statistic": check.ks_statistic, "ks_pvalue": check.ks_pvalue, "embedding_shift": check.embedding_shift,
            "mean_confidence": float(confidence[start:stop].mean()), "alert": check.alert, "reasons": list(check.reasons),
        })
        report_progress(progress, index + 1, len(starts), f"window {index + 1}/{len(starts)}")
    return values


def drift_between_runs(
    config: GateSource,
    reference_run: str | Path,
    current_run: str | Path,
    *,
    recalibrate_on_alert: bool | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """KL + KS on calibrated confidences and the mean-embedding shift of the probe layer, current vs reference.

    Rows a probe was trained on are left out of either run (their scores are in-sample). ``windows.values`` holds
    each tumbling window's check (see `window_values`). On an alert, when the current run has labels and
    ``recalibrate_on_alert`` (default: ``monitoring.retrain_trigger == 'auto'``), the probe's calibrator is refitted
    on one image-grouped half of the current run and judged on the other half.
    """
    components = as_components(config)
    m = components.config.monitor
    report_progress(progress, 0, 4, "score reference run")
    reference = _run_confidences(components, RunReader(reference_run), exclude_training_rows=True)
    report_progress(progress, 1, 4, "score current run")
    current = _run_confidences(components, RunReader(current_run), exclude_training_rows=True)
    monitor = _monitor(m, reference)
    report = monitor.check(current["confidence"], current["states"])
    report_progress(progress, 2, 4, "windows")
    windows = window_values(monitor, current["confidence"], current["states"])
    result: dict[str, Any] = {
        "reference_run": str(reference_run),
        "current_run": str(current_run),
        "reference_rows": reference["note"],
        "current_rows": current["note"],
        "n_reference": int(reference["confidence"].size),
        "n_current": int(current["confidence"].size),
        "mean_confidence": {"reference": float(reference["confidence"].mean()), "current": float(current["confidence"].mean())},
        "thresholds": {"kl": m.monitoring.kl_divergence_threshold, "ks_alpha": m.monitoring.ks_alpha,
                       "embedding_shift": m.monitoring.embedding_shift_threshold},
        **report.to_dict(),
        "windows": {"size": monitor.window, "n": len(windows), "n_alert": sum(w["alert"] for w in windows),
                    "values": windows},
        "recalibration": None,
    }
    if recalibrate_on_alert is None:
        recalibrate_on_alert = m.monitoring.retrain_trigger == "auto"
    if report.alert and recalibrate_on_alert:
        report_progress(progress, 3, 4, "recalibrate")
        result["recalibration"] = recalibrate_on_current(components, current, seed)
    report_progress(progress, 4, 4, "done")
    return result


def recalibrate_on_current(components: GateComponents, current: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """Refit the probe calibrator on one image-grouped half of ``current`` (keys ``raw``, ``correct`` or None,
    ``rows`` with an ``image`` column) and report ECE before/after on the other half; never raises on small data."""
    correct = current["correct"]
    if correct is None:
        return {"done": False, "reason": "the current run has no labels (correct column); label a sample to recalibrate"}
    rows = current["rows"]
    try:
        groups = group_keys(rows, "image")
    except ValueError:
        groups = np.arange(len(rows)).astype(str)
    fit_idx, eval_idx = holdout_indices(correct, groups, 0.5, seed)
    method = components.config.monitor.probe.calibration_method
    try:
        new = recalibrate(method, current["raw"][fit_idx], correct[fit_idx], score_kind="prob")
    except ValueError as err:
        return {"done": False, "reason": str(err)}
    old_conf = components.calibrator.transform(current["raw"][eval_idx])
    new_conf = new.transform(current["raw"][eval_idx])
    return {
        "done": True,
        "method": method,
        "n_fit": int(fit_idx.size),
        "n_eval": int(eval_idx.size),
        "ece_before": expected_calibration_error(correct[eval_idx], old_conf),
        "ece_after": expected_calibration_error(correct[eval_idx], new_conf),
        "calibrator": new.to_dict(),
        "note": "refitted on one image-grouped half of the current run, judged on the other; the risk threshold "
                "must be re-certified on labelled current data (vlmrel build-gate) before serving with it",
    }


__all__ = ["drift_between_runs", "recalibrate_on_current", "window_values"]
