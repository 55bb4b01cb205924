"""Hidden-state probes: per-layer logistic regression, the layer sweep, multi-layer ensembles, safe save/load.

Why this shape:
* A probe is StandardScaler + LogisticRegression, with C chosen by *grouped* cross-validation on the training
  split only, so neither the test rows nor the training rows' images/items leak into the choice.
* A fitted probe is four arrays (coef, intercept, scaler mean/scale) plus a JSON description. `Probe.score` is
  plain numpy on those arrays, so the gate can score live captures without sklearn objects, and the saved form is
  safetensors + JSON: nothing is unpickled, and a probe refuses to load against a model it was not trained on.
* Every reported AUROC is held-out, with a bootstrap 95% CI (`metrics.auroc_ci`, resampling test rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.numpy import load_file, save_file
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from vlmrel_core.validation.errors import InputError
from vlmrel_core import __version__
from vlmrel_core.analysis.metrics import Estimate, as_binary_labels, auroc_rows, require_both_classes, auroc_ci
from vlmrel_core.analysis.splits import Split, SplitSpec, group_keys, grouped_folds, labels_of, make_split
from vlmrel_core.engine.store import RunManifest, RunReader

#: Inverse regularisation strengths tried by grouped CV (the prototype's probes wanted C = 10–100).
DEFAULT_C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_CV_FOLDS = 5
MAX_ITER = 2000
PROBE_SCHEMA_VERSION = 1
PROBE_JSON = "probe.json"
PROBE_TENSORS = "probe.safetensors"
ENSEMBLE_JSON = "ensemble.json"
_TENSOR_NAMES = ("coef", "intercept", "scaler_mean", "scaler_scale")


class ProbeError(InputError):
    """A probe that cannot be used as asked (wrong model, damaged files, wrong input shape), said in words."""


# --------------------------------------------------------------------------------------------------- the probe


class ProbeInfo(BaseModel):
    """Everything needed to decide whether a saved probe applies to a model and what it was trained on."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    schema_version: int = PROBE_SCHEMA_VERSION
    kind: Literal["single_layer", "concat_layers", "features"] = "features"
    pooling: str = ""
    layers: list[int] = []
    hidden_size: int
    n_features: int
    model_fingerprint: str = ""
    model_source: str = ""
    dataset_hash: str = ""
    training_data_hash: str
    split: dict[str, Any] = {}
    C: float
    c_grid: list[float]
    cv_auroc_by_c: list[float | None]
    cv_auroc: float | None
    cv_folds: int
    seed: int
    n_train: int
    n_train_correct: int
    converged: bool
    feature_names: list[str] = []
    metrics: dict[str, Any] = {}
    tensors_sha256: str = ""
    vlmrel_version: str = __version__


