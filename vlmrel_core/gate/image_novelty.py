"""Is this *image* like the images the gate was certified on? A per-input novelty score on image statistics.

Why beside the hidden-state score (`gate.novelty`): the tiny embedded models squash a photograph or a blank image
into a probe-layer state that sits inside the in-domain cloud (issue 16: a photo scored 2.6-5.8 against a k-NN
threshold of 6.4), and a JPEG round trip barely moves the state at all. The image itself shows all three at once:
a blank image has no edges and one colour, a photo has no flat background and no saturated shapes, JPEG leaves
8x8 block edges. So the gate also scores a small vector of image statistics, computed from the image it was handed
in the same call (no model pass), by a shrinkage (Ledoit-Wolf) Mahalanobis distance fitted on the training split's
images. Its threshold and the state score's threshold are set *jointly* on the calibration split
(`joint_thresholds`) so that the share of calibration inputs flagged by either stays at the configured
false-reject rate. Saved as safetensors + JSON beside the state score; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from sklearn.covariance import LedoitWolf

from vlmrel_core.io import atomic_write_text, read_json_and_tensors

IMAGE_NOVELTY_SCHEMA_VERSION = 1
IMAGE_SIDE = 64  # statistics are taken on the image resized to this side (the embedded generator's size)
BLOCK = 8  # JPEG block size
IMAGE_FEATURES: tuple[str, ...] = (
    "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "background_share", "saturation_mean",
    "saturated_share", "edge_density", "strong_edge_share", "laplacian_energy", "noise_level", "blockiness",
    "grey_entropy", "colour_count",
)
IMAGE_FILES = ("image_novelty.json", "image_novelty.safetensors")
# Scale-like statistics are scored on a log scale: a blank image's zero edges / zero spread must lie far below the
# in-domain range, which a linear scale squeezes next to the in-domain minimum.
LOG_FEATURES: tuple[str, ...] = ("std_r", "std_g", "std_b", "saturation_mean", "saturated_share", "edge_density",
                                 "strong_edge_share", "laplacian_energy", "noise_level", "colour_count")
_LOG_INDEX = np.array([IMAGE_FEATURES.index(name) for name in LOG_FEATURES])
LOG_EPS = 1e-3


def _scored(features: np.ndarray) -> np.ndarray:
    """The statistics as the Mahalanobis distance sees them (`LOG_FEATURES` on a log scale)."""
    out = features.copy()
    out[:, _LOG_INDEX] = np.log(np.maximum(out[:, _LOG_INDEX], 0.0) + LOG_EPS)
    return out


class ImageNoveltyError(ValueError):
    """Image statistics that cannot be computed, fitted or loaded as asked."""


def image_features(image: Image.Image, side: int = IMAGE_SIDE) -> np.ndarray:
    """The `IMAGE_FEATURES` vector of one image (RGB, resized to ``side`` x ``side`` when it is another size)."""
    rgb = image.convert("RGB")
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), Image.BILINEAR)
    px = np.asarray(rgb, dtype=np.float64) / 255.0
    grey = px.mean(axis=2)
    median = np.median(px.reshape(-1, 3), axis=0)
    background = float((np.abs(px - median).max(axis=2) < 0.06).mean())
    sat = px.max(axis=2) - px.min(axis=2)
    dx, dy = np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0))
    grad = np.hypot(dx[:-1, :], dy[:, :-1])
    lap = np.abs(4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
    # Blockiness: mean step across the 8-pixel block boundaries over the mean step elsewhere (log ratio; 0 = none).
    at_edge = (np.arange(side - 1) % BLOCK) == BLOCK - 1
    across = np.r_[dx[:, at_edge].ravel(), dy[at_edge, :].ravel()].mean()
    inside = np.r_[dx[:, ~at_edge].ravel(), dy[~at_edge, :].ravel()].mean()
    blockiness = float(np.log((across + 1e-3) / (inside + 1e-3)))
    hist = np.histogram(grey, bins=16, range=(0.0, 1.0))[0] / grey.size
    entropy = float(-(hist[hist > 0] * np.log(hist[hist > 0])).sum())
    quantised = (px * 15.999).astype(np.int64)
    colours = np.unique(quantised[..., 0] * 256 + quantised[..., 1] * 16 + quantised[..., 2]).size
    return np.array([
        *px.reshape(-1, 3).mean(axis=0), *px.reshape(-1, 3).std(axis=0), background, float(sat.mean()),
        float((sat > 0.25).mean()), float(dx.mean() + dy.mean()), float((grad > 0.15).mean()), float(lap.mean()),
        float(np.median(lap)), blockiness, entropy, float(np.log(colours) / np.log(4096)),
    ])


def images_features(images: Iterable[Image.Image], side: int = IMAGE_SIDE) -> np.ndarray:
    """(n, len(IMAGE_FEATURES)) statistics of many images."""
    rows = [image_features(image, side) for image in images]
    if not rows:
        return np.empty((0, len(IMAGE_FEATURES)))
    return np.vstack(rows)


def run_image_features(reader: Any, image_root: str | Path | None = None, side: int = IMAGE_SIDE) -> np.ndarray:
    """Per-row image statistics of a cached run: its rows' ``image`` paths, relative to ``image_root`` (default:
    the folder of the run's dataset JSONL, as `vlmrel extract` resolves them); each image is read once."""
    rows = reader.rows
    if "image" not in rows.columns:
        raise ImageNoveltyError(f"{reader.run_dir}: the run's rows have no 'image' column; its images cannot be read")
    root = Path(image_root) if image_root is not None else Path(reader.manifest.dataset_path).parent
    cache: dict[str, np.ndarray] = {}
    out = np.empty((len(rows), len(IMAGE_FEATURES)))
    for i, name in enumerate(rows["image"].astype(str)):
        if name not in cache:
            path = Path(name) if Path(name).is_absolute() else root / name
            try:
                with Image.open(path) as image:
                    cache[name] = image_features(image, side)
            except OSError as err:
                raise ImageNoveltyError(
                    f"{reader.run_dir}: cannot read image {path} ({err.__class__.__name__}); pass the folder the "
                    "dataset's image paths are relative to (image_root), or build without image statistics") from None
        out[i] = cache[name]
    return out


