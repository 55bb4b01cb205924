"""Calibrate every score a user sees: the probe and each output signal, fitted on one split, judged on another.

Why a registry of signals: the output signals come in different units. Probabilities (max answer probability,
top-1 probability, the geometric-mean token probability) have a "before" ECE and can be temperature-scaled as
probabilities. Margins and entropies are not probabilities at all: they get no "before" ECE, temperature scaling
treats them as logits (sigmoid(s / T), no bias term, so it is often poor — the report shows it), and isotonic
regression maps them to a probability. ``yes_no_margin`` is left out on purpose: for yes/no answers
sigmoid(yes_no_margin) *is* ``max_answer_prob``, so it would repeat that row.

Monotone calibration keeps the ranking: AUROC is reported once, on the raw score, and is never a calibration gain.
Pure arrays in, JSON-ready dicts out (no model, no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from vlmrel_core.gate.calibration import AnyCalibrator, CalibrationMethod, ScoreKind, fit_calibrator
from vlmrel_core.analysis.metrics import auroc, brier_score, expected_calibration_error, max_calibration_error, reliability_bins

CALIBRATION_METHODS: tuple[CalibrationMethod, ...] = ("temperature_scaling", "isotonic")
N_BINS = 10


@dataclass(frozen=True)
class SignalSpec:
    """How to turn a stored column into a "higher = more likely correct" score, and what kind of score it is."""

    column: str
    transform: Callable[[np.ndarray], np.ndarray]
    is_probability: bool
    description: str

    @property
    def score_kind(self) -> ScoreKind:
        return "prob" if self.is_probability else "logit"

    def default_method(self, preferred: CalibrationMethod) -> CalibrationMethod:
        """The probe's configured method for probabilities; isotonic for unbounded scores."""
        return preferred if self.is_probability else "isotonic"


def _identity(x: np.ndarray) -> np.ndarray:
    return x


#: Output signals calibrated next to the probe. Keys are the names used in bundles, reports and decisions.
OUTPUT_SIGNALS: dict[str, SignalSpec] = {
    "max_answer_prob": SignalSpec("max_answer_prob", _identity, True, "max(p_yes, p_no) / (p_yes + p_no)"),
    "top1_prob": SignalSpec("top1_prob", _identity, True, "full-vocabulary top-1 probability"),
    "mean_token_prob": SignalSpec("mean_token_logprob", np.exp, True, "exp(mean generated-token log-prob)"),
    "top1_top2_margin": SignalSpec("top1_top2_margin", _identity, False, "top-1 minus top-2 logit (not a probability)"),
    "neg_token_entropy": SignalSpec("token_entropy", np.negative, False, "minus the answer-position entropy (nats)"),
}