@dataclass
class Probe:
    """A fitted linear probe in standardised units: score = sigmoid(((x - mean) / scale) · coef + intercept).

    ``pipeline`` is the sklearn object it came from, kept in memory after `fit_probe` for cross-checks only; it is
    never saved and is None after `load_probe`.
    """

    coef: np.ndarray
    intercept: float
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    info: ProbeInfo
    pipeline: Pipeline | None = field(default=None, repr=False, compare=False)

    def features(self, states: np.ndarray) -> np.ndarray:
        """(n, n_features) float64 from (n, d) or, for a multi-layer probe, (n, k, d) states."""
        array = np.asarray(states, dtype=np.float64)
        if array.ndim == 3:
            array = array.reshape(array.shape[0], -1)
        if array.ndim != 2:
            raise ProbeError(f"states must be (n, {self.info.n_features}) (use x[None] for one sample), got {array.shape}")
        if array.shape[1] != self.info.n_features:
            raise ProbeError(
                f"this probe expects {self.info.n_features} features per sample "
                f"({len(self.info.layers) or 1} layer(s) × hidden size {self.info.hidden_size}), got {array.shape[1]}"
            )
        if not np.isfinite(array).all():
            raise ProbeError("states contain NaN or infinite values")
        return array

    def decision_function(self, states: np.ndarray) -> np.ndarray:
        """Log-odds of "the answer is correct"; the same ranking as `score`."""
        standardised = (self.features(states) - self.scaler_mean) / self.scaler_scale
        return standardised @ self.coef + self.intercept

    def score(self, states: np.ndarray) -> np.ndarray:
        """P(correct) per sample; equals the sklearn pipeline's predict_proba[:, 1]."""
        return expit(self.decision_function(states))

    @property
    def raw_weights(self) -> np.ndarray:
        """Weights in the units of the raw hidden state (coef / scale): the direction a state is read along."""
        return self.coef / self.scaler_scale

    def ranked_dimensions(self) -> np.ndarray:
        """Feature indices by |standardised coefficient|, largest first: the "top probe-weighted dimensions".

        Standardised, because a raw weight is large on a dimension that merely has a small spread.
        """
        return np.argsort(-np.abs(self.coef), kind="stable")

    def check_manifest(self, manifest: RunManifest) -> None:
        """Raise ProbeError if the run's model, hidden size, pooling or layers do not fit this probe."""
        _check_identity(self.info, manifest.model_fingerprint, manifest.hidden_size, "the run")
        if self.info.pooling and self.info.pooling not in manifest.poolings:
            raise ProbeError(f"probe uses pooling {self.info.pooling!r}; the run has {manifest.poolings}")
        missing = [l for l in self.info.layers if l not in manifest.layers]
        if missing:
            raise ProbeError(f"probe reads layers {missing}, which the run did not extract ({manifest.layers})")

    def save(self, directory: str | Path) -> Path:
        """Write probe.safetensors (the four arrays) and probe.json (ProbeInfo, with the arrays' checksum)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors()
        self.info = self.info.model_copy(update={"tensors_sha256": _tensors_digest(tensors)})
        save_file(tensors, str(directory / PROBE_TENSORS))
        _atomic_write(directory / PROBE_JSON, self.info.model_dump_json(indent=1))
        return directory

    def _tensors(self) -> dict[str, np.ndarray]:
        return {
            "coef": np.ascontiguousarray(self.coef, dtype=np.float64),
            "intercept": np.asarray([self.intercept], dtype=np.float64),
            "scaler_mean": np.ascontiguousarray(self.scaler_mean, dtype=np.float64),
            "scaler_scale": np.ascontiguousarray(self.scaler_scale, dtype=np.float64),
        }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def training_data_hash(X: np.ndarray, y: np.ndarray) -> str:
    """sha256 of the exact training matrix (as float32) and labels: two probes with equal hashes saw equal data."""
    digest = hashlib.sha256()
    features = np.ascontiguousarray(X, dtype=np.float32)
    digest.update(f"{features.shape}|".encode())
    digest.update(features.tobytes())
    digest.update(np.ascontiguousarray(y, dtype=np.int8).tobytes())
    return digest.hexdigest()


def _check_identity(info: ProbeInfo, fingerprint: str | None, hidden_size: int | None, what: str) -> None:
    if fingerprint is not None and info.model_fingerprint != fingerprint:
        raise ProbeError(
            f"model fingerprint mismatch: the probe was trained on model {info.model_fingerprint!r} "
            f"({info.model_source or 'unknown source'}), but {what} is model {fingerprint!r}"
        )
    if hidden_size is not None and info.hidden_size != hidden_size:
        raise ProbeError(
            f"hidden size mismatch: the probe was trained on hidden size {info.hidden_size}, but {what} has {hidden_size}"
        )


def load_probe(
    directory: str | Path, expected_fingerprint: str | None = None, expected_hidden_size: int | None = None
) -> Probe:
    """Load a saved probe, checking integrity (schema, shapes, checksum) and, if given, the model it is for.

    Raises ProbeError naming the problem: missing or damaged files, a checksum mismatch (edited arrays), or a
    model fingerprint / hidden size different from the expected one.
    """
    directory = Path(directory)
    json_path, tensor_path = directory / PROBE_JSON, directory / PROBE_TENSORS
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise ProbeError(f"{directory} is not a saved probe (no {path.name})")
    try:
        info = ProbeInfo.model_validate_json(json_path.read_text())
    except (ValidationError, ValueError, UnicodeDecodeError) as err:
        raise ProbeError(f"{json_path} is not a valid vlmrel probe description: {err}") from err
    if info.schema_version != PROBE_SCHEMA_VERSION:
        raise ProbeError(f"{json_path} has probe schema {info.schema_version}; this vlmrel reads {PROBE_SCHEMA_VERSION}")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:  # safetensors raises several types for damaged files
        raise ProbeError(f"cannot read {tensor_path}: damaged or not a safetensors file ({err})") from err
    if set(tensors) != set(_TENSOR_NAMES):
        raise ProbeError(f"{tensor_path} holds {sorted(tensors)}, expected {sorted(_TENSOR_NAMES)}")
    if _tensors_digest(tensors) != info.tensors_sha256:
        raise ProbeError(f"{tensor_path} does not match the checksum in {json_path.name}: edited, damaged or from another probe")
    n = info.n_features
    for name in ("coef", "scaler_mean", "scaler_scale"):
        if tensors[name].shape != (n,):
            raise ProbeError(f"{tensor_path}: {name} has shape {tensors[name].shape}, expected ({n},)")
    if tensors["intercept"].shape != (1,):
        raise ProbeError(f"{tensor_path}: intercept has shape {tensors['intercept'].shape}, expected (1,)")
    if not all(np.isfinite(t).all() for t in tensors.values()) or (tensors["scaler_scale"] <= 0).any():
        raise ProbeError(f"{tensor_path} holds non-finite values or a non-positive scale")
    _check_identity(info, expected_fingerprint, expected_hidden_size, "the model it is being loaded for")
    return Probe(
        coef=tensors["coef"],
        intercept=float(tensors["intercept"][0]),
        scaler_mean=tensors["scaler_mean"],
        scaler_scale=tensors["scaler_scale"],
        info=info,
    )


# --------------------------------------------------------------------------------------------------- fitting


def single_blas_thread() -> threadpool_limits:
    """Limit BLAS to one thread while fitting: these problems are small, and on a shared 2-core machine a second
    BLAS thread only adds contention (measured: lbfgs fits ~5× slower with 2 threads under load)."""
    return threadpool_limits(limits=1, user_api="blas")


def make_probe_pipeline(C: float) -> Pipeline:
    """The probe's sklearn form: standardise, then L2 logistic regression with inverse strength C."""
    return Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(C=C, max_iter=MAX_ITER))])


