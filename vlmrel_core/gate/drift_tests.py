"""Window drift tests with power on hidden states, beside the KL/KS tests on confidences (`drift`).

Why: a style shift moves the probe-layer states a lot but barely moves the confidence histogram or the mean
embedding (issue 16: KL 0.017, KS p 0.04, mean-embedding shift 0.006 while the certified rule's risk doubled).
These tests compare a window of current states with a reference sample of held-out in-domain states:

* ``classifier``: a domain classifier (logistic regression, 2 folds) separates reference from current; its
  held-out AUROC is tested against the Mann–Whitney null (AUROC 0.5) — Evidently's embedding-drift idea with
  a stated false-alarm rate instead of a fixed AUROC cut;
* ``mmd``: squared maximum mean discrepancy with an RBF kernel (median-heuristic bandwidth), permutation p-value;
* ``novelty_rate``: the share of window inputs flagged novel (by the state score, or by the image statistics when
  the novelty model has them) vs the calibration split's share (one-sided binomial test) — cheap and per-input;
* ``image_classifier``: the domain-classifier test on the inputs' image statistics (`gate.image_novelty`), each
  image counted once per side — it sees what the states hardly move under (JPEG blocks, blur, backgrounds).

Each test alarms at p < ``alpha``; `WindowDriftDetector` runs the chosen tests at alpha / (number of tests)
(Bonferroni) so the stated false-alarm rate is for the combined alarm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler

from vlmrel_core.gate.novelty import NoveltyModel

WINDOW_TESTS: tuple[str, ...] = ("classifier", "mmd", "novelty_rate", "image_classifier")
IMAGE_TESTS: tuple[str, ...] = ("image_classifier",)
DEFAULT_WINDOW_TESTS: tuple[str, ...] = ("classifier", "novelty_rate")  # MMD: no power on the shipped shifts
MIN_WINDOW = 20


@dataclass(frozen=True)
class WindowTestResult:
    """One test on one window: statistic, p-value, alarm at the test's alpha."""

    test: str
    statistic: float
    pvalue: float
    alpha: float
    alarm: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pair(reference: Any, current: Any) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.ndim != 2 or cur.ndim != 2 or ref.shape[1] != cur.shape[1]:
        raise ValueError(f"reference {ref.shape} and current {cur.shape} must be (n, d) with the same d")
    if cur.shape[0] < MIN_WINDOW or ref.shape[0] < MIN_WINDOW:
        raise ValueError(f"need >= {MIN_WINDOW} reference and current rows, got {ref.shape[0]} and {cur.shape[0]}")
    return ref, cur


def classifier_test(reference: Any, current: Any, alpha: float = 0.01, seed: int = 0, C: float = 0.1,
                    groups: Any | None = None) -> WindowTestResult:
    """Domain-classifier two-sample test: reference-vs-current AUROC in each of 2 folds (model fitted on
    the other fold), each fold's one-sided Mann–Whitney z (var = (n0 + n1 + 1) / (12 n0 n1)) averaged (valid under any correlation).

    ``groups`` (one label per reference row then per current row, e.g. the image each question was asked about)
    keeps a group inside one fold: otherwise the classifier recognises in one fold the image it saw in the other,
    and windows with several questions per image alarm with no shift at all."""
    ref, cur = _pair(reference, current)
    x = np.vstack([ref, cur])
    y = np.r_[np.zeros(len(ref)), np.ones(len(cur))]
    aurocs, zs = [], []
    if groups is None:
        folds = StratifiedKFold(2, shuffle=True, random_state=seed).split(x, y)
    else:
        groups = np.asarray(groups)
        if groups.shape != (len(x),):
            raise ValueError(f"groups: one label per reference and current row ({len(x)}), got shape {groups.shape}")
        folds = list(StratifiedGroupKFold(2, shuffle=True, random_state=seed).split(x, y, groups))
        if any(len(np.unique(y[part])) < 2 for fold in folds for part in fold):
            # e.g. a window of questions about one image: no grouped split has both sides in both folds, so the
            # rows are split as plain rows (conservative: shared images make an alarm more likely, not less)
            folds = list(StratifiedKFold(2, shuffle=True, random_state=seed).split(x, y))
    for fit_idx, eval_idx in folds:
        scaler = StandardScaler().fit(x[fit_idx])
        model = LogisticRegression(C=C, max_iter=500).fit(scaler.transform(x[fit_idx]), y[fit_idx])
        scores = model.decision_function(scaler.transform(x[eval_idx]))
        auroc = float(roc_auc_score(y[eval_idx], scores))
        n0, n1 = int((y[eval_idx] == 0).sum()), int((y[eval_idx] == 1).sum())
        aurocs.append(auroc)
        zs.append((auroc - 0.5) / np.sqrt((n0 + n1 + 1) / (12.0 * n0 * n1)))
    # Each fold's AUROC is scored by a model fitted on the other fold only, so under "no drift" each z follows the
    # Mann-Whitney null; the folds' z are strongly correlated (measured 0.85), so they are averaged (sd <= 1, a
    # valid one-sided test whatever the correlation), not summed by Stouffer (too many false alarms).
    auroc = float(np.mean(aurocs))
    p = float(stats.norm.sf(float(np.mean(zs))))
    return WindowTestResult("classifier", auroc, p, alpha, p < alpha)


