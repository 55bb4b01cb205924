"""Monitoring a batch of new questions the gate just answered: per-window drift against the calibration reference,
the out-of-distribution guard's window tests, routing and novelty shares, and (with labels) a recalibration check.

Why in the library: the dashboard's Monitoring page runs a batch and draws these numbers; computing them here keeps
the page a view and lets the numbers be tested without Streamlit. The window checks reuse `DriftMonitor` (KL, KS,
embedding shift) and `WindowDriftDetector` (the gate's own OOD window tests), and the recalibration reuses
`drift_runs.recalibrate_on_current`, so a batch is judged exactly like a cached run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlmrel_core.gate.batch import ACTIONS, BatchGateResult
from vlmrel_core.gate.bundle import GateComponents
from vlmrel_core.gate.config import GateConfig, GateConfigError, parse_gate_config
from vlmrel_core.gate.drift import MIN_RECALIBRATION_SAMPLES, DriftMonitor
from vlmrel_core.gate.drift_runs import recalibrate_on_current
from vlmrel_core.gate.drift_tests import MIN_WINDOW, WindowDriftDetector
from vlmrel_core.gate.records import GateError
from vlmrel_core.validation.errors import InputError
from vlmrel_core.validation.yaml_safe import load_yaml_text

NOVEL_REASON = "out of distribution"


def parse_gate_yaml(text: str, base_dir: str | Path, source: str = "edited gate.yaml") -> GateConfig:
    """An edited gate YAML, read by the strict loader (no duplicate keys, aliases or unsafe tags) and validated
    like a bundle's file; relative paths resolve against ``base_dir`` (the bundle folder). Raises GateConfigError."""
    try:
        data = load_yaml_text(text, source)
    except InputError as err:
        raise GateConfigError(str(err)) from None
    return parse_gate_config(data, source=source, base_dir=Path(base_dir).resolve())


def capturing_states(config: GateConfig) -> GateConfig:
    """The same config with ``logging.capture_states`` on: the batch's window checks need each probe-layer state."""
    data = config.model_dump(mode="json", exclude_none=True)
    data["reliability_monitor"].setdefault("logging", {})["capture_states"] = True
    return parse_gate_config(data, source="<capturing states>", base_dir=config.base_dir)


@dataclass
class BatchMonitoring:
    """What the Monitoring page shows for one batch (``windows``: one dict per full tumbling window)."""

    window: int
    reference_confidence: np.ndarray
    confidence: np.ndarray
    thresholds: dict[str, float]
    windows: list[dict[str, Any]]
    window_tests: list[str]
    actions: dict[str, int]
    novelty_routed: int
    reasons: dict[str, int]
    recalibration: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.confidence.size)

    @property
    def routing_shares(self) -> dict[str, float]:
        return {a: (c / self.n if self.n else 0.0) for a, c in self.actions.items()}

    @property
    def novelty_share(self) -> float:
        return self.novelty_routed / self.n if self.n else 0.0

    @property
    def n_alert(self) -> int:
        return sum(bool(w["alert"]) for w in self.windows)

    def window_frame(self) -> pd.DataFrame:
        """One row per window: the KL/KS/embedding values, each window test's p-value and the alert."""
        rows = []
        for w in self.windows:
            row = {k: w[k] for k in ("index", "start", "stop", "mean_confidence", "kl", "ks_statistic", "ks_pvalue",
                                      "embedding_shift", "alert")}
            for test, result in w["tests"].items():
                row[f"{test}_pvalue"] = result["pvalue"]
            row["window_alarm"] = w["window_alarm"]
            row["reasons"] = "; ".join(w["reasons"])
            rows.append(row)
        return pd.DataFrame(rows)


def _evidence_rows(result: BatchGateResult, key: str) -> np.ndarray | None:
    """One evidence vector per decision (``state``, ``image_features``), or None when any decision lacks it."""
    rows = [d.evidence.get(key) for d in result.decisions]
    if not rows or any(r is None for r in rows):
        return None
    return np.asarray(rows, dtype=np.float64)