def _as_matrix(X: np.ndarray) -> np.ndarray:
    array = np.asarray(X, dtype=np.float64)
    if array.ndim == 3:
        array = array.reshape(array.shape[0], -1)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ProbeError(f"features must be a non-empty (n, d) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ProbeError("features contain NaN or infinite values")
    return array


def cv_auroc_by_c(
    X: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], c_grid: Sequence[float]
) -> np.ndarray:
    """Mean validation AUROC over grouped folds for each C (NaN where no fold had both classes).

    Each fold fits its own scaler on the fold's training part and walks C upward with warm starts (the same
    optimum, found faster), so the choice of C never sees a validation row. Validation AUROC is the Mann–Whitney
    form of `metrics` (identical to sklearn's, without its per-call validation overhead).
    """
    grid = list(c_grid)
    per_fold = np.full((len(folds), len(grid)), np.nan)
    for f, (tr, va) in enumerate(folds):
        if np.unique(y[tr]).size < 2 or np.unique(y[va]).size < 2:
            continue
        scaler = StandardScaler().fit(X[tr])
        X_tr, X_va = scaler.transform(X[tr]), scaler.transform(X[va])
        model = LogisticRegression(C=grid[0], max_iter=MAX_ITER, warm_start=True)
        order = np.argsort(grid)
        for j in order:
            model.set_params(C=grid[j])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X_tr, y[tr])
            per_fold[f, j] = auroc_rows(y[va][None, :], model.decision_function(X_va)[None, :])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_fold, axis=0)