def signal_scores(source: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Scores of the named output signals from a row frame or a `BatchRecord.output` dict (missing columns skipped)."""
    scores = {}
    for name in names if names is not None else OUTPUT_SIGNALS:
        spec = OUTPUT_SIGNALS[name]
        if spec.column in source:
            values = np.asarray(source[spec.column], dtype=float)
            scores[name] = spec.transform(values)
    return scores


def _quality(correct: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    return {
        "ece": expected_calibration_error(correct, prob, n_bins=N_BINS, strategy="uniform"),
        "ece_equal_mass": expected_calibration_error(correct, prob, n_bins=N_BINS, strategy="quantile"),
        "mce": max_calibration_error(correct, prob, n_bins=N_BINS, strategy="uniform"),
        "brier": brier_score(correct, prob),
        "bins": reliability_bins(correct, prob, n_bins=N_BINS, strategy="uniform").to_dict(),
    }


def calibrate_score(
    fit_scores: ArrayLike,
    fit_correct: ArrayLike,
    eval_scores: ArrayLike,
    eval_correct: ArrayLike,
    is_probability: bool,
    methods: Sequence[CalibrationMethod] = CALIBRATION_METHODS,
) -> tuple[dict[str, Any], dict[str, AnyCalibrator]]:
    """Fit each method on (fit_scores, fit_correct); report ECE/MCE/Brier/bins before and after on the eval split.

    Returns (report, calibrators). ``report["before"]`` is None for a score that is not a probability.
    """
    fit_x, eval_x = np.asarray(fit_scores, dtype=float), np.asarray(eval_scores, dtype=float)
    fit_y, eval_y = np.asarray(fit_correct).astype(int), np.asarray(eval_correct).astype(int)
    if fit_x.shape != fit_y.shape or eval_x.shape != eval_y.shape:
        raise ValueError(f"scores and labels differ in length: fit {fit_x.shape} vs {fit_y.shape}, eval {eval_x.shape} vs {eval_y.shape}")
    # A row whose signal is undefined (e.g. no generated token) is left out of that signal's fit and evaluation.
    fit_ok, eval_ok = np.isfinite(fit_x), np.isfinite(eval_x)
    n_dropped = int((~fit_ok).sum() + (~eval_ok).sum())
    fit_x, fit_y, eval_x, eval_y = fit_x[fit_ok], fit_y[fit_ok], eval_x[eval_ok], eval_y[eval_ok]
    kind: ScoreKind = "prob" if is_probability else "logit"
    report: dict[str, Any] = {
        "is_probability": bool(is_probability),
        "n_fit": int(fit_x.size),
        "n_eval": int(eval_x.size),
        "n_dropped_non_finite": n_dropped,
        "eval_accuracy": float(eval_y.mean()) if eval_y.size else float("nan"),
        "auroc": auroc(eval_y, eval_x) if np.unique(eval_y).size == 2 else None,
        "auroc_note": "raw score on the eval split; monotone calibration leaves the ranking (AUROC) unchanged",
        "before": _quality(eval_y, eval_x) if is_probability else None,
        "after": {},
    }
    calibrators: dict[str, AnyCalibrator] = {}
    for method in methods:
        calibrator = fit_calibrator(method, fit_x, fit_y, score_kind=kind)
        calibrators[method] = calibrator
        entry = _quality(eval_y, calibrator.transform(eval_x))
        entry["calibrator"] = calibrator.to_dict()
        report["after"][method] = entry
    return report, calibrators


def calibrate_signals(
    fit: Mapping[str, ArrayLike],
    fit_correct: ArrayLike,
    evaluate: Mapping[str, ArrayLike],
    eval_correct: ArrayLike,
    probability_signals: Sequence[str] = (),
    methods: Sequence[CalibrationMethod] = CALIBRATION_METHODS,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, AnyCalibrator]]]:
    """`calibrate_score` for every signal present in both ``fit`` and ``evaluate`` (e.g. "probe" and the outputs).

    A signal is a probability if it is in ``probability_signals`` or is a probability in `OUTPUT_SIGNALS`.
    Returns ({signal: report}, {signal: {method: calibrator}}).
    """
    reports: dict[str, dict[str, Any]] = {}
    fitted: dict[str, dict[str, AnyCalibrator]] = {}
    for name in fit:
        if name not in evaluate:
            continue
        spec = OUTPUT_SIGNALS.get(name)
        is_probability = name in probability_signals or (spec is not None and spec.is_probability)
        reports[name], fitted[name] = calibrate_score(
            fit[name], fit_correct, evaluate[name], eval_correct, is_probability, methods
        )
        if spec is not None:
            reports[name]["description"] = spec.description
    return reports, fitted


def summary_table(reports: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per signal: ECE before and after each method (equal-width bins), for printing."""
    rows = []
    for name, report in reports.items():
        row: dict[str, Any] = {"signal": name, "auroc": report["auroc"]}
        row["ece_before"] = None if report["before"] is None else round(report["before"]["ece"], 4)
        for method, entry in report["after"].items():
            row[f"ece_{method}"] = round(entry["ece"], 4)
        rows.append(row)
    return rows
