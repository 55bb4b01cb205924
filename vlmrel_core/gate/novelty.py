"""Is this one input like the inputs the gate was certified on? A per-input novelty score from the probe state.

Why: the risk certificate holds only on the distribution of the calibration split. A calibrated confidence does not
know when it is off that distribution (on photographs the tiny models grow *more* confident), so the gate scores
each input's probe-layer state — the state it already captured, no extra pass — for distance from the training
states, and sends inputs beyond a threshold to the fallback as "out of distribution".

With ``image`` set (`gate.image_novelty`), an input is also novel when its image statistics are far from the
training images'; the two thresholds are then set jointly for the same total false-reject rate.

Two scores: the Mahalanobis distance under a shrinkage covariance (Ledoit–Wolf or OAS, fitted on the train split)
and the mean Euclidean distance to the k nearest training states (standardised per dimension). The threshold is a
quantile of the calibration split's scores, set for a chosen in-domain false-reject rate. Saved as safetensors
(tensors) + JSON (everything else); nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import save_file
from sklearn.covariance import OAS, LedoitWolf

from vlmrel_core.gate.image_novelty import IMAGE_FILES, ImageNoveltyModel, joint_thresholds
from vlmrel_core.io import atomic_write_text, read_json_and_tensors

NoveltyMethod = Literal["mahalanobis", "knn"]
Shrinkage = Literal["ledoit_wolf", "oas"]
NOVELTY_METHODS: tuple[str, ...] = ("mahalanobis", "knn")
NOVELTY_SCHEMA_VERSION = 1
DEFAULT_FALSE_REJECT_RATE = 0.02
DEFAULT_K = 10
# A reference sample of held-out states rides along for the window tests (classifier two-sample test, MMD).
DEFAULT_REFERENCE_SIZE = 400


class NoveltyError(ValueError):
    """A novelty model that cannot be fitted, loaded or applied as asked."""


def _as_states(states: Any, name: str) -> np.ndarray:
    array = np.asarray(states, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise NoveltyError(f"{name}: expected a non-empty (n, d) array of states, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise NoveltyError(f"{name}: states contain NaN or inf")
    return array


@dataclass
class NoveltyModel:
    """Fitted novelty score + threshold. ``score(states)`` is larger for stranger inputs."""

    method: NoveltyMethod
    mean: np.ndarray
    scale: np.ndarray  # per-dimension std of the train states (k-NN standardisation)
    precision: np.ndarray | None  # shrinkage inverse covariance (Mahalanobis)
    bank: np.ndarray | None  # standardised train states (k-NN)
    k: int
    threshold: float
    false_reject_rate: float
    reference_states: np.ndarray  # held-out in-domain states for window tests
    reference_scores: np.ndarray  # calibration split's novelty scores (window novelty-rate tests)
    info: dict[str, Any] = field(default_factory=dict)
    image: ImageNoveltyModel | None = None  # image statistics, thresholds set jointly (`attach_image`)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def score(self, states: Any) -> np.ndarray:
        """Novelty of each row of (n, d) states (Mahalanobis distance, or mean distance to k nearest neighbours)."""
        x = _as_states(states, "states")
        if x.shape[1] != self.dim:
            raise NoveltyError(f"states have {x.shape[1]} features; the novelty model was fitted on {self.dim}")
        if self.method == "mahalanobis":
            assert self.precision is not None
            centred = x - self.mean
            return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))
        assert self.bank is not None
        z = (x - self.mean) / self.scale
        sq = (z * z).sum(1)[:, None] + (self.bank * self.bank).sum(1)[None, :] - 2.0 * z @ self.bank.T
        dist = np.sqrt(np.maximum(sq, 0.0))
        k = min(self.k, self.bank.shape[0])
        return np.sort(dist, axis=1)[:, :k].mean(axis=1)

    def is_novel(self, states: Any, image_features: Any | None = None) -> np.ndarray:
        """Novel by the state score, or (with an image model and ``image_features``) by the image score."""
        novel = self.score(states) > self.threshold
        if self.image is not None and image_features is not None:
            novel |= self.image.score(image_features) > self.image.threshold
        return novel

    def attach_image(self, image: ImageNoveltyModel) -> "NoveltyModel":
        """Add the image-statistics score and re-set both thresholds jointly on the calibration rows
        (`image_novelty.joint_thresholds`): the share of calibration inputs novel by either score stays at
        ``false_reject_rate``. ``image.reference_scores`` must be row-aligned with ``self.reference_scores``."""
        state_t, image_t, rate = joint_thresholds(self.reference_scores, image.reference_scores, self.false_reject_rate)
        self.info["state_only_threshold"] = float(self.threshold)
        self.threshold, image.threshold, self.image = state_t, image_t, image
        self.info["joint_per_score_rate"] = rate
        return self

    @property
    def base_novel_rate(self) -> float:
        """Share of calibration inputs novel by the score(s) in use (the window novelty-rate test's null rate)."""
        if not self.reference_scores.size:
            return 0.0
        novel = self.reference_scores > self.threshold
        if self.image is not None and self.image.reference_scores.shape == self.reference_scores.shape:
            novel = novel | (self.image.reference_scores > self.image.threshold)
        return float(novel.mean())

    # ---- persistence ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """``novelty.safetensors`` (arrays) + ``novelty.json`` (method, threshold, provenance) in ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "scale": self.scale, "reference_states": self.reference_states,
                   "reference_scores": self.reference_scores}
        if self.precision is not None:
            tensors["precision"] = self.precision
        if self.bank is not None:
            tensors["bank"] = self.bank
        tmp = out / "novelty.safetensors.tmp"
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp))
        tmp.replace(out / "novelty.safetensors")
        meta = {"schema_version": NOVELTY_SCHEMA_VERSION, "method": self.method, "k": self.k,
                "threshold": float(self.threshold), "false_reject_rate": float(self.false_reject_rate),
                "info": self.info}
        atomic_write_text(out / "novelty.json", json.dumps(meta, indent=1))
        if self.image is not None:
            self.image.save(out)
        else:  # a refit without image statistics must not leave the previous ones behind
            for name in IMAGE_FILES:
                (out / name).unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "NoveltyModel":
        d = Path(directory)
        meta_path, tensor_path = d / "novelty.json", d / "novelty.safetensors"
        meta, tensors = read_json_and_tensors(d, meta_path.name, tensor_path.name, NoveltyError)
        if meta.get("schema_version") != NOVELTY_SCHEMA_VERSION:
            raise NoveltyError(f"{meta_path}: schema {meta.get('schema_version')!r}, expected {NOVELTY_SCHEMA_VERSION}")
        if meta.get("method") not in NOVELTY_METHODS:
            raise NoveltyError(f"{meta_path}: unknown method {meta.get('method')!r}; expected one of {NOVELTY_METHODS}")
        t = {k: v.astype(np.float64) for k, v in tensors.items()}
        needed = "precision" if meta["method"] == "mahalanobis" else "bank"
        missing = [k for k in ("mean", "scale", "reference_states", "reference_scores", needed) if k not in t]
        if missing:
            raise NoveltyError(f"{tensor_path}: missing tensors {missing}")
        image = ImageNoveltyModel.load(d) if (d / IMAGE_FILES[0]).is_file() else None
        return cls(meta["method"], t["mean"], t["scale"], t.get("precision"), t.get("bank"), int(meta["k"]),
                   float(meta["threshold"]), float(meta["false_reject_rate"]), t["reference_states"],
                   t["reference_scores"], dict(meta.get("info", {})), image)


