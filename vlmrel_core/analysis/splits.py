"""Deterministic held-out splits grouped by image or by asked object (held-out items).

Why grouped: the questions about one image share pixels, and the questions about one object share its difficulty.
A split that puts the same image (or item) on both sides lets a probe score well by recognising the image or the
item instead of reading reliability from the hidden state. Every split here is a function of (rows, seed), so a
report can be regenerated bit for bit, and every split records the `SplitSpec` that made it.

Index arrays refer to row positions (0..n-1) of the `RunReader.rows` frame they were made from.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd

from vlmrel_core.analysis.group_kfold import stratified_group_kfold, stratified_group_kfold_tests

Grouping = Literal["image", "item"]
GROUPINGS: tuple[str, ...] = ("image", "item")

#: Row columns that identify a group, in order of preference. The image id is stable across the split JSONLs of one
#: image pool (random / popular / adversarial share images), which the transfer tables rely on.
GROUP_COLUMNS: dict[str, tuple[str, ...]] = {"image": ("image_id", "image"), "item": ("asked_object",)}

#: Granularity of stratified group hold-outs: the test set is a union of folds of a K-fold split.
_HOLDOUT_FOLDS = 20


class SplitError(ValueError):
    """A split that cannot be made as asked (too few groups, one class only), said in words."""


@dataclass(frozen=True)
class SplitSpec:
    """How a split was made; stored next to every probe and report number so it can be reproduced.

    ``test_fraction`` and ``calibration_fraction`` are shares of all rows *requested*; the realised shares differ
    slightly because whole groups move together (`Split.summary` records the realised ones).
    """

    grouping: Grouping = "image"
    test_fraction: float = 0.3
    calibration_fraction: float = 0.0
    seed: int = 0
    stratify: bool = True

    def __post_init__(self) -> None:
        if self.grouping not in GROUPINGS:
            raise SplitError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise SplitError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.calibration_fraction < 1.0 - self.test_fraction:
            raise SplitError(
                f"calibration_fraction must be in [0, 1 - test_fraction), got {self.calibration_fraction}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SplitSpec":
        return cls(**data)


@dataclass(frozen=True)
class Split:
    """Row indices of train / calibration / test (sorted, disjoint, and no group on two sides)."""

    spec: SplitSpec
    train: np.ndarray
    test: np.ndarray
    calibration: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    group_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        n = len(self.train) + len(self.test) + len(self.calibration)
        return {
            "spec": self.spec.to_dict(),
            "n_train": int(len(self.train)),
            "n_calibration": int(len(self.calibration)),
            "n_test": int(len(self.test)),
            "realised_test_fraction": round(len(self.test) / n, 4) if n else 0.0,
            "groups": dict(self.group_counts),
        }


def group_keys(rows: pd.DataFrame, grouping: Grouping) -> np.ndarray:
    """One string key per row naming its group (image id or asked object); raises if the column is missing."""
    if grouping not in GROUP_COLUMNS:
        raise SplitError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    for column in GROUP_COLUMNS[grouping]:
        if column in rows.columns:
            values = rows[column]
            if values.isna().any():
                raise SplitError(f"column {column!r} has {int(values.isna().sum())} missing value(s); cannot group by {grouping}")
            return values.astype(str).to_numpy()
    raise SplitError(
        f"cannot group by {grouping}: the rows have none of the columns {list(GROUP_COLUMNS[grouping])} "
        "(the dataset JSONL needs image_id / asked_object metadata)"
    )


def labels_of(rows: pd.DataFrame, column: str = "correct") -> np.ndarray:
    """The 0/1 correctness label as int64."""
    if column not in rows.columns:
        raise SplitError(f"the rows have no {column!r} column")
    return rows[column].astype(np.int64).to_numpy()


def holdout_indices(
    y: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    test_fraction: float,
    seed: int,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices with no group on both sides.

    Stratified: the test set is the union of the first round(f * K) folds of a shuffled `StratifiedGroupKFold`
    with K = min(20, n_groups, smallest class count), so both sides keep about the same share of correct answers. Unstratified:
    `GroupShuffleSplit`. Deterministic in ``seed``; the order of rows does not matter, only their groups.
    """
    y = np.asarray(y)
    groups = np.asarray(groups)
    if y.shape[0] != groups.shape[0]:
        raise SplitError(f"{y.shape[0]} labels but {groups.shape[0]} group keys")
    n_groups = np.unique(groups).size
    if n_groups < 2:
        raise SplitError(f"a grouped split needs at least 2 groups, found {n_groups}")
    _, class_counts = np.unique(y, return_counts=True)
    if stratify and (class_counts.size < 2 or class_counts.min() < 2):
        stratify = False
    if not stratify:
        from sklearn.model_selection import GroupShuffleSplit

        splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        train, test = next(splitter.split(np.zeros(len(y)), y, groups))
        return np.sort(train), np.sort(test)
    n_folds = int(min(_HOLDOUT_FOLDS, n_groups, class_counts.min()))  # StratifiedGroupKFold needs K <= each class
    n_test_folds = int(min(n_folds - 1, max(1, round(test_fraction * n_folds))))
    folds = stratified_group_kfold_tests(y, groups, n_folds, seed)  # StratifiedGroupKFold(shuffle=True)'s folds
    test = np.sort(np.concatenate(folds[:n_test_folds]))
    train = np.setdiff1d(np.arange(len(y)), test)
    return train, test


