"""A gate bundle read back: gate.yaml, probe, calibration.json (through the gate's own loaders) and report.json
(reliability bins before/after temperature scaling and isotonic, ECE/MCE/Brier, risk–coverage, certificate),
plus the shipped live run (live_run.json).

Why through the gate's loaders: `gate.runtime.load_gate_components` already checks the probe against the
calibration (fingerprints, schema); a second parser would drift from it. report.json has no loader in the gate
(it is written for people), so its schema is typed here, key for key as `build_gate_from_run` writes it.
The stored metrics are point estimates on the bundle's eval split: report.json stores no CIs for ECE/MCE/Brier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import model_validator

from vlmrel_core.analysis.probes import ProbeError
from vlmrel_core.gate.config import GateConfig, GateConfigError, load_gate_config
from vlmrel_core.gate.bundle import (
    BUNDLE_CALIBRATION, BUNDLE_CONFIG, BUNDLE_REPORT, GateComponents, load_gate_components,
)
from vlmrel_core.gate.records import CalibrationBundle, GateError
from vlmrel_core.results.files import LooseModel, ResultsError, read_json_object, validate
from vlmrel_core.results.runs import RunResults

LIVE_RUN = "live_run.json"


class ReliabilityBins(LooseModel):
    """`metrics.ReliabilityBins.to_dict()`: non-empty equal-width bins (mean confidence, accuracy, count)."""

    bin_edges: list[float]
    prob_pred: list[float]
    prob_true: list[float]
    counts: list[int]
    bin_index: list[int]

    @model_validator(mode="after")
    def _same_lengths(self) -> "ReliabilityBins":
        n = len(self.prob_pred)
        if not (len(self.prob_true) == len(self.counts) == len(self.bin_index) == n):
            raise ValueError("prob_pred, prob_true, counts and bin_index must have the same length")
        if any(not 0 <= i < len(self.bin_edges) - 1 for i in self.bin_index):
            raise ValueError("bin_index out of range of bin_edges")
        return self

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(bin centres, counts) over every bin, empty bins as 0: the confidence histogram."""
        edges = np.asarray(self.bin_edges, dtype=float)
        counts = np.zeros(edges.size - 1, dtype=int)
        counts[np.asarray(self.bin_index, dtype=int)] = self.counts
        return (edges[:-1] + edges[1:]) / 2, counts


class CalibrationMetrics(LooseModel):
    ece: float
    ece_equal_mass: float
    mce: float
    brier: float
    bins: ReliabilityBins
    calibrator: dict[str, Any] | None = None


class SignalCalibration(LooseModel):
    """One signal's calibration report: metrics before (None for non-probabilities) and after each method."""

    is_probability: bool
    n_fit: int
    n_eval: int
    eval_accuracy: float
    auroc: float
    before: CalibrationMetrics | None
    after: dict[str, CalibrationMetrics]
    description: str | None = None


class RiskCoverage(LooseModel):
    """Risk–coverage on the test split, at thresholds over calibrated confidence (subsampled to ~50 points)."""

    thresholds: list[float]
    coverage: list[float]
    risk: list[float]
    n_kept: list[int]
    n_errors: list[int]

    @model_validator(mode="after")
    def _same_lengths(self) -> "RiskCoverage":
        if len({len(self.thresholds), len(self.coverage), len(self.risk), len(self.n_kept), len(self.n_errors)}) != 1:
            raise ValueError("thresholds, coverage, risk, n_kept and n_errors must have the same length")
        return self


class GateReport(LooseModel):
    """report.json of a gate bundle (`build_gate_from_run`)."""

    run_dir: str
    model_fingerprint: str
    model_source: str
    fusion: str
    layer: int
    pooling: str
    layer_selection: str
    probe: dict[str, Any]
    split: dict[str, Any]
    calibration_method: str
    temperature: float | None
    ece_before: float
    ece_after: float
    ece_after_by_method: dict[str, float]
    test_auroc: float
    threshold: float
    threshold_source: str
    risk_certificate: dict[str, Any] | None
    test: dict[str, Any]
    risk_coverage_test: RiskCoverage
    gray_zone: list[float] | None
    gray_zone_share_test: float | None
    expected_cost_multiplier: float
    calibration: dict[str, SignalCalibration]
    calibration_summary: list[dict[str, Any]]


class LiveRun(LooseModel):
    """live_run.json: the gate answering fresh questions end to end (routing shares, accuracy, measured cost)."""

    data: str
    n: int
    accuracy_all: float
    served_share: float
    accuracy_of_served: float | None
    n_decisions: int
    actions: dict[str, int]
    accepted_share: float
    gray_zone_share: float
    cost_multiplier: float
    time_multiplier: float | None = None
    cost_unit: str
    self_consistency_k: int | None = None


