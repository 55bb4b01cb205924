"""Is production still the data the calibration and the risk threshold were certified on?

A calibrator and a risk threshold are only valid on the distribution they were fitted on. Labels arrive late or
never in production, so this monitor watches what is available at once: the distribution of the confidence score
(histogram KL divergence and a two-sample Kolmogorov–Smirnov test) and, optionally, the mean of an embedding
(cosine distance). An alert means "re-label a sample and ``recalibrate``", not "the model got worse".
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from scipy.spatial.distance import cosine

from vlmrel_core.gate.calibration import AnyCalibrator, CalibrationMethod, ScoreKind, fit_calibrator
from vlmrel_core.analysis.metrics import as_binary_labels, as_finite_1d

# Fewer labelled samples than this and a refitted calibrator is noisier than the drifted one it replaces.
MIN_RECALIBRATION_SAMPLES = 30


def histogram_kl(
    reference: ArrayLike,
    current: ArrayLike,
    bins: int = 10,
    range: tuple[float, float] | None = (0.0, 1.0),
    eps: float = 1e-6,
) -> float:
    """KL(current || reference) in nats between histograms on shared bins.

    Each histogram is normalised, ``eps`` is added to every bin and it is renormalised, so an empty reference bin
    gives a large but finite value. Values outside ``range`` are counted in the edge bins (``np.histogram`` would
    drop them silently, hiding exactly the drift we look for). ``range=None`` uses the reference's min and max.
    """
    reference_values = as_finite_1d(reference, "reference")
    current_values = as_finite_1d(current, "current")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    low, high = (float(reference_values.min()), float(reference_values.max())) if range is None else range
    if not high > low:
        high = low + 1.0  # constant reference: any spread in current still lands in other bins
    edges = np.linspace(low, high, bins + 1)

    def smoothed_histogram(values: np.ndarray) -> np.ndarray:
        counts, _ = np.histogram(np.clip(values, low, high), bins=edges)
        proportions = counts / counts.sum() + eps
        return proportions / proportions.sum()

    return float(stats.entropy(smoothed_histogram(current_values), smoothed_histogram(reference_values)))


@dataclass(frozen=True)
class DriftReport:
    """One comparison of a current window against the reference; ``reasons`` explains every alert."""

    n_current: int
    kl: float
    ks_statistic: float
    ks_pvalue: float
    embedding_shift: float | None
    alert: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _mean_embedding(embeddings: ArrayLike, name: str) -> np.ndarray:
    """Mean vector of (n, d) embeddings; a 1-D input is taken to be a mean already."""
    array = np.asarray(embeddings, dtype=float)
    if array.ndim == 2:
        if array.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        array = array.mean(axis=0)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be (n, d) embeddings or a (d,) mean, got shape {np.shape(embeddings)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN/inf")
    if not np.any(array):
        raise ValueError(f"{name} mean is the zero vector; cosine distance is undefined")
    return array


class DriftMonitor:
    """Compares confidence (and optionally embedding) windows against a reference captured at calibration time.

    Alerts when KL(current || reference) > ``kl_threshold``, when the KS test rejects equality at level ``alpha``,
    or when the cosine distance between mean embeddings exceeds ``embedding_shift_threshold``. KL catches shape
    changes that matter in aggregate; KS is a proper test (its p-value accounts for window size) and does not
    depend on binning. ``confidence_range`` must cover the score (use ``None`` for unbounded scores such as
    logit margins: the reference's range is used).

    Note on the embedding default: hidden states of large models share a big common direction, so cosine
    distances between domain means are small; tune ``embedding_shift_threshold`` on a known shift.
    """

    def __init__(
        self,
        reference_confidence: ArrayLike,
        reference_embedding_mean: ArrayLike | None = None,
        kl_threshold: float = 0.15,
        window: int = 200,
        alpha: float = 0.01,
        embedding_shift_threshold: float = 0.05,
        bins: int = 10,
        confidence_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        self.reference_confidence = as_finite_1d(reference_confidence, "reference_confidence")
        self.reference_embedding_mean = (
            None
            if reference_embedding_mean is None
            else _mean_embedding(reference_embedding_mean, "reference_embedding_mean")
        )
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.kl_threshold = float(kl_threshold)
        self.window = int(window)
        self.alpha = float(alpha)
        self.embedding_shift_threshold = float(embedding_shift_threshold)
        self.bins = int(bins)
        self.confidence_range = confidence_range
        self._recent_confidence: deque[float] = deque(maxlen=self.window)

    def check(self, current_confidence: ArrayLike, current_embeddings: ArrayLike | None = None) -> DriftReport:
        """Compare one batch against the reference."""
        current = as_finite_1d(current_confidence, "current_confidence")
        kl = histogram_kl(self.reference_confidence, current, bins=self.bins, range=self.confidence_range)
        ks = stats.ks_2samp(self.reference_confidence, current)
        reasons: list[str] = []
        if kl > self.kl_threshold:
            reasons.append(f"confidence histogram KL {kl:.3f} > {self.kl_threshold:g}")
        if ks.pvalue < self.alpha:
            reasons.append(
                f"KS test rejects same distribution: D={ks.statistic:.3f}, p={ks.pvalue:.2g} < {self.alpha:g}"
            )
        embedding_shift: float | None = None
        if current_embeddings is not None and self.reference_embedding_mean is not None:
            current_mean = _mean_embedding(current_embeddings, "current_embeddings")
            if current_mean.shape != self.reference_embedding_mean.shape:
                raise ValueError(
                    f"embedding dimension {current_mean.shape[0]} != reference {self.reference_embedding_mean.shape[0]}"
                )
            embedding_shift = float(cosine(current_mean, self.reference_embedding_mean))
            if embedding_shift > self.embedding_shift_threshold:
                reasons.append(
                    f"mean embedding cosine distance {embedding_shift:.3f} > {self.embedding_shift_threshold:g}"
                )
        return DriftReport(
            n_current=int(current.size),
            kl=kl,
            ks_statistic=float(ks.statistic),
            ks_pvalue=float(ks.pvalue),
            embedding_shift=embedding_shift,
            alert=bool(reasons),
            reasons=reasons,
        )

    def update(self, confidence: float | Iterable[float]) -> DriftReport | None:
        """Add one or more live confidences to the sliding window; a report on the window once it is full.

        Returns None until ``window`` values have been seen, then a report on the most recent ``window`` values
        after every update.
        """
        values = as_finite_1d(np.atleast_1d(np.asarray(confidence, dtype=float)), "confidence")
        self._recent_confidence.extend(values.tolist())
        if len(self._recent_confidence) < self.window:
            return None
        return self.check(np.fromiter(self._recent_confidence, dtype=float))

    def reset_window(self) -> None:
        """Forget the live window (e.g. after recalibrating and re-baselining)."""
        self._recent_confidence.clear()

    def recalibrate(
        self,
        calibrator_method: CalibrationMethod,
        scores: ArrayLike,
        correct: ArrayLike,
        score_kind: ScoreKind = "prob",
    ) -> AnyCalibrator:
        """Refit a calibrator on freshly labelled production data; see module-level ``recalibrate``."""
        return recalibrate(calibrator_method, scores, correct, score_kind=score_kind)


def recalibrate(
    calibrator_method: CalibrationMethod,
    scores: ArrayLike,
    correct: ArrayLike,
    score_kind: ScoreKind = "prob",
) -> AnyCalibrator:
    """Refit a calibrator after drift, refusing data too small or one-sided to fit one honestly.

    The returned calibrator replaces the old one; the risk threshold must be re-selected on calibrated scores too,
    and a new ``DriftMonitor`` built from the new reference.
    """
    labels = as_binary_labels(correct)
    if labels.size < MIN_RECALIBRATION_SAMPLES:
        raise ValueError(
            f"recalibration needs at least {MIN_RECALIBRATION_SAMPLES} labelled samples, got {labels.size}"
        )
    n_correct = int(labels.sum())
    if n_correct in (0, labels.size):
        raise ValueError(
            f"recalibration needs both correct and wrong answers, but all {labels.size} labelled samples are "
            f"{'correct' if n_correct else 'wrong'}"
        )
    return fit_calibrator(calibrator_method, scores, labels, score_kind=score_kind)
