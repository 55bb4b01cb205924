"""A gate bundle's own split re-derived from its training run: per-row raw probe score, calibrated confidence (each
fitted method) and correctness on the calibration and test parts, a live re-certification of the threshold at any
risk target, and bootstrap CIs for ECE / MCE / Brier.

Why here: report.json stores only point estimates and one certified threshold. The dashboard's risk slider must
re-run `gate.risk.select_risk_threshold` on exactly the rows the bundle was calibrated on, which needs the split
recorded in the bundle's provenance (`analysis.splits.make_split` is deterministic given rows and spec) and the
bundle's own probe and calibrators. Nothing is refitted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from vlmrel_core.analysis.metrics import (
    Estimate, bootstrap_replicates, brier_score, expected_calibration_error, max_calibration_error,
    percentile_interval,
)
from vlmrel_core.analysis.splits import SplitSpec, make_split
from vlmrel_core.gate.calibration import calibrator_from_dict
from vlmrel_core.gate.risk import RiskThreshold, select_risk_threshold
from vlmrel_core.gate.signal_calibration import N_BINS
from vlmrel_core.results.files import ResultsError
from vlmrel_core.results.gate import GateBundleResults
from vlmrel_core.results.runs import RunResults, load_run

CALIBRATION_METRICS: tuple[str, ...] = ("ece", "mce", "brier")


@dataclass(frozen=True)
class GateSplitScores:
    """Every row of the bundle's training run: raw probe score, correctness, and calibrated confidence per method
    (``calibrated['before']`` is the raw score); ``calibration`` / ``test`` are the bundle's row indices."""

    run_dir: Path
    raw: np.ndarray
    correct: np.ndarray
    calibrated: dict[str, np.ndarray]
    calibration: np.ndarray
    test: np.ndarray
    chosen_method: str

    def calibration_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(raw probe score, correct) on the calibration split: what the risk certificate is computed from."""
        return self.raw[self.calibration], self.correct[self.calibration]

    def test_rows(self, method: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(confidence after ``method`` (default: the bundle's), correct) on the test split."""
        method = self.chosen_method if method is None else method
        if method not in self.calibrated:
            raise ResultsError(f"no calibration method {method!r}; the bundle has {sorted(self.calibrated)}")
        return self.calibrated[method][self.test], self.correct[self.test]


def gate_split_scores(bundle: GateBundleResults, run: RunResults | str | Path | None = None) -> GateSplitScores:
    """Re-derive the bundle's split on its training run (``run`` default: the calibration provenance's run_dir,
    resolved relative to the working directory or the sample-data root). Fails if the realised split sizes differ
    from those the bundle recorded (a different run or a changed splitter)."""
    provenance = bundle.calibration.bundle.provenance or {}
    if run is None:
        run = _provenance_run(provenance, bundle.gate_dir)
    run = run if isinstance(run, RunResults) else load_run(run)
    split_record = provenance.get("split") or bundle.report.split
    if "spec" not in split_record:
        raise ResultsError(f"{bundle.gate_dir}: the bundle records no split spec; cannot find its calibration rows")
    parts = make_split(run.rows, SplitSpec.from_dict(split_record["spec"]))
    for name, rows in (("n_calibration", parts.calibration), ("n_test", parts.test)):
        if name in split_record and int(split_record[name]) != rows.size:
            raise ResultsError(f"{run.run_dir}: re-derived split has {name}={rows.size}, the bundle {bundle.gate_dir} "
                               f"recorded {split_record[name]}; is this the run the gate was built from?")
    raw, chosen = bundle.run_scores(run)
    calibrated = {"before": raw, bundle.calibration.chosen_method: chosen}
    for method, spec in bundle.calibration.bundle.alternatives.items():
        calibrated[method] = calibrator_from_dict(spec).transform(raw)
    return GateSplitScores(run.run_dir, raw, run.correct(), calibrated, parts.calibration, parts.test,
                           bundle.calibration.chosen_method)


def held_out_samples(scores: GateSplitScores, run: RunResults, samples: Sequence, limit: int | None = None) -> list:
    """The dataset ``samples`` (VQASample) of the gate's test rows, in run order, at most ``limit``: questions the
    gate's probe was neither trained nor calibrated on. Matched by sample_id; a missing one is an error."""
    if scores.run_dir.resolve() != run.run_dir.resolve():
        raise ResultsError(f"the split scores are of {scores.run_dir}, not of {run.run_dir}")
    by_id = {str(s.sample_id): s for s in samples}
    wanted = [str(i) for i in run.rows["sample_id"].to_numpy()[scores.test]]
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise ResultsError(f"{len(missing)} test questions of {run.run_dir} are not in the dataset given "
                           f"(first: {missing[0]}); pass the dataset the run was extracted from")
    chosen = wanted if limit is None else wanted[:limit]
    return [by_id[i] for i in chosen]