def fit_probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    seed: int = 0,
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    n_folds: int = DEFAULT_CV_FOLDS,
    **info: Any,
) -> Probe:
    """Fit StandardScaler + LogisticRegression on (X, y); C = the grid value with the best grouped-CV AUROC.

    ``groups`` (image or item keys of the training rows) keep a group inside one fold. Ties in CV AUROC go to the
    smaller C (stronger regularisation). ``info`` fills `ProbeInfo` fields (pooling, layers, model_fingerprint,
    ...); hidden_size defaults to the feature count.
    """
    features = _as_matrix(X)
    labels = as_binary_labels(np.asarray(y), "y")
    groups = np.asarray(groups)
    if labels.shape[0] != features.shape[0] or groups.shape[0] != features.shape[0]:
        raise ProbeError(f"X has {features.shape[0]} rows, y {labels.shape[0]}, groups {groups.shape[0]}")
    require_both_classes(labels, "a probe")
    if not c_grid:
        raise ProbeError("c_grid is empty")
    folds = grouped_folds(labels, groups, n_folds, seed)
    with single_blas_thread():
        cv_scores = cv_auroc_by_c(features, labels, folds, c_grid)
    if np.isnan(cv_scores).all():
        raise ProbeError("no cross-validation fold had both correct and wrong answers; cannot choose C")
    finite = np.where(np.isnan(cv_scores), -np.inf, cv_scores)
    ties = np.flatnonzero(finite >= finite.max() - 1e-12)
    best = int(min(ties, key=lambda i: c_grid[i]))
    C = float(c_grid[best])
    pipeline = make_probe_pipeline(C)
    with warnings.catch_warnings(), single_blas_thread():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(features, labels)
    scaler, model = pipeline.named_steps["scale"], pipeline.named_steps["logreg"]
    fields: dict[str, Any] = dict(
        hidden_size=features.shape[1],
        n_features=features.shape[1],
        training_data_hash=training_data_hash(features, labels),
        C=C,
        c_grid=[float(c) for c in c_grid],
        cv_auroc_by_c=[None if np.isnan(v) else float(v) for v in cv_scores],
        cv_auroc=float(cv_scores[best]),
        cv_folds=len(folds),
        seed=seed,
        n_train=int(labels.size),
        n_train_correct=int(labels.sum()),
        converged=bool(np.all(model.n_iter_ < MAX_ITER)),
    )
    fields.update(info)
    return Probe(
        coef=model.coef_[0].astype(np.float64).copy(),
        intercept=float(model.intercept_[0]),
        scaler_mean=scaler.mean_.astype(np.float64).copy(),
        scaler_scale=scaler.scale_.astype(np.float64).copy(),
        info=ProbeInfo(**fields),
        pipeline=pipeline,
    )


def _resolve_split(reader: RunReader, split: Split | SplitSpec | None) -> Split:
    if split is None:
        return make_split(reader.rows, SplitSpec("image"))
    if isinstance(split, SplitSpec):
        return make_split(reader.rows, split)
    return split


def fit_run_probe(
    reader: RunReader,
    pooling: str,
    layers: Sequence[int],
    split: Split | SplitSpec | None = None,
    seed: int = 0,
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    states: np.ndarray | None = None,
) -> Probe:
    """A probe on one run's training rows: one layer (single_layer) or several concatenated (concat_layers).

    ``states`` may pass the already-loaded (n, n_layers_extracted, d) array of ``pooling`` to avoid re-reading.
    """
    split = _resolve_split(reader, split)
    manifest = reader.manifest
    layers = list(layers)
    if states is None:
        X = reader.states(pooling, layers)
    else:
        X = states[:, [manifest.layers.index(l) for l in layers]]
    rows = reader.rows
    y = labels_of(rows)
    groups = group_keys(rows, split.spec.grouping)
    train = split.train
    return fit_probe(
        X[train], y[train], groups[train], seed, c_grid=c_grid,
        kind="single_layer" if len(layers) == 1 else "concat_layers",
        pooling=pooling, layers=layers, hidden_size=manifest.hidden_size,
        model_fingerprint=manifest.model_fingerprint, model_source=manifest.model_source,
        dataset_hash=manifest.dataset_hash, split=split.summary(),
    )