def make_split(rows: pd.DataFrame, spec: SplitSpec = SplitSpec(), label_column: str = "correct") -> Split:
    """Train / (calibration) / test by the spec's grouping; the calibration part is carved from the non-test rows."""
    y = labels_of(rows, label_column)
    groups = group_keys(rows, spec.grouping)
    rest, test = holdout_indices(y, groups, spec.test_fraction, spec.seed, spec.stratify)
    calibration = np.zeros(0, dtype=np.int64)
    train = rest
    if spec.calibration_fraction > 0:
        relative = spec.calibration_fraction / (1.0 - spec.test_fraction)
        inner_train, inner_cal = holdout_indices(y[rest], groups[rest], relative, spec.seed + 1, spec.stratify)
        train, calibration = rest[inner_train], rest[inner_cal]
    split = Split(
        spec=spec,
        train=train.astype(np.int64),
        test=test.astype(np.int64),
        calibration=calibration.astype(np.int64),
        group_counts={
            "train": int(np.unique(groups[train]).size),
            "calibration": int(np.unique(groups[calibration]).size),
            "test": int(np.unique(groups[test]).size),
        },
    )
    assert_group_disjoint(split, groups)
    return split


def image_split(rows: pd.DataFrame, test_fraction: float = 0.3, seed: int = 0) -> Split:
    """Held-out images (the default split of every probe and report number)."""
    return make_split(rows, SplitSpec("image", test_fraction, 0.0, seed))


def item_split(rows: pd.DataFrame, test_fraction: float = 0.3, seed: int = 0) -> Split:
    """Held-out asked objects: the split on which a probe must beat the item control."""
    return make_split(rows, SplitSpec("item", test_fraction, 0.0, seed))


def calibration_split(
    rows: pd.DataFrame, test_fraction: float = 0.2, calibration_fraction: float = 0.2, seed: int = 0
) -> Split:
    """Image-grouped train / calibration / test for the gate: fit the probe, fit its calibrator and threshold, test."""
    return make_split(rows, SplitSpec("image", test_fraction, calibration_fraction, seed))


def assert_group_disjoint(split: Split, groups: np.ndarray) -> None:
    """Raise if any group (image / item) appears in two parts of the split."""
    parts = {"train": split.train, "calibration": split.calibration, "test": split.test}
    seen: dict[str, set[str]] = {name: set(groups[idx].tolist()) for name, idx in parts.items()}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = seen[a] & seen[b]
            if shared:
                raise SplitError(f"{len(shared)} group(s) appear in both {a} and {b}, e.g. {sorted(shared)[:3]}")


#: Folds already made, by (labels, groups, K, seed): a sweep fits one probe per layer × pooling on the same training
#: rows, and StratifiedGroupKFold's fold assignment is a Python loop over groups that cost as much as some fits.
_FOLD_CACHE: dict[tuple[str, int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
_FOLD_CACHE_SIZE = 16


def grouped_folds(
    y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified grouped K-fold (K reduced to the number of groups when there are fewer) for choosing C.

    The folds are a function of (y, groups, n_folds, seed), so repeated calls return the cached (read-only) ones.
    """
    y, groups = np.asarray(y), np.asarray(groups)
    digest = hashlib.sha256(f"{y.dtype.str}|{y.shape}|".encode() + np.ascontiguousarray(y).tobytes())
    digest.update(b"|" + "\x1f".join(groups.astype(str).tolist()).encode())
    key = (digest.hexdigest(), int(n_folds), int(seed))
    if key in _FOLD_CACHE:
        return list(_FOLD_CACHE[key])
    n_groups = np.unique(groups).size
    if n_groups < 2:
        raise SplitError(f"grouped cross-validation needs at least 2 groups in the training split, found {n_groups}")
    k = min(n_folds, n_groups)
    folds = stratified_group_kfold(y, groups, k, seed)  # StratifiedGroupKFold(shuffle=True)'s folds, vectorised
    for tr, va in folds:
        tr.setflags(write=False)
        va.setflags(write=False)
    if len(_FOLD_CACHE) >= _FOLD_CACHE_SIZE:
        _FOLD_CACHE.pop(next(iter(_FOLD_CACHE)))
    _FOLD_CACHE[key] = folds
    return list(folds)


def range_halves(rows: pd.DataFrame, column: str = "image_id") -> tuple[np.ndarray, np.ndarray, str]:
    """Rows of the lower and upper half of the distinct values of ``column`` (image-seed ranges A and B).

    Returns (a_idx, b_idx, description). Why halves of distinct ids: each image's questions stay together and the
    two ranges hold about the same number of images.
    """
    if column not in rows.columns:
        raise SplitError(f"the rows have no {column!r} column; cannot split by image-id range")
    values = pd.to_numeric(rows[column], errors="raise").to_numpy()
    distinct = np.unique(values)
    if distinct.size < 4:
        raise SplitError(f"need at least 4 distinct {column} values for two ranges, found {distinct.size}")
    boundary = distinct[distinct.size // 2]
    a = np.flatnonzero(values < boundary)
    b = np.flatnonzero(values >= boundary)
    text = f"{column} {distinct[0]}–{distinct[distinct.size // 2 - 1]} | {boundary}–{distinct[-1]}"
    return a, b, text
