"""Turn a reliability score into a probability of being correct that can be trusted at face value.

Two calibrators, both monotone so they keep the score's ranking (and therefore its AUROC):

* ``TemperatureScaler`` — one parameter, hard to overfit, right when the score is a logit that is merely over- or
  under-confident. Strictly increasing, so AUROC is exactly unchanged.
* ``IsotonicCalibrator`` — non-parametric, fixes any monotone distortion but needs more data. It is only
  non-decreasing: it can merge distinct scores into ties (flat steps), which changes AUROC only through those
  ties. On the data it was fitted on its ROC curve is the convex hull of the raw one, so AUROC there can only go
  up; on new data the ties can move AUROC slightly either way.

Serialisation is plain JSON types via ``to_dict``/``from_dict`` (never pickle: a calibrator file must be safe to
load and readable in a diff).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Union

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, log_softmax, logit, softmax
from sklearn.isotonic import IsotonicRegression

from vlmrel_core.analysis.metrics import as_binary_labels, as_finite_1d, require_both_classes

ScoreKind = Literal["prob", "logit"]
CalibrationMethod = Literal["temperature_scaling", "isotonic"]

# Probabilities are clipped this far from 0 and 1 before taking logits: a reported 1.0 would otherwise become an
# infinite logit that no temperature can shrink.
PROB_CLIP_EPS = 1e-6
# Search range for T. Outside it the scores carry (almost) no information or are (almost) hard labels; hitting a
# bound is reported via ``TemperatureScaler.hit_bound``.
TEMPERATURE_BOUNDS = (1e-2, 1e2)


def prob_to_logit(prob: ArrayLike, eps: float = PROB_CLIP_EPS) -> np.ndarray:
    """log(p / (1 - p)) after clipping p to [eps, 1 - eps], so saturated probabilities stay finite."""
    probs = np.asarray(prob, dtype=float)
    if np.isnan(probs).any():
        raise ValueError("prob contains NaN")
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(f"prob must lie in [0, 1], got range [{probs.min():.4g}, {probs.max():.4g}]")
    return logit(np.clip(probs, eps, 1.0 - eps))


def _scores_to_logits(scores: ArrayLike, score_kind: ScoreKind) -> np.ndarray:
    """Binary probabilities → logits; multi-class probability rows → log-probabilities (softmax inverts them)."""
    if score_kind == "logit":
        logits = np.asarray(scores, dtype=float)
    elif score_kind == "prob":
        probs = np.asarray(scores, dtype=float)
        if probs.ndim == 2:
            if np.isnan(probs).any() or probs.min() < 0.0 or probs.max() > 1.0:
                raise ValueError("multi-class prob rows must lie in [0, 1] without NaN")
            logits = np.log(np.clip(probs, PROB_CLIP_EPS, 1.0))
        else:
            logits = prob_to_logit(probs)
    else:
        raise ValueError(f"score_kind must be 'prob' or 'logit', got {score_kind!r}")
    if logits.ndim not in (1, 2):
        raise ValueError(f"scores must be 1-D (binary) or 2-D (n, k) multi-class, got shape {logits.shape}")
    if logits.size == 0:
        raise ValueError("scores are empty")
    if not np.isfinite(logits).all():
        raise ValueError("scores contain NaN/inf")
    return logits


class Calibrator(Protocol):
    """What the rest of vlmrel needs from a fitted calibrator."""

    def transform(self, scores: ArrayLike) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------------------------------- temperature


@dataclass
class TemperatureScaler:
    """p = sigmoid(z / T) (binary, z 1-D) or softmax(z / T) (multi-class, z of shape (n, k)).

    ``score_kind`` says what ``fit``/``transform`` receive: raw logits, or probabilities that are converted with
    ``prob_to_logit`` (binary) / ``log`` (multi-class) first. T is fitted by minimising the negative
    log-likelihood over log T (bounded), which keeps T > 0 without a constraint.
    """

    score_kind: ScoreKind = "logit"
    temperature: float | None = None
    n_classes: int | None = None  # None for the binary (1-D) form
    hit_bound: bool = field(default=False, compare=False)

    def fit(self, logits: ArrayLike, correct: ArrayLike) -> TemperatureScaler:
        """Fit T. Binary: ``correct`` is 0/1 per row. Multi-class: ``correct`` holds the true class index per row."""
        z = _scores_to_logits(logits, self.score_kind)
        if z.ndim == 1:
            labels = as_binary_labels(correct)
            if labels.size != z.size:
                raise ValueError(f"correct has {labels.size} entries but scores have {z.size}")
            require_both_classes(labels, "temperature scaling")

            def negative_log_likelihood(log_t: float) -> float:
                scaled = z / np.exp(log_t)
                return -float(np.mean(labels * log_expit(scaled) + (1 - labels) * log_expit(-scaled)))

            n_classes = None
        else:
            class_index = np.asarray(correct)
            if class_index.ndim != 1 or class_index.shape[0] != z.shape[0]:
                raise ValueError(
                    f"multi-class fit needs one class index per row ({z.shape[0]}), got shape {class_index.shape}"
                )
            if not np.issubdtype(class_index.dtype, np.integer):
                raise ValueError(f"multi-class labels must be integers, got dtype {class_index.dtype}")
            if class_index.min() < 0 or class_index.max() >= z.shape[1]:
                raise ValueError(
                    f"class indices must be in [0, {z.shape[1]}), got [{class_index.min()}, {class_index.max()}]"
                )
            rows = np.arange(z.shape[0])

            def negative_log_likelihood(log_t: float) -> float:
                return -float(np.mean(log_softmax(z / np.exp(log_t), axis=1)[rows, class_index]))

            n_classes = int(z.shape[1])

        log_bounds = (float(np.log(TEMPERATURE_BOUNDS[0])), float(np.log(TEMPERATURE_BOUNDS[1])))
        result = minimize_scalar(negative_log_likelihood, bounds=log_bounds, method="bounded", options={"xatol": 1e-6})
        self.temperature = float(np.exp(result.x))
        self.n_classes = n_classes
        self.hit_bound = bool(min(abs(result.x - b) for b in log_bounds) < 1e-3)
        return self

    def transform(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated probability: of being correct (binary, shape (n,)) or of each class (shape (n, k))."""
        if self.temperature is None:
            raise RuntimeError("TemperatureScaler is not fitted; call fit() or from_dict() first")
        z = _scores_to_logits(logits, self.score_kind)
        expected_ndim = 1 if self.n_classes is None else 2
        if z.ndim != expected_ndim or (self.n_classes is not None and z.shape[1] != self.n_classes):
            fitted_on = "binary" if self.n_classes is None else f"{self.n_classes}-class"
            raise ValueError(f"scaler was fitted on {fitted_on} scores, got shape {z.shape}")
        if z.ndim == 1:
            return expit(z / self.temperature)
        return softmax(z / self.temperature, axis=1)

    def to_dict(self) -> dict[str, Any]:
        if self.temperature is None:
            raise RuntimeError("cannot serialise an unfitted TemperatureScaler")
        return {
            "method": "temperature_scaling",
            "temperature": float(self.temperature),
            "score_kind": self.score_kind,
            "n_classes": self.n_classes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TemperatureScaler:
        if data.get("method") != "temperature_scaling":
            raise ValueError(f"not a temperature_scaling calibrator: method={data.get('method')!r}")
        temperature = float(data["temperature"])
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        score_kind = data.get("score_kind", "logit")
        if score_kind not in ("prob", "logit"):
            raise ValueError(f"score_kind must be 'prob' or 'logit', got {score_kind!r}")
        n_classes = data.get("n_classes")
        return cls(
            score_kind=score_kind,
            temperature=temperature,
            n_classes=None if n_classes is None else int(n_classes),
        )


# --------------------------------------------------------------------------------------------------- isotonic


@dataclass
class IsotonicCalibrator:
    """Non-decreasing step-linear map score → P(correct), fitted by sklearn ``IsotonicRegression``.

    Prediction always goes through ``numpy.interp`` on the fitted knots (clipped at the ends, like
    ``out_of_bounds="clip"``), so a calibrator rebuilt by ``from_dict`` gives bit-identical output to the one that
    was fitted. Works on any real-valued score (probability, logit, margin): it only uses the order.
    """

    x_thresholds: np.ndarray | None = None
    y_thresholds: np.ndarray | None = None

    def fit(self, scores: ArrayLike, correct: ArrayLike) -> IsotonicCalibrator:
        x = as_finite_1d(scores, "scores")
        labels = as_binary_labels(correct)
        if labels.size != x.size:
            raise ValueError(f"correct has {labels.size} entries but scores have {x.size}")
        require_both_classes(labels, "isotonic calibration")
        regression = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        regression.fit(x, labels.astype(float))
        self.x_thresholds = np.asarray(regression.X_thresholds_, dtype=float)
        self.y_thresholds = np.asarray(regression.y_thresholds_, dtype=float)
        return self

    def transform(self, scores: ArrayLike) -> np.ndarray:
        if self.x_thresholds is None or self.y_thresholds is None:
            raise RuntimeError("IsotonicCalibrator is not fitted; call fit() or from_dict() first")
        x = np.asarray(scores, dtype=float)
        if np.isnan(x).any():
            raise ValueError("scores contain NaN")
        return np.interp(x, self.x_thresholds, self.y_thresholds)

    def to_dict(self) -> dict[str, Any]:
        if self.x_thresholds is None or self.y_thresholds is None:
            raise RuntimeError("cannot serialise an unfitted IsotonicCalibrator")
        return {
            "method": "isotonic",
            "x_thresholds": self.x_thresholds.tolist(),
            "y_thresholds": self.y_thresholds.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IsotonicCalibrator:
        if data.get("method") != "isotonic":
            raise ValueError(f"not an isotonic calibrator: method={data.get('method')!r}")
        x = np.asarray(data["x_thresholds"], dtype=float)
        y = np.asarray(data["y_thresholds"], dtype=float)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise ValueError("x_thresholds and y_thresholds must be equal-length non-empty lists")
        if np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
            raise ValueError("isotonic knots must be non-decreasing in both x and y")
        if not (np.isfinite(x).all() and np.isfinite(y).all()) or y.min() < 0 or y.max() > 1:
            raise ValueError("isotonic knots must be finite with y in [0, 1]")
        return cls(x_thresholds=x, y_thresholds=y)


# --------------------------------------------------------------------------------------------------- factory

AnyCalibrator = Union[TemperatureScaler, IsotonicCalibrator]


def fit_calibrator(
    method: CalibrationMethod,
    scores: ArrayLike,
    correct: ArrayLike,
    score_kind: ScoreKind = "prob",
) -> AnyCalibrator:
    """Fit the named calibrator on held-out (never training) scores and 0/1 correctness.

    ``score_kind`` matters for temperature scaling (probabilities are converted to logits, and the fitted
    scaler expects the same kind at ``transform`` time); isotonic regression only uses the order of the scores.
    """
    if method == "temperature_scaling":
        return TemperatureScaler(score_kind=score_kind).fit(scores, correct)
    if method == "isotonic":
        if score_kind not in ("prob", "logit"):
            raise ValueError(f"score_kind must be 'prob' or 'logit', got {score_kind!r}")
        return IsotonicCalibrator().fit(scores, correct)
    raise ValueError(f"unknown calibration method {method!r}; use 'temperature_scaling' or 'isotonic'")


def calibrator_from_dict(data: dict[str, Any]) -> AnyCalibrator:
    """Rebuild a calibrator from ``to_dict()`` output, dispatching on its ``method`` key."""
    method = data.get("method")
    if method == "temperature_scaling":
        return TemperatureScaler.from_dict(data)
    if method == "isotonic":
        return IsotonicCalibrator.from_dict(data)
    raise ValueError(f"unknown calibrator method {method!r} in serialised calibrator")