def select_layer_probe(
    reader: RunReader,
    split: Split | SplitSpec | None = None,
    poolings: Sequence[str] | None = None,
    seed: int = 0,
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
) -> Probe:
    """The single-layer probe with the best grouped-CV AUROC on the training split, over layers × ``poolings``.

    Why: comparisons against controls must not pick the layer on the test rows they are scored on.
    """
    split = _resolve_split(reader, split)
    best: Probe | None = None
    for pooling in poolings if poolings is not None else reader.manifest.poolings:
        states = reader.states(pooling)
        for layer in reader.manifest.layers:
            probe = fit_run_probe(reader, pooling, [layer], split, seed, c_grid=c_grid, states=states)
            score = -1.0 if probe.info.cv_auroc is None else probe.info.cv_auroc
            if best is None or score >= (-1.0 if best.info.cv_auroc is None else best.info.cv_auroc):
                best = probe
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------------- layer sweep


@dataclass(frozen=True)
class LayerResult:
    """One (pooling, layer) probe: held-out AUROC with its 95% CI, and how it was fitted."""

    pooling: str
    layer: int
    auroc: Estimate
    cv_auroc: float
    C: float
    n_train: int
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling, "layer": self.layer, "auroc": self.auroc.value, "auroc_low": self.auroc.low,
            "auroc_high": self.auroc.high, "cv_auroc": self.cv_auroc, "C": self.C, "n_train": self.n_train,
            "n_test": self.n_test,
        }


@dataclass
class LayerSweep:
    """Per layer × pooling held-out probe AUROC on one split, with the fitted probes and their test scores."""

    results: list[LayerResult]
    split: Split
    model_fingerprint: str
    run_dir: str
    probes: dict[tuple[str, int], Probe] = field(default_factory=dict, repr=False)
    test_scores: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def poolings(self) -> list[str]:
        return list(dict.fromkeys(r.pooling for r in self.results))

    def _of(self, pooling: str | None) -> list[LayerResult]:
        chosen = [r for r in self.results if pooling is None or r.pooling == pooling]
        if not chosen:
            raise ProbeError(f"the sweep has no results for pooling {pooling!r}; it has {self.poolings}")
        return chosen

    def best(self, pooling: str | None = None) -> LayerResult:
        """Highest held-out AUROC point estimate (of one pooling, or over all); ties go to the earlier layer.

        Descriptive only: choosing by test AUROC and then quoting it is optimistic. Use `selected` to pick the probe
        that other comparisons (controls, transfer) use.
        """
        return max(self._of(pooling), key=lambda r: (r.auroc.value, -r.layer))

    def plateau(self, pooling: str | None = None) -> list[LayerResult]:
        """The layers statistically indistinguishable from the best one, by a one-sided CI rule.

        Precisely: with b = `best(pooling)`, the plateau is every result r (of that pooling; over all poolings
        when pooling is None) whose held-out AUROC 95% CI upper bound r.auroc.high >= b.auroc.value, the best
        layer's point estimate. It always contains b. The CIs are the row bootstrap of `metrics.auroc_ci` on the
        same test rows. Choose a layer from the plateau (e.g. the earliest, or `selected`), not the argmax.
        """
        top = self.best(pooling).auroc.value
        return [r for r in self._of(pooling) if r.auroc.high >= top]

    def selected(self, pooling: str | None = None) -> LayerResult:
        """The probe chosen without test data: highest grouped-CV AUROC on the training split (ties: later layer)."""
        return max(self._of(pooling), key=lambda r: (r.cv_auroc, r.layer))

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([r.to_dict() for r in self.results])
        best = {p: self.best(p).layer for p in self.poolings}
        plateaus = {p: {r.layer for r in self.plateau(p)} for p in self.poolings}
        selected = self.selected()
        frame["best_of_pooling"] = [best[p] == l for p, l in zip(frame["pooling"], frame["layer"])]
        frame["in_plateau"] = [l in plateaus[p] for p, l in zip(frame["pooling"], frame["layer"])]
        frame["cv_selected"] = [(p, l) == (selected.pooling, selected.layer) for p, l in zip(frame["pooling"], frame["layer"])]
        return frame

    def to_dict(self) -> dict[str, Any]:
        overall, selected = self.best(), self.selected()
        return {
            "run_dir": self.run_dir,
            "model_fingerprint": self.model_fingerprint,
            "split": self.split.summary(),
            "results": [r.to_dict() for r in self.results],
            "best": {p: self.best(p).to_dict() for p in self.poolings},
            "best_overall": overall.to_dict(),
            "plateau": {p: [r.layer for r in self.plateau(p)] for p in self.poolings},
            "plateau_overall": [[r.pooling, r.layer] for r in self.plateau()],
            "cv_selected": selected.to_dict(),
            "plateau_rule": "layers whose held-out AUROC 95% CI upper bound >= the best layer's point estimate",
        }