def mmd_test(reference: Any, current: Any, alpha: float = 0.01, permutations: int = 200, seed: int = 0) -> WindowTestResult:
    """Squared MMD (biased estimate, RBF kernel with the median pairwise distance as bandwidth) and its
    permutation p-value ((1 + #perm >= observed) / (1 + permutations))."""
    ref, cur = _pair(reference, current)
    x = np.vstack([ref, cur])
    x = (x - ref.mean(0)) / np.where(ref.std(0) > 1e-8, ref.std(0), 1.0)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    bandwidth = float(np.median(d2[np.triu_indices_from(d2, 1)])) or 1.0
    kernel = np.exp(-d2 / bandwidth)
    n0 = len(ref)
    labels = np.r_[np.zeros(n0, int), np.ones(len(cur), int)]
    rng = np.random.default_rng(seed)
    all_labels = np.column_stack([labels] + [rng.permutation(labels) for _ in range(permutations)])
    # MMD^2 = w' K w with w = 1/n0 on reference rows and -1/n1 on current rows, for every permutation at once.
    weights = np.where(all_labels == 0, 1.0 / n0, -1.0 / len(cur))
    values = np.einsum("ip,ip->p", weights, kernel @ weights)
    observed = float(values[0])
    exceed = int((values[1:] >= observed).sum())
    p = (1 + exceed) / (1 + permutations)
    return WindowTestResult("mmd", observed, p, alpha, p < alpha)


def novelty_rate_test(novelty: NoveltyModel, current_novel: Any, alpha: float = 0.01) -> WindowTestResult:
    """Share of the window flagged novel (``current_novel``: booleans, `NoveltyModel.is_novel`) vs the calibration
    share (one-sided binomial test)."""
    novel = np.asarray(current_novel)
    if novel.ndim != 1 or novel.size < MIN_WINDOW or novel.dtype != bool:
        raise ValueError(f"need >= {MIN_WINDOW} novel flags (booleans), got shape {novel.shape}, dtype {novel.dtype}")
    base = max(novelty.base_novel_rate, novelty.false_reject_rate, 1e-3)
    flagged = int(novel.sum())
    p = float(stats.binomtest(flagged, novel.size, base, alternative="greater").pvalue)
    return WindowTestResult("novelty_rate", flagged / novel.size, p, alpha, p < alpha)


def image_classifier_test(reference_features: Any, current_features: Any, alpha: float = 0.01,
                          seed: int = 0) -> WindowTestResult:
    """`classifier_test` on image statistics, each distinct image once per side: several questions about one
    image share its statistics, and a duplicate in both folds would let the classifier recognise it (an AUROC
    above 0.5 with no shift at all)."""
    ref = np.unique(np.asarray(reference_features, dtype=np.float64), axis=0)
    cur = np.unique(np.asarray(current_features, dtype=np.float64), axis=0)
    if cur.shape[0] < MIN_WINDOW:  # too few distinct images to test: no evidence either way
        return WindowTestResult("image_classifier", 0.5, 1.0, alpha, False)
    result = classifier_test(ref, cur, alpha, seed)
    return WindowTestResult("image_classifier", result.statistic, result.pvalue, alpha, result.alarm)