def monitor_batch(components: GateComponents, result: BatchGateResult, window: int, seed: int = 0) -> BatchMonitoring:
    """Check every full tumbling window of ``window`` decisions against the bundle's calibration drift reference
    (KL, KS, embedding shift at the config's thresholds) and, where the bundle has a novelty model and the window
    holds at least `MIN_WINDOW` inputs, the config's OOD window tests. A last partial window is left out."""
    calibration = components.calibration
    if calibration is None or calibration.drift_reference is None:
        raise GateError("the bundle's calibration.json holds no drift reference; rebuild it with `vlmrel build-gate`")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    m = components.config.monitor
    reference = calibration.drift_reference
    confidence = np.array([d.confidence for d in result.decisions], dtype=np.float64)
    states = _evidence_rows(result, "state")
    features = _evidence_rows(result, "image_features")
    notes: list[str] = []
    if states is None:
        notes.append("decisions carry no probe-layer states (logging.capture_states off): embedding shift and OOD "
                      "window tests not computed")
    monitor = DriftMonitor(reference.confidence, reference.embedding_mean, kl_threshold=m.monitoring.kl_divergence_threshold,
                           window=window, alpha=m.monitoring.ks_alpha,
                           embedding_shift_threshold=m.monitoring.embedding_shift_threshold, bins=m.monitoring.bins)
    detector = None
    if components.novelty is not None and states is not None:
        if window >= MIN_WINDOW:
            detector = WindowDriftDetector(components.novelty, m.novelty.window_tests, m.novelty.alpha, seed)
            if detector.needs_images and features is None:
                notes.append("decisions carry no image statistics: OOD window tests not computed")
                detector = None
        else:
            notes.append(f"OOD window tests need windows of at least {MIN_WINDOW} inputs; window is {window}")
    windows = []
    for index, start in enumerate(range(0, confidence.size - window + 1, window)):
        stop = start + window
        check = monitor.check(confidence[start:stop], None if states is None else states[start:stop])
        tests = (detector.check(states[start:stop], image_features=None if features is None else features[start:stop])
                 if detector is not None else None)
        windows.append({
            "index": index, "start": start, "stop": stop, "confidence": confidence[start:stop],
            "mean_confidence": float(confidence[start:stop].mean()), "kl": check.kl, "ks_statistic": check.ks_statistic,
            "ks_pvalue": check.ks_pvalue, "embedding_shift": check.embedding_shift,
            "tests": {} if tests is None else {r.test: r.to_dict() for r in tests.results},
            "window_alarm": bool(tests.alarm) if tests is not None else False,
            "alert": check.alert or (tests is not None and tests.alarm),
            "reasons": list(check.reasons) + ([] if tests is None else tests.reasons),
        })
    if not windows:
        notes.append(f"{confidence.size} decisions make no full window of {window}")
    reasons: dict[str, int] = {}
    for d in result.decisions:
        if d.reason:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
    n_tests = len(m.novelty.window_tests)
    return BatchMonitoring(
        window=window, reference_confidence=np.asarray(reference.confidence, dtype=np.float64), confidence=confidence,
        thresholds={"kl": m.monitoring.kl_divergence_threshold, "ks_alpha": m.monitoring.ks_alpha,
                    "embedding_shift": m.monitoring.embedding_shift_threshold,
                    "window_test_alpha": m.novelty.alpha / n_tests},
        windows=windows, window_tests=list(m.novelty.window_tests) if detector is not None else [],
        actions={a: sum(d.action == a for d in result.decisions) for a in ACTIONS},
        novelty_routed=reasons.get(NOVEL_REASON, 0), reasons=reasons,
        recalibration=batch_recalibration(components, result, seed), notes=notes,
    )


def batch_recalibration(components: GateComponents, result: BatchGateResult, seed: int = 0) -> dict[str, Any] | None:
    """None for an unlabelled batch; else `recalibrate_on_current` on the batch (ECE before/after on a held-out
    image-grouped half), or ``done: False`` with the reason when the batch is too small or one-sided."""
    if not result.correct or any(c is None for c in result.correct):
        return None
    correct = np.array(result.correct, dtype=int)
    if correct.size < 2 * MIN_RECALIBRATION_SAMPLES:
        return {"done": False, "reason": f"recalibration fits on half the batch and needs at least "
                                         f"{MIN_RECALIBRATION_SAMPLES} labelled answers there: label "
                                         f"{2 * MIN_RECALIBRATION_SAMPLES}+ questions (this batch has {correct.size})"}
    raw = np.array([d.evidence["raw_probe_score"] for d in result.decisions], dtype=np.float64)
    rows = pd.DataFrame({"image": [str(s.image_path) for s in result.samples]})
    try:
        return recalibrate_on_current(components, {"raw": raw, "correct": correct, "rows": rows}, seed)
    except ValueError as err:
        return {"done": False, "reason": str(err)}


__all__ = ["BatchMonitoring", "NOVEL_REASON", "batch_recalibration", "capturing_states", "monitor_batch", "parse_gate_yaml"]