def _bundle_file(gate_dir: str | Path, name: str) -> Path:
    path = Path(gate_dir)
    return path if path.is_file() else path / name


def load_gate_report(gate_dir: str | Path) -> GateReport:
    path = _bundle_file(gate_dir, BUNDLE_REPORT)
    return validate(GateReport, read_json_object(path, "gate report (report.json)"), path)


def load_live_run(gate_dir: str | Path) -> LiveRun:
    path = _bundle_file(gate_dir, LIVE_RUN)
    return validate(LiveRun, read_json_object(path, "live gate run (live_run.json)"), path)


@dataclass(frozen=True)
class CalibrationResults:
    """The bundle's calibrators (calibration.json, via `CalibrationBundle.load`) and their measured effect
    (report.json `calibration`): reliability bins and ECE/MCE/Brier before and after each method, per signal."""

    bundle: CalibrationBundle
    signals: dict[str, SignalCalibration]
    chosen_method: str

    @property
    def probe(self) -> SignalCalibration:
        return self.signals["probe"]

    def summary(self) -> pd.DataFrame:
        """One row per signal × stage (before, each method): ECE, equal-mass ECE, MCE, Brier, n_eval."""
        records = []
        for name, report in self.signals.items():
            stages = ([("before", report.before)] if report.before is not None else []) + list(report.after.items())
            for stage, metrics in stages:
                records.append({"signal": name, "stage": stage, "ece": metrics.ece, "ece_equal_mass": metrics.ece_equal_mass,
                                "mce": metrics.mce, "brier": metrics.brier, "n_eval": report.n_eval, "auroc": report.auroc})
        return pd.DataFrame(records)


def load_calibration(gate_dir: str | Path) -> CalibrationResults:
    gate_dir = Path(gate_dir)
    try:
        bundle = CalibrationBundle.load(gate_dir / BUNDLE_CALIBRATION)
    except GateError as err:
        raise ResultsError(str(err)) from err
    report = load_gate_report(gate_dir)
    if "probe" not in report.calibration:
        raise ResultsError(f"{gate_dir / BUNDLE_REPORT}: no probe entry under 'calibration'")
    if bundle.model_fingerprint != report.model_fingerprint:
        raise ResultsError(f"{gate_dir}: calibration.json is for model {bundle.model_fingerprint!r}, "
                           f"report.json for {report.model_fingerprint!r}")
    return CalibrationResults(bundle, report.calibration, report.calibration_method)


@dataclass(frozen=True)
class GateBundleResults:
    """gate.yaml (GateConfig), probe + calibrators (GateComponents, the gate's own loader) and report.json."""

    gate_dir: Path
    config: GateConfig
    components: GateComponents
    report: GateReport
    calibration: CalibrationResults

    @property
    def threshold(self) -> float:
        return self.report.threshold

    def run_scores(self, run: RunResults) -> tuple[np.ndarray, np.ndarray]:
        """(raw probe score, calibrated confidence) for every row of ``run`` at the bundle's layer and pooling.
        Rows the probe was trained on are included (in-sample); the bundle's report.json has the held-out numbers."""
        probe = self.components.probe
        try:
            probe.check_manifest(run.manifest)
            states = run.reader.states(self.report.pooling, [probe.info.layers[0]])[:, 0].astype(np.float64)
        except Exception as err:  # ProbeError / CacheError: say which run and bundle
            raise ResultsError(f"cannot score {run.run_dir} with the gate bundle {self.gate_dir}: {err}") from err
        return self.components.confidences(states)

    @property
    def gray_zone(self) -> tuple[float, float] | None:
        bounds = self.config.monitor.routing.gray_zone_bounds
        return None if bounds is None else (float(bounds[0]), float(bounds[1]))


def load_gate_bundle(gate_dir: str | Path) -> GateBundleResults:
    """A bundle folder (or its gate.yaml). The model is not loaded; the probe and calibration are checked together."""
    path = Path(gate_dir)
    gate_dir = path.parent if path.is_file() else path
    try:
        config = load_gate_config(gate_dir / BUNDLE_CONFIG)
        components = load_gate_components(config)
    except (GateConfigError, GateError, ProbeError) as err:
        raise ResultsError(f"gate bundle {gate_dir}: {err}") from err
    return GateBundleResults(gate_dir, config, components, load_gate_report(gate_dir), load_calibration(gate_dir))