def sweep_layers(
    reader: RunReader,
    poolings: Sequence[str] | None = None,
    split: Split | SplitSpec | None = None,
    *,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
) -> LayerSweep:
    """Fit one probe per (pooling, layer) on the training rows and score the held-out rows.

    ``poolings`` / ``layers`` default to everything the run extracted; ``split`` defaults to an image-grouped
    SplitSpec(). Memory: one pooling's (n, n_layers, d) float32 states at a time.
    """
    split = _resolve_split(reader, split)
    manifest = reader.manifest
    poolings = list(poolings) if poolings is not None else list(manifest.poolings)
    layers = list(layers) if layers is not None else list(manifest.layers)
    y = labels_of(reader.rows)
    y_test = y[split.test]
    results: list[LayerResult] = []
    probes: dict[tuple[str, int], Probe] = {}
    scores: dict[tuple[str, int], np.ndarray] = {}
    for pooling in poolings:
        states = reader.states(pooling)
        for layer in layers:
            probe = fit_run_probe(reader, pooling, [layer], split, seed, c_grid=c_grid, states=states)
            test_score = probe.score(states[split.test, manifest.layers.index(layer)])
            estimate = auroc_ci(y_test, test_score, n_boot=n_boot, seed=seed)
            probe.info.metrics.update({"test_auroc": estimate.to_dict(), "n_test": int(split.test.size)})
            cv = probe.info.cv_auroc
            results.append(LayerResult(pooling, layer, estimate, float("nan") if cv is None else cv, probe.info.C,
                                       int(split.train.size), int(split.test.size)))
            probes[(pooling, layer)] = probe
            scores[(pooling, layer)] = test_score
    return LayerSweep(results, split, manifest.model_fingerprint, str(reader.run_dir), probes, scores)


# --------------------------------------------------------------------------------------------------- ensembles


@dataclass
class MeanScoreEnsemble:
    """Late fusion over layers: the mean of per-layer probes' P(correct). Members share one pooling."""

    members: list[Probe]

    @property
    def layers(self) -> list[int]:
        return [m.info.layers[0] for m in self.members]

    def score(self, states: np.ndarray) -> np.ndarray:
        """states: (n, k, d) with the k member layers in `layers` order."""
        array = np.asarray(states)
        if array.ndim != 3 or array.shape[1] != len(self.members):
            raise ProbeError(f"expected states of shape (n, {len(self.members)}, d) for layers {self.layers}, got {array.shape}")
        return np.mean([m.score(array[:, i]) for i, m in enumerate(self.members)], axis=0)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = []
        for member in self.members:
            name = f"layer-{member.info.layers[0]:03d}"
            member.save(directory / name)
            names.append(name)
        _atomic_write(directory / ENSEMBLE_JSON, json.dumps({"kind": "mean_score", "members": names}, indent=1))
        return directory


