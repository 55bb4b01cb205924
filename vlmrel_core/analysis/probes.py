"""Hidden-state probes: the probe object, fitting it (grouped-CV choice of C), safe save/load.

The layer sweep is in `sweep`, the multi-layer ensembles in `ensemble`.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.numpy import load_file, save_file

from vlmrel_core.validation.errors import InputError
from vlmrel_core import __version__
from vlmrel_core.analysis.auroc_kernels import auroc_rows
from vlmrel_core.analysis.metrics import as_binary_labels, require_both_classes
from vlmrel_core.analysis.splits import Split, SplitSpec, group_keys, grouped_folds, labels_of, make_split
from vlmrel_core.engine.store import RunManifest, RunReader
from vlmrel_core.io import atomic_write_text

if TYPE_CHECKING:  # scikit-learn is imported where a probe is fitted: loading and scoring one never need it
    from sklearn.pipeline import Pipeline
    from threadpoolctl import threadpool_limits

#: Inverse regularisation strengths tried by grouped CV (the prototype's probes wanted C = 10–100).
DEFAULT_C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_CV_FOLDS = 5
MAX_ITER = 2000
PROBE_SCHEMA_VERSION = 1
PROBE_JSON = "probe.json"
PROBE_TENSORS = "probe.safetensors"
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
        from scipy.special import expit

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
        atomic_write_text(directory / PROBE_JSON, self.info.model_dump_json(indent=1))
        return directory

    def _tensors(self) -> dict[str, np.ndarray]:
        return {
            "coef": np.ascontiguousarray(self.coef, dtype=np.float64),
            "intercept": np.asarray([self.intercept], dtype=np.float64),
            "scaler_mean": np.ascontiguousarray(self.scaler_mean, dtype=np.float64),
            "scaler_scale": np.ascontiguousarray(self.scaler_scale, dtype=np.float64),
        }


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
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def make_probe_pipeline(C: float) -> Pipeline:
    """The probe's sklearn form: standardise, then L2 logistic regression with inverse strength C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(C=C, max_iter=MAX_ITER))])


def fit_probe_pipeline(C: float, X: np.ndarray, y: np.ndarray) -> Pipeline:
    """``make_probe_pipeline(C).fit(X, y)``, the logistic step fitted by `logistic_fit.fit_logistic` (same numbers,
    less scikit-learn overhead per L-BFGS step)."""
    from vlmrel_core.analysis.logistic_fit import fit_logistic

    pipeline = make_probe_pipeline(C)
    standardised = pipeline.named_steps["scale"].fit_transform(X, y)
    fit_logistic(pipeline.named_steps["logreg"], standardised, y)
    return pipeline


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
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vlmrel_core.analysis.logistic_fit import fit_logistic

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
                fit_logistic(model, X_tr, y[tr])
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
    from sklearn.exceptions import ConvergenceWarning

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
    with warnings.catch_warnings(), single_blas_thread():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline = fit_probe_pipeline(C, features, labels)
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


def resolve_split(reader: RunReader, split: Split | SplitSpec | None) -> Split:
    """``split`` as a Split of this run's rows (None: the default image-grouped SplitSpec)."""
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
    layer_states: np.ndarray | None = None,
) -> Probe:
    """A probe on one run's training rows: one layer (single_layer) or several concatenated (concat_layers).

    To avoid re-reading, ``states`` may pass the already-loaded (n, n_layers_extracted, d) array of ``pooling``, or
    ``layer_states`` the (n, len(layers), d) array of exactly ``layers`` (what `RunReader.states(pooling, layers)`
    returns: the way to keep one layer in memory at a time).
    """
    split = resolve_split(reader, split)
    manifest = reader.manifest
    layers = list(layers)
    if layer_states is not None:
        if layer_states.shape[1] != len(layers):
            raise ValueError(f"layer_states holds {layer_states.shape[1]} layers, {len(layers)} asked")
        X = layer_states
    elif states is None:
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
    split = resolve_split(reader, split)
    best: Probe | None = None
    for pooling in poolings if poolings is not None else reader.manifest.poolings:
        for layer in reader.manifest.layers:  # one layer in memory at a time
            probe = fit_run_probe(reader, pooling, [layer], split, seed, c_grid=c_grid)
            score = -1.0 if probe.info.cv_auroc is None else probe.info.cv_auroc
            if best is None or score >= (-1.0 if best.info.cv_auroc is None else best.info.cv_auroc):
                best = probe
    assert best is not None
    return best
