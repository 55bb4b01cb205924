"""Confound controls: the cheap explanations a probe score has to beat before it may be called "knowledge".

Why: a probe can score high without reading reliability from the hidden state: by learning which answer
("yes"/"no") tends to be wrong, which asked objects are hard, or what the image looks like. Each control here
models one such shortcut with the *same* fitting (`probes.fit_probe`: standardise + logistic regression, C by
grouped CV on the training split), the *same* split and the same 95% CIs as the probe:

1. answer-only: one-hot of the predicted answer;
2. item control: one-hot of (asked object × predicted answer) + the output features;
3. shuffled-label probe: the probe's own features and C, labels permuted within the training split, repeated
   over `N_PERMUTATIONS` permutations (must centre on 0.5). One permutation is not enough: when a feature
   separates the classes well, a probe fitted to random labels still puts some weight on it, with a random sign,
   and a single shuffled AUROC lands far from 0.5 either way. The report gives the mean and the 2.5–97.5%
   range of the permutation distribution (a null distribution, not a bootstrap CI) and the probe's permutation
   p-value;
4. no-model: image statistics + question length (no model pass at all).

Fusion stacks the probe's out-of-fold log-odds with the output features in one model and is compared with each
alone. Gains carry two paired intervals: over test rows (`metrics.auroc_gain_ci`) and over whole test groups
(`cluster_bootstrap.grouped_auroc_gain_ci`); a verdict or claim needs both to exclude 0 (`Gain.conservative`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score

from vlmrel_core.analysis.cluster_bootstrap import grouped_auroc_gain_ci
from vlmrel_core.analysis.metrics import Estimate, auroc_ci, auroc_gain_ci, point_biserial
from vlmrel_core.analysis.probes import (
    DEFAULT_C_GRID,
    Probe,
    fit_probe,
    fit_probe_pipeline,
    select_layer_probe,
    single_blas_thread,
)
from vlmrel_core.analysis.splits import GROUPINGS, Split, SplitSpec, group_keys, grouped_folds, labels_of, make_split
from vlmrel_core.engine.store import RunReader

#: Output-level confidence features (row columns written by extract), all from the one greedy pass.
OUTPUT_FEATURES: tuple[str, ...] = (
    "max_answer_prob", "yes_no_margin", "top1_top2_margin", "token_entropy", "top1_prob", "mean_token_logprob",
)
#: Features of no model: what the image looks like and how long the question is.
NO_MODEL_FEATURES: tuple[str, ...] = (
    "image_mean_r", "image_mean_g", "image_mean_b", "image_std", "image_edge_density", "question_length",
)
#: Label permutations for the shuffled-label control.
N_PERMUTATIONS = 20


# --------------------------------------------------------------------------------------------------- scoring


@dataclass
class ScoredSignal:
    """One score on the held-out rows with its AUROC and point-biserial R (each with a 95% CI)."""

    name: str
    kind: str
    description: str
    auroc: Estimate
    r_pb: Estimate | None
    cost: str
    test_scores: np.ndarray = field(repr=False)
    C: float | None = None
    n_features: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "signal": self.name, "kind": self.kind, "description": self.description,
            "auroc": self.auroc.value, "auroc_low": self.auroc.low, "auroc_high": self.auroc.high,
            "r_pb": None if self.r_pb is None else self.r_pb.value,
            "r_pb_low": None if self.r_pb is None else self.r_pb.low,
            "r_pb_high": None if self.r_pb is None else self.r_pb.high,
            "cost": self.cost, "C": self.C, "n_features": self.n_features, "note": self.note,
        }


def evaluate_scores(
    name: str, kind: str, description: str, y_test: np.ndarray, scores: np.ndarray, cost: str,
    *, n_boot: int = 1000, seed: int = 0, note: str = "", C: float | None = None, n_features: int | None = None,
) -> ScoredSignal:
    """AUROC and R_pb with bootstrap CIs on the test rows; R_pb is None (with a note) for a constant score."""
    scores = np.asarray(scores, dtype=np.float64)
    auroc = auroc_ci(y_test, scores, n_boot=n_boot, seed=seed)
    r_pb: Estimate | None
    if np.ptp(scores) == 0:
        r_pb, note = None, (note + "; " if note else "") + "constant on the test rows: R_pb undefined"
    else:
        r_pb = point_biserial(y_test, scores, n_boot=n_boot, seed=seed)
    return ScoredSignal(name, kind, description, auroc, r_pb, cost, scores, C, n_features, note)


@dataclass(frozen=True)
class Gain:
    """AUROC(better) − AUROC(baseline) on the same test rows, with row-paired and group-paired 95% CIs."""

    better: str
    baseline: str
    grouping: str
    row_paired: Estimate
    group_paired: Estimate

    @property
    def name(self) -> str:
        return f"{self.better} − {self.baseline}"

    @property
    def conservative(self) -> Estimate:
        """The union of the two intervals: what a claim must clear.

        Why both: with many groups and clustered errors the group interval is the wider (honest) one; with only a
        handful of groups the group bootstrap can only draw a few distinct resamples and comes out too narrow, and
        the row interval is the wider one. Requiring both to exclude 0 is right in either regime.
        """
        return Estimate(self.row_paired.value, min(self.row_paired.low, self.group_paired.low),
                        max(self.row_paired.high, self.group_paired.high))

    def verdict(self) -> str:
        """'gain' if both paired CIs lie above 0, 'loss' if both lie below, 'no difference shown' otherwise."""
        interval = self.conservative
        if interval.low > 0:
            return "gain"
        if interval.high < 0:
            return "loss"
        return "no difference shown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "comparison": self.name, "better": self.better, "baseline": self.baseline, "grouping": self.grouping,
            "gain": self.row_paired.value,
            "row_ci_low": self.row_paired.low, "row_ci_high": self.row_paired.high,
            "group_ci_low": self.group_paired.low, "group_ci_high": self.group_paired.high,
            "verdict": self.verdict(),
        }


def paired_gain(
    better: ScoredSignal, baseline: ScoredSignal, y_test: np.ndarray, groups_test: np.ndarray, grouping: str,
    *, n_boot: int = 1000, seed: int = 0,
) -> Gain:
    """Paired bootstrap of the AUROC difference, once over rows and once over whole groups."""
    return Gain(
        better.name, baseline.name, grouping,
        auroc_gain_ci(y_test, better.test_scores, baseline.test_scores, n_boot=n_boot, seed=seed),
        grouped_auroc_gain_ci(y_test, better.test_scores, baseline.test_scores, groups_test, n_boot=n_boot, seed=seed),
    )


# --------------------------------------------------------------------------------------------------- features


def one_hot(values: Sequence[str] | np.ndarray, train: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(n, n_categories) indicators with categories seen in the training rows; unseen values are all-zero rows.

    Why train-only categories: on a held-out-items split the test items are unknown to every model, which is
    exactly what that split is meant to test.
    """
    keys = np.asarray(values).astype(str)
    categories = sorted(set(keys[train].tolist()))
    matrix = (keys[:, None] == np.asarray(categories, dtype=str)[None, :]).astype(np.float64)
    return matrix, categories