@dataclass
class WindowDriftReport:
    """All window tests on one window; ``alarm`` is any test alarming at its Bonferroni-corrected alpha."""

    n_current: int
    alarm: bool
    results: list[WindowTestResult] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [f"{r.test}: statistic {r.statistic:.3g}, p {r.pvalue:.3g} < {r.alpha:.3g}" for r in self.results if r.alarm]

    def to_dict(self) -> dict[str, Any]:
        return {"n_current": self.n_current, "alarm": self.alarm, "reasons": self.reasons,
                "results": [r.to_dict() for r in self.results]}


class WindowDriftDetector:
    """Runs the chosen window tests against the novelty model's reference states at a combined ``alpha``."""

    def __init__(self, novelty: NoveltyModel, tests: Sequence[str] = DEFAULT_WINDOW_TESTS, alpha: float = 0.01,
                 seed: int = 0, permutations: int = 200) -> None:
        unknown = [t for t in tests if t not in WINDOW_TESTS]
        if unknown or not tests:
            raise ValueError(f"window tests {list(tests)}: expected a non-empty subset of {WINDOW_TESTS}")
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
        if novelty.reference_states.shape[0] < MIN_WINDOW and set(tests) & {"classifier", "mmd"}:
            raise ValueError("the novelty model holds too few reference states for the classifier / MMD tests")
        if novelty.image is None and set(tests) & set(IMAGE_TESTS):
            raise ValueError(f"window tests {sorted(set(tests) & set(IMAGE_TESTS))} need image statistics; the novelty "
                             "model has none (rebuild the gate with image statistics or drop these tests)")
        self.novelty, self.tests, self.alpha, self.seed, self.permutations = novelty, tuple(tests), alpha, seed, permutations

    @property
    def needs_images(self) -> bool:
        """Whether a window needs the inputs' image statistics (an image test, or novelty by image statistics)."""
        return self.novelty.image is not None and (bool(set(self.tests) & set(IMAGE_TESTS)) or "novelty_rate" in self.tests)

    def _image_groups(self, image_features: Any | None) -> np.ndarray | None:
        """One label per distinct image over reference + window rows (identical image statistics = one image),
        when the reference rows carry their images' statistics; else None (plain stratified folds)."""
        image = self.novelty.image
        if image is None or image_features is None or image.reference_features.shape[0] != self.novelty.reference_states.shape[0]:
            return None
        stacked = np.vstack([image.reference_features, np.asarray(image_features, dtype=np.float64)])
        return np.unique(np.round(stacked, 5), axis=0, return_inverse=True)[1].ravel()

    def check(self, states: Any, novel: Any | None = None, image_features: Any | None = None) -> WindowDriftReport:
        """Test one window of (n, d) probe-layer states and, where the novelty model has an image score, the
        inputs' (n, f) image statistics. ``novel`` (per-input flags) is recomputed when not given."""
        states = np.asarray(states, dtype=np.float64)
        if self.needs_images and image_features is None:
            raise ValueError("this detector's tests use image statistics: pass image_features for the window")
        each = self.alpha / len(self.tests)
        ref = self.novelty.reference_states
        results = []
        for test in self.tests:
            if test == "classifier":
                results.append(classifier_test(ref, states, each, self.seed, groups=self._image_groups(image_features)))
            elif test == "mmd":
                results.append(mmd_test(ref, states, each, self.permutations, self.seed))
            elif test == "image_classifier":
                assert self.novelty.image is not None
                results.append(image_classifier_test(self.novelty.image.reference_features, image_features, each, self.seed))
            else:
                flags = self.novelty.is_novel(states, image_features) if novel is None else np.asarray(novel, dtype=bool)
                results.append(novelty_rate_test(self.novelty, flags, each))
        return WindowDriftReport(len(states), any(r.alarm for r in results), results)