def _as_features(features: Any, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != len(IMAGE_FEATURES):
        raise ImageNoveltyError(f"{name}: expected a non-empty (n, {len(IMAGE_FEATURES)}) array of image statistics, "
                                f"got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ImageNoveltyError(f"{name}: image statistics contain NaN or inf")
    return array


@dataclass
class ImageNoveltyModel:
    """Shrinkage Mahalanobis distance of standardised image statistics from the training images."""

    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    threshold: float
    false_reject_rate: float
    reference_features: np.ndarray  # held-out in-domain statistics for the image classifier window test
    reference_scores: np.ndarray  # the calibration split's scores, row-aligned with the state model's
    side: int = IMAGE_SIDE
    info: dict[str, Any] = field(default_factory=dict)

    def score(self, features: Any) -> np.ndarray:
        z = (_scored(_as_features(features, "features")) - self.mean) / self.scale
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, self.precision, z), 0.0))

    def score_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.score(images_features(images, self.side))

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "scale": self.scale, "precision": self.precision,
                   "reference_features": self.reference_features, "reference_scores": self.reference_scores}
        tmp = out / (IMAGE_FILES[1] + ".tmp")
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp))
        tmp.replace(out / IMAGE_FILES[1])
        meta = {"schema_version": IMAGE_NOVELTY_SCHEMA_VERSION, "features": list(IMAGE_FEATURES), "side": self.side,
                "threshold": float(self.threshold), "false_reject_rate": float(self.false_reject_rate),
                "info": self.info}
        atomic_write_text(out / IMAGE_FILES[0], json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "ImageNoveltyModel":
        d = Path(directory)
        meta_path, tensor_path = d / IMAGE_FILES[0], d / IMAGE_FILES[1]
        meta, tensors = read_json_and_tensors(d, IMAGE_FILES[0], IMAGE_FILES[1], ImageNoveltyError)
        if meta.get("schema_version") != IMAGE_NOVELTY_SCHEMA_VERSION:
            raise ImageNoveltyError(f"{meta_path}: schema {meta.get('schema_version')!r}, expected "
                                    f"{IMAGE_NOVELTY_SCHEMA_VERSION}")
        if meta.get("features") != list(IMAGE_FEATURES):
            raise ImageNoveltyError(f"{meta_path}: features {meta.get('features')} differ from this version's "
                                    f"{list(IMAGE_FEATURES)}; rebuild the gate")
        t = {k: v.astype(np.float64) for k, v in tensors.items()}
        missing = [k for k in ("mean", "scale", "precision", "reference_features", "reference_scores") if k not in t]
        if missing:
            raise ImageNoveltyError(f"{tensor_path}: missing tensors {missing}")
        return cls(t["mean"], t["scale"], t["precision"], float(meta["threshold"]), float(meta["false_reject_rate"]),
                   t["reference_features"], t["reference_scores"], int(meta["side"]), dict(meta.get("info", {})))


def fit_image_novelty(train_features: Any, calibration_features: Any, *, false_reject_rate: float = 0.02,
                      reference_size: int = 400, seed: int = 0) -> ImageNoveltyModel:
    """Ledoit-Wolf Mahalanobis on the unique training images' statistics (standardised); threshold = the
    (1 - false_reject_rate) quantile of the calibration rows' scores (`joint_thresholds` may raise it).

    The reference sample is drawn exactly as `novelty.fit_novelty` draws its reference states (same ``seed`` and
    ``reference_size`` over the same calibration rows), so the two are row-aligned: the state classifier test
    groups its folds by the image each reference row was asked about."""
    if not 0.0 < false_reject_rate < 0.5:
        raise ImageNoveltyError(f"false_reject_rate must be in (0, 0.5), got {false_reject_rate}")
    train = np.unique(_as_features(train_features, "train_features"), axis=0)  # one row per image, not per question
    cal = _as_features(calibration_features, "calibration_features")
    if train.shape[0] < 10 or cal.shape[0] < 10:
        raise ImageNoveltyError(f"need >= 10 train images and calibration rows, got {train.shape[0]} and {cal.shape[0]}")
    mean, scale = _scored(train).mean(axis=0), _scored(train).std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1e-6)
    estimator = LedoitWolf().fit((_scored(train) - mean) / scale)
    f32 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float64)  # noqa: E731 - stored as float32
    model = ImageNoveltyModel(f32(mean), f32(scale), f32(estimator.precision_), np.inf, false_reject_rate,
                              np.empty((0, cal.shape[1])), np.empty(0))
    scores = model.score(cal)
    model.threshold = float(np.quantile(scores, 1.0 - false_reject_rate, method="higher"))
    model.reference_scores = f32(scores)
    ref = cal if cal.shape[0] <= reference_size else cal[np.sort(
        np.random.default_rng(seed).choice(cal.shape[0], reference_size, replace=False))]
    model.reference_features = f32(ref)
    model.info = {"n_train_images": int(train.shape[0]), "n_calibration": int(cal.shape[0]),
                  "shrinkage_coefficient": float(estimator.shrinkage_)}
    return model