def fit_novelty(
    train_states: Any,
    calibration_states: Any,
    method: NoveltyMethod = "mahalanobis",
    *,
    false_reject_rate: float = DEFAULT_FALSE_REJECT_RATE,
    shrinkage: Shrinkage = "ledoit_wolf",
    k: int = DEFAULT_K,
    reference_states: Any | None = None,
    reference_size: int = DEFAULT_REFERENCE_SIZE,
    seed: int = 0,
) -> NoveltyModel:
    """Fit the score on ``train_states``; threshold = the (1 - false_reject_rate) quantile of calibration scores.

    ``reference_states`` (default: the calibration states) are subsampled to ``reference_size`` rows and stored for
    the window tests of `drift_tests`.
    """
    if method not in NOVELTY_METHODS:
        raise NoveltyError(f"unknown novelty method {method!r}; expected one of {NOVELTY_METHODS}")
    if not 0.0 < false_reject_rate < 0.5:
        raise NoveltyError(f"false_reject_rate must be in (0, 0.5), got {false_reject_rate}")
    if k < 1:
        raise NoveltyError(f"k must be >= 1, got {k}")
    train = _as_states(train_states, "train_states")
    cal = _as_states(calibration_states, "calibration_states")
    if train.shape[1] != cal.shape[1]:
        raise NoveltyError(f"train states have {train.shape[1]} features, calibration states {cal.shape[1]}")
    if train.shape[0] < 10 or cal.shape[0] < 10:
        raise NoveltyError(f"need >= 10 train and calibration states, got {train.shape[0]} and {cal.shape[0]}")
    mean = train.mean(axis=0)
    scale = train.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    precision = bank = None
    if method == "mahalanobis":
        estimator = LedoitWolf() if shrinkage == "ledoit_wolf" else OAS()
        estimator.fit(train)
        precision = estimator.precision_
        info_extra: dict[str, Any] = {"shrinkage": shrinkage, "shrinkage_coefficient": float(estimator.shrinkage_)}
    else:
        bank = (train - mean) / scale
        info_extra = {}
    # Stored as float32: round now, so the fitted model and the one loaded from disk score identically.
    mean, scale, precision, bank = (None if a is None else _f32(a) for a in (mean, scale, precision, bank))
    model = NoveltyModel(method, mean, scale, precision, bank, k, np.inf, false_reject_rate,
                         np.empty((0, train.shape[1])), np.empty(0))
    cal_scores = model.score(cal)
    model.threshold = float(np.quantile(cal_scores, 1.0 - false_reject_rate, method="higher"))
    model.reference_scores = _f32(cal_scores)
    ref = cal if reference_states is None else _as_states(reference_states, "reference_states")
    if ref.shape[0] > reference_size:
        ref = ref[np.sort(np.random.default_rng(seed).choice(ref.shape[0], reference_size, replace=False))]
    model.reference_states = _f32(ref)
    model.info = {"n_train": int(train.shape[0]), "n_calibration": int(cal.shape[0]), "dim": int(train.shape[1]),
                  **info_extra}
    return model


def _f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32).astype(np.float64)


def run_split_states(reader: Any, probe: Any, pooling: str) -> dict[str, np.ndarray]:
    """The probe layer's states of a run cut by the probe's own split: ``train``, ``calibration``, ``test``.

    The split spec comes from the probe's metadata, so the novelty score sees exactly the rows the probe and the
    risk certificate saw.
    """
    from vlmrel_core.analysis.splits import SplitSpec, make_split

    spec = probe.info.split.get("spec") if isinstance(probe.info.split, dict) else None
    if not spec:
        raise NoveltyError("the probe's metadata has no split spec; refit it with `vlmrel build-gate`")
    if reader.manifest.dataset_hash != probe.info.dataset_hash:
        raise NoveltyError(f"{reader.run_dir} is not the probe's training run (dataset hash differs)")
    parts = make_split(reader.rows, SplitSpec.from_dict(spec))
    states = reader.states(pooling, [probe.info.layers[0]])[:, 0].astype(np.float64)
    return {"train": states[parts.train], "calibration": states[parts.calibration], "test": states[parts.test],
            "train_idx": parts.train, "calibration_idx": parts.calibration, "test_idx": parts.test}