def load_ensemble(
    directory: str | Path, expected_fingerprint: str | None = None, expected_hidden_size: int | None = None
) -> MeanScoreEnsemble:
    """Load a saved mean-score ensemble; every member is checked like `load_probe`."""
    directory = Path(directory)
    try:
        spec = json.loads((directory / ENSEMBLE_JSON).read_text())
        names = [str(n) for n in spec["members"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ProbeError(f"{directory} is not a saved probe ensemble: {err}") from err
    if any("/" in n or n.startswith(".") for n in names):
        raise ProbeError(f"{directory / ENSEMBLE_JSON} names members outside its directory")
    return MeanScoreEnsemble([load_probe(directory / n, expected_fingerprint, expected_hidden_size) for n in names])


@dataclass
class EnsembleResult:
    """The two multi-layer variants on one split: concatenated last-k states, and mean of per-layer scores."""

    pooling: str
    layers: list[int]
    concat: Probe
    mean_score: MeanScoreEnsemble
    concat_auroc: Estimate
    mean_score_auroc: Estimate
    concat_test_scores: np.ndarray = field(repr=False)
    mean_score_test_scores: np.ndarray = field(repr=False)


def fit_ensembles(
    reader: RunReader,
    pooling: str,
    split: Split | SplitSpec | None = None,
    k: int = 5,
    seed: int = 0,
    *,
    n_boot: int = 1000,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    sweep: LayerSweep | None = None,
) -> EnsembleResult:
    """Both ensembles over the last ``k`` extracted layers (fewer if the run has fewer), held-out AUROC with CI.

    Member probes of the mean-score ensemble are taken from ``sweep`` when it was run on the same split.
    """
    split = _resolve_split(reader, split)
    manifest = reader.manifest
    layers = list(manifest.layers)[-k:]
    states = reader.states(pooling)
    y_test = labels_of(reader.rows)[split.test]
    concat = fit_run_probe(reader, pooling, layers, split, seed, c_grid=c_grid, states=states)
    columns = [manifest.layers.index(l) for l in layers]
    test_states = states[split.test][:, columns]
    concat_scores = concat.score(test_states)
    reuse = sweep is not None and np.array_equal(sweep.split.test, split.test)
    members = [
        sweep.probes[(pooling, l)] if reuse and (pooling, l) in sweep.probes
        else fit_run_probe(reader, pooling, [l], split, seed, c_grid=c_grid, states=states)
        for l in layers
    ]
    ensemble = MeanScoreEnsemble(members)
    mean_scores = ensemble.score(test_states)
    return EnsembleResult(
        pooling, layers, concat, ensemble,
        auroc_ci(y_test, concat_scores, n_boot=n_boot, seed=seed),
        auroc_ci(y_test, mean_scores, n_boot=n_boot, seed=seed),
        concat_scores, mean_scores,
    )


# --------------------------------------------------------------------------------------------------- writing


def write_sweep(sweep: LayerSweep, out_dir: str | Path) -> list[Path]:
    """sweep.csv (one row per pooling × layer), sweep.json (best, plateau, CV-selected, split) and sweep.md."""
    from vlmrel_core.analysis.report import markdown_table, format_estimate  # the report owns table formatting

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = sweep.to_frame()
    frame.to_csv(out / "sweep.csv", index=False)
    (out / "sweep.json").write_text(json.dumps(sweep.to_dict(), indent=1))
    shown = pd.DataFrame({
        "pooling": frame["pooling"],
        "layer": frame["layer"],
        "held-out AUROC [95% CI]": [format_estimate(Estimate(v, lo, hi)) for v, lo, hi in
                                    zip(frame["auroc"], frame["auroc_low"], frame["auroc_high"])],
        "train CV AUROC": frame["cv_auroc"].round(3),
        "C": frame["C"],
        "best": frame["best_of_pooling"].map({True: "best", False: ""}),
        "plateau": frame["in_plateau"].map({True: "yes", False: ""}),
    })
    summary = sweep.to_dict()
    lines = [
        f"# Layer sweep: {sweep.run_dir}",
        "",
        f"Split: {sweep.split.spec.grouping}-grouped, n_train={sweep.split.train.size}, n_test={sweep.split.test.size}, "
        f"seed={sweep.split.spec.seed}. Held-out AUROC with row-bootstrap 95% CI.",
        f"Plateau rule: {summary['plateau_rule']}.",
        f"Best overall (by test AUROC, descriptive): {sweep.best().pooling} layer {sweep.best().layer}; "
        f"selected by training-split CV (used elsewhere): {sweep.selected().pooling} layer {sweep.selected().layer}.",
        "",
        markdown_table(shown),
    ]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    return [out / "sweep.csv", out / "sweep.json", out / "sweep.md"]