def joint_thresholds(state_scores: Any, image_scores: Any, false_reject_rate: float) -> tuple[float, float, float]:
    """Thresholds for two row-aligned calibration scores, each at the same per-score quantile, chosen as the
    largest such quantile rate whose union ("novel by either") rate stays <= ``false_reject_rate``.

    Returns (state threshold, image threshold, the per-score rate used). The rate lies in
    [false_reject_rate / 2, false_reject_rate]: half (Bonferroni) when the two never flag the same rows, the
    whole rate when they always do."""
    s, i = np.asarray(state_scores, dtype=np.float64), np.asarray(image_scores, dtype=np.float64)
    if s.shape != i.shape or s.ndim != 1 or s.size < 10:
        raise ImageNoveltyError(f"need two row-aligned 1-d calibration score arrays (>= 10), got {s.shape}, {i.shape}")
    best = None
    for rate in np.linspace(false_reject_rate, false_reject_rate / 2, 41):
        ts = float(np.quantile(s, 1.0 - rate, method="higher"))
        ti = float(np.quantile(i, 1.0 - rate, method="higher"))
        if float(((s > ts) | (i > ti)).mean()) <= false_reject_rate:
            best = (ts, ti, float(rate))
            break
    if best is None:  # ties at the quantile can overshoot; the Bonferroni split always holds on the quantiles
        rate = false_reject_rate / 2
        best = (float(np.quantile(s, 1.0 - rate, method="higher")), float(np.quantile(i, 1.0 - rate, method="higher")),
                rate)
    return best


__all__ = ["IMAGE_FEATURES", "IMAGE_SIDE", "ImageNoveltyError", "ImageNoveltyModel", "fit_image_novelty",
           "image_features", "images_features", "joint_thresholds", "run_image_features"]