def _provenance_run(provenance: Mapping[str, object], gate_dir: Path) -> Path:
    recorded = provenance.get("run_dir")
    if not recorded:
        raise ResultsError(f"{gate_dir}: calibration.json records no training run (provenance.run_dir)")
    path = Path(str(recorded))
    # shipped bundles record 'sample_data/runs/...': relative to the repository root, i.e. the sample root's parent
    roots = [Path.cwd(), gate_dir.resolve().parents[2], gate_dir.resolve().parents[1]]
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            return candidate
    raise ResultsError(f"the gate's training run {recorded} was not found (looked in {[str(c) for c in candidates]})")


@dataclass(frozen=True)
class CertifiedRouting:
    """A threshold certified on the calibration split and what it does on the test split."""

    certificate: RiskThreshold
    calibrated_threshold: float  # the raw threshold in the bundle's calibrated confidence
    test_coverage: float
    test_n_kept: int
    test_risk: float | None  # error rate of the kept test answers (None when nothing is kept)


def certify_on_split(scores: GateSplitScores, target_risk: float, delta: float = 0.1) -> CertifiedRouting:
    """`select_risk_threshold` on the calibration split's raw scores (as `build_gate_from_run` does), then the
    test split's coverage and risk of the kept answers. Raises `UnreachableRiskTarget` unchanged."""
    cal_raw, cal_correct = scores.calibration_rows()
    certificate = select_risk_threshold(cal_raw, cal_correct, target_risk, delta)
    kept = scores.raw[scores.test] >= certificate.threshold
    test_correct = scores.correct[scores.test]
    calibrated = scores.calibrated[scores.chosen_method]
    order = np.argsort(scores.raw)  # calibrators are monotone: map the raw threshold through the observed pairs
    calibrated_threshold = float(np.interp(certificate.threshold, scores.raw[order], calibrated[order]))
    return CertifiedRouting(
        certificate=certificate,
        calibrated_threshold=calibrated_threshold,
        test_coverage=float(kept.mean()) if kept.size else 0.0,
        test_n_kept=int(kept.sum()),
        test_risk=float(1.0 - test_correct[kept].mean()) if kept.any() else None,
    )


def _binned_sums(bin_ids: np.ndarray, values: np.ndarray, n_bins: int) -> np.ndarray:
    """(b, n_bins) per-resample sums of ``values`` over each bin, for a (b, n) matrix of bin ids."""
    b = bin_ids.shape[0]
    flat = (bin_ids + n_bins * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, weights=values.ravel(), minlength=b * n_bins).reshape(b, n_bins)


def calibration_metric_cis(
    correct: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray, n_bins: int = N_BINS,
    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
) -> dict[str, Estimate]:
    """ECE, MCE (uniform bins, as the gate report) and Brier with percentile-bootstrap (1 - alpha) intervals over
    rows. The point values are the report's (`analysis.metrics`); the resamples are binned the same way, vectorised
    (a bin's |accuracy - confidence| x count is |sum correct - sum confidence|)."""
    labels = np.asarray(correct).astype(np.float64)
    probs = np.asarray(prob, dtype=np.float64)
    if labels.shape != probs.shape or labels.ndim != 1 or labels.size < 2:
        raise ValueError(f"correct {labels.shape} and prob {probs.shape} must be equal 1-d arrays of >= 2 rows")
    if not np.isin(labels, (0.0, 1.0)).all() or not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError("correct must be 0/1 and prob must be probabilities in [0, 1]")
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], probs)

    def sums(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = bins[idx]
        return (_binned_sums(ids, np.ones(idx.shape), n_bins), _binned_sums(ids, probs[idx], n_bins),
                _binned_sums(ids, labels[idx], n_bins))

    def ece(idx: np.ndarray) -> np.ndarray:
        _, p, y = sums(idx)
        return np.abs(y - p).sum(axis=1) / idx.shape[1]

    def mce(idx: np.ndarray) -> np.ndarray:
        t, p, y = sums(idx)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmax(np.where(t > 0, np.abs(y - p) / t, np.nan), axis=1)

    def brier(idx: np.ndarray) -> np.ndarray:
        return ((probs[idx] - labels[idx]) ** 2).mean(axis=1)

    points = {
        "ece": expected_calibration_error(labels, probs, n_bins=n_bins, strategy="uniform"),
        "mce": max_calibration_error(labels, probs, n_bins=n_bins, strategy="uniform"),
        "brier": brier_score(labels, probs),
    }
    out = {}
    for name, statistic in (("ece", ece), ("mce", mce), ("brier", brier)):
        replicates = bootstrap_replicates(labels.size, statistic, n_boot, seed)
        out[name] = Estimate(float(points[name]), *percentile_interval(replicates, alpha))
    return out


__all__ = ["CALIBRATION_METRICS", "CertifiedRouting", "GateSplitScores", "calibration_metric_cis",
           "certify_on_split", "gate_split_scores", "held_out_samples"]