def numeric_columns(rows: pd.DataFrame, columns: Sequence[str], what: str) -> tuple[np.ndarray, list[str]]:
    """The available ``columns`` as a float matrix; raises if none are present."""
    present = [c for c in columns if c in rows.columns]
    if not present:
        raise ValueError(f"the rows have none of the {what} columns {list(columns)}")
    matrix = rows[present].astype(np.float64).to_numpy()
    if not np.isfinite(matrix).all():
        raise ValueError(f"{what} columns contain NaN or infinite values")
    return matrix, present


def answer_only_features(rows: pd.DataFrame, train: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Control 1: the predicted answer alone."""
    matrix, categories = one_hot(rows["answer"].to_numpy(), train)
    return matrix, [f"answer={c}" for c in categories]


def item_features(rows: pd.DataFrame, train: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Control 2: one-hot (asked object × predicted answer) + output features."""
    if "asked_object" not in rows.columns:
        raise ValueError("the item control needs an asked_object column in the rows")
    crossed = (rows["asked_object"].astype(str) + " × " + rows["answer"].astype(str)).to_numpy()
    items, item_names = one_hot(crossed, train)
    outputs, output_names = numeric_columns(rows, OUTPUT_FEATURES, "output feature")
    return np.hstack([items, outputs]), item_names + output_names


def no_model_features(rows: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Control 4: image statistics and question length."""
    return numeric_columns(rows, NO_MODEL_FEATURES, "no-model feature")


def output_features(rows: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """All output-level confidence features together (the "output alone" side of fusion)."""
    return numeric_columns(rows, OUTPUT_FEATURES, "output feature")


def out_of_fold_logits(
    X_train: np.ndarray, y_train: np.ndarray, groups_train: np.ndarray, C: float, seed: int, n_folds: int = 5
) -> np.ndarray:
    """Probe log-odds for each training row from a probe that did not see that row's group.

    Why: a fusion model trained on in-sample probe scores would learn to trust an overfit score.
    """
    logits = np.zeros(len(y_train))
    with single_blas_thread():
        for tr, va in grouped_folds(y_train, groups_train, n_folds, seed):
            if np.unique(y_train[tr]).size < 2:
                continue
            logits[va] = fit_probe_pipeline(C, X_train[tr], y_train[tr]).decision_function(X_train[va])
    return logits


@dataclass(frozen=True)
class PermutationNull:
    """Held-out AUROC / R_pb of probes fitted to permuted training labels, and the real probe's p-value."""

    aurocs: np.ndarray
    r_pbs: np.ndarray
    first_scores: np.ndarray
    p_value: float

    def auroc(self) -> Estimate:
        return Estimate(float(self.aurocs.mean()), *map(float, np.quantile(self.aurocs, [0.025, 0.975])))

    def r_pb(self) -> Estimate | None:
        finite = self.r_pbs[np.isfinite(self.r_pbs)]
        if finite.size == 0:
            return None
        return Estimate(float(finite.mean()), *map(float, np.quantile(finite, [0.025, 0.975])))


def shuffled_label_null(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, C: float, probe_auroc: float,
    *, n_permutations: int = N_PERMUTATIONS, seed: int = 0,
) -> PermutationNull:
    """Fit the probe's pipeline (same features, same C) to ``n_permutations`` permutations of the training labels.

    p-value = (1 + #{permuted AUROC >= probe AUROC}) / (1 + n_permutations).
    """
    rng = np.random.default_rng(seed)
    aurocs, r_pbs, first = [], [], np.zeros(0)
    with single_blas_thread():
        for i in range(n_permutations):
            model = fit_probe_pipeline(C, X_train, rng.permutation(y_train))
            scores = model.predict_proba(X_test)[:, 1]
            aurocs.append(roc_auc_score(y_test, scores))
            r_pbs.append(stats.pointbiserialr(y_test, scores).statistic if np.ptp(scores) > 0 else np.nan)
            if i == 0:
                first = scores
    aurocs_arr = np.asarray(aurocs)
    p_value = float((1 + np.sum(aurocs_arr >= probe_auroc)) / (1 + n_permutations))
    return PermutationNull(aurocs_arr, np.asarray(r_pbs, dtype=float), first, p_value)


# --------------------------------------------------------------------------------------------------- the suite


@dataclass
class ControlSuite:
    """The probe, every control, fusion and the output baseline on one split, plus their paired gains."""

    grouping: str
    split: Split
    probe: Probe
    y_test: np.ndarray = field(repr=False)
    groups_test: np.ndarray = field(repr=False)
    signals: dict[str, ScoredSignal] = field(default_factory=dict)
    gains: dict[str, Gain] = field(default_factory=dict)
    permutation_null: PermutationNull | None = field(default=None, repr=False)

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([s.to_dict() for s in self.signals.values()])
        frame.insert(0, "grouping", self.grouping)
        frame["n_test"] = int(self.split.test.size)
        return frame

    def gains_frame(self) -> pd.DataFrame:
        return pd.DataFrame([g.to_dict() for g in self.gains.values()])


def probe_label(probe: Probe) -> str:
    layers = probe.info.layers
    where = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}–L{layers[-1]} concat"
    return f"probe ({probe.info.pooling} {where})"


def run_controls(
    reader: RunReader,
    split: Split | SplitSpec,
    probe: Probe | None = None,
    *,
    seed: int = 0,
    n_boot: int = 1000,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    n_permutations: int = N_PERMUTATIONS,
) -> ControlSuite:
    """Score the probe, the four controls, the output model, fusion and max-prob on ``split``'s test rows.

    ``probe`` must have been trained on this split's training rows (e.g. `LayerSweep.selected`'s probe); without
    one, the layer × pooling with the best training-CV AUROC is fitted here. Gains computed: probe over max-prob,
    item control, answer-only and no-model; fusion over the probe and over the output model. The shuffled-label
    control is a permutation null (see the module docstring), reported with the probe's permutation p-value.
    """
    rows = reader.rows
    if isinstance(split, SplitSpec):
        split = make_split(rows, split)
    grouping = split.spec.grouping
    if probe is None:
        probe = select_layer_probe(reader, split, seed=seed, c_grid=c_grid)
    probe.check_manifest(reader.manifest)
    trained_on = probe.info.split
    if trained_on and (trained_on.get("spec") != split.spec.to_dict() or trained_on.get("n_train") != int(split.train.size)):
        raise ValueError(
            f"the probe was trained on another split ({trained_on.get('spec')}, n_train={trained_on.get('n_train')}) "
            f"than the one the controls use ({split.spec.to_dict()}, n_train={split.train.size}); its test rows could leak"
        )
    train, test = split.train, split.test
    y = labels_of(rows)
    groups = group_keys(rows, grouping)
    y_train, y_test, groups_train = y[train], y[test], groups[train]
    states = reader.states(probe.info.pooling, probe.info.layers)
    states = states.reshape(states.shape[0], -1)

    def fitted(name: str, kind: str, description: str, X: np.ndarray, cost: str, note: str = "") -> ScoredSignal:
        model = fit_probe(X[train], y_train, groups_train, seed, c_grid=c_grid)
        return evaluate_scores(name, kind, description, y_test, model.score(X[test]), cost, n_boot=n_boot,
                               seed=seed, note=note, C=model.info.C, n_features=model.info.n_features)

    suite = ControlSuite(grouping, split, probe, y_test, groups[test])
    signals = suite.signals
    probe_name = probe_label(probe)
    signals["probe"] = evaluate_scores(
        probe_name, "probe", "logistic probe on the hidden state, layer/pooling chosen by training-split CV",
        y_test, probe.score(states[test]), "1× (same pass, 0 extra)", n_boot=n_boot, seed=seed,
        C=probe.info.C, n_features=probe.info.n_features,
    )
    signals["max_answer_prob"] = evaluate_scores(
        "max_answer_prob", "output", "max(p_yes, p_no)/(p_yes + p_no), raw (not fitted)", y_test,
        rows["max_answer_prob"].to_numpy(dtype=np.float64)[test], "1×", n_boot=n_boot, seed=seed,
    )
    X_answer, _ = answer_only_features(rows, train)
    signals["answer_only"] = fitted("control: answer-only", "control", "one-hot predicted answer", X_answer, "1×")
    X_item, _ = item_features(rows, train)
    signals["item_control"] = fitted(
        "control: item", "control", "one-hot (asked object × predicted answer) + output features", X_item, "1×",
        note="held-out items are unseen categories (all-zero indicators)" if grouping == "item" else "",
    )
    null = shuffled_label_null(states[train], y_train, states[test], y_test, probe.info.C,
                               signals["probe"].auroc.value, n_permutations=n_permutations, seed=seed)
    suite.permutation_null = null
    signals["shuffled_label_probe"] = ScoredSignal(
        "control: shuffled-label probe", "control",
        f"{probe_name} features and C, labels permuted within the training split (should centre on 0.5)",
        null.auroc(), null.r_pb(), "—", null.first_scores, probe.info.C, probe.info.n_features,
        note=(f"mean and 2.5–97.5% range over {n_permutations} label permutations (null distribution, not a "
              f"bootstrap CI); probe permutation p = {null.p_value:.3g}"),
    )
    X_none, _ = no_model_features(rows)
    signals["no_model"] = fitted("control: no-model features", "control", "image statistics + question length",
                                 X_none, "0× (no model pass)")
    X_out, _ = output_features(rows)
    signals["output_model"] = fitted("output features (fitted)", "output", "logistic model on all output features",
                                     X_out, "1×")
    oof = out_of_fold_logits(states[train], y_train, groups_train, probe.info.C, seed)
    fusion_X = np.zeros((len(rows), 1 + X_out.shape[1]))
    fusion_X[train, 0] = oof
    fusion_X[test, 0] = probe.decision_function(states[test])
    fusion_X[:, 1:] = X_out
    signals["fusion"] = fitted("fusion: probe + output features", "fusion",
                               "probe log-odds (out-of-fold on train) + output features in one model",
                               fusion_X, "1× (same pass, 0 extra)")

    comparisons = [
        ("probe", "max_answer_prob"), ("probe", "item_control"), ("probe", "answer_only"), ("probe", "no_model"),
        ("fusion", "probe"), ("fusion", "output_model"),
    ]
    for better, baseline in comparisons:
        suite.gains[f"{better}_vs_{baseline}"] = paired_gain(
            signals[better], signals[baseline], y_test, groups[test], grouping, n_boot=n_boot, seed=seed,
        )
    return suite


def run_all_controls(
    reader: RunReader,
    groupings: Sequence[str] = GROUPINGS,
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    n_boot: int = 1000,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    probes: dict[str, Probe] | None = None,
    n_permutations: int = N_PERMUTATIONS,
) -> dict[str, ControlSuite]:
    """`run_controls` on an image-grouped and an item-grouped split (held-out images, held-out items)."""
    suites = {}
    for grouping in groupings:
        split = make_split(reader.rows, SplitSpec(grouping, test_fraction, 0.0, seed))  # type: ignore[arg-type]
        suites[grouping] = run_controls(reader, split, (probes or {}).get(grouping), seed=seed, n_boot=n_boot,
                                        c_grid=c_grid, n_permutations=n_permutations)
    return suites
