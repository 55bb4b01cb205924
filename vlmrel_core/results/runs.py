"""An extraction run read back: manifest, rows, and the per-layer curves the figures draw (logit lens, attention).

Why a wrapper and not a copy: `engine.store.RunReader` / `read_manifest` own the cache format; this module only
turns their CacheError into a ResultsError naming the run, and derives the plotted summaries from their arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from vlmrel_core.engine.store import CacheError, RunManifest, RunReader, read_manifest
from vlmrel_core.results.files import ResultsError


def load_run_manifest(run_dir: str | Path) -> RunManifest:
    """The run's manifest (validated by the store's own pydantic model)."""
    try:
        return read_manifest(run_dir)
    except CacheError as err:
        raise ResultsError(str(err)) from err


@dataclass(frozen=True)
class LensCurves:
    """Per layer: mean label-signed logit-lens margin (log-odds of the right answer) with a 95% normal CI,
    separately for rows the model answered correctly and wrongly."""

    layers: tuple[int, ...]
    correct_mean: np.ndarray
    correct_low: np.ndarray
    correct_high: np.ndarray
    wrong_mean: np.ndarray
    wrong_low: np.ndarray
    wrong_high: np.ndarray
    n_correct: int
    n_wrong: int


def _mean_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.sum(np.isfinite(values), axis=0)
    mean = np.nanmean(values, axis=0) if values.size else np.full(values.shape[1], np.nan)
    sem = np.nanstd(values, axis=0, ddof=1) / np.sqrt(np.maximum(n, 1)) if values.shape[0] > 1 else np.zeros_like(mean)
    return mean, mean - 1.96 * sem, mean + 1.96 * sem


@dataclass
class RunResults:
    """One run directory: ``manifest`` and ``rows`` come from the store's RunReader, read lazily."""

    run_dir: Path
    image_root: Path | None = None  # folder the rows' image paths are relative to (default: the dataset's folder)

    @classmethod
    def load(cls, run_dir: str | Path, image_root: str | Path | None = None) -> "RunResults":
        run = cls(Path(run_dir), None if image_root is None else Path(image_root))
        run.reader  # noqa: B018 - fail now (no manifest / no shards), naming the run
        return run

    @cached_property
    def reader(self) -> RunReader:
        try:
            return RunReader(self.run_dir)
        except CacheError as err:
            raise ResultsError(str(err)) from err

    @property
    def manifest(self) -> RunManifest:
        return self.reader.manifest

    @cached_property
    def rows(self) -> pd.DataFrame:
        try:
            return self.reader.rows
        except CacheError as err:
            raise ResultsError(str(err)) from err

    def tensor(self, name: str) -> np.ndarray:
        try:
            return self.reader.tensor(name)
        except CacheError as err:
            raise ResultsError(str(err)) from err

    @property
    def accuracy(self) -> float:
        return float(self.rows["correct"].mean())

    def correct(self) -> np.ndarray:
        return self.rows["correct"].to_numpy().astype(bool)

    def lens_curves(self) -> LensCurves:
        """Label-signed lens margin per layer, correct vs wrong rows (rows whose label is not yes/no are left out)."""
        logodds = self.tensor("lens_logodds").astype(np.float64)
        labels = self.rows["label"].astype(str).str.lower().to_numpy()
        sign = np.where(labels == "yes", 1.0, np.where(labels == "no", -1.0, np.nan))
        keep = np.isfinite(sign)
        if not keep.any():
            raise ResultsError(f"{self.run_dir}: no yes/no labels, so the logit-lens truth margin is undefined")
        margin = logodds[keep] * sign[keep, None]
        correct = self.correct()[keep]
        right = _mean_ci(margin[correct])
        wrong = _mean_ci(margin[~correct])
        return LensCurves(tuple(self.manifest.layers), *right, *wrong, n_correct=int(correct.sum()),
                          n_wrong=int((~correct).sum()))

    @cached_property
    def _attention(self) -> np.ndarray:
        return self.tensor("attention_image")

    def attention_map(self, row: int, layer: int | None = None) -> np.ndarray:
        """(grid_h, grid_w) answer→image attention of one row, at one layer or averaged over layers."""
        if not self.manifest.attentions:
            raise ResultsError(f"{self.run_dir} was extracted without attentions (--no-attentions)")
        if not 0 <= row < len(self.rows):
            raise ResultsError(f"{self.run_dir}: row {row} out of range (0..{len(self.rows) - 1})")
        record = self.rows.iloc[row]
        h, w = int(record["grid_h"]), int(record["grid_w"])
        per_layer = self._attention[row]
        if layer is None:
            vector = per_layer.mean(axis=0)
        else:
            if layer not in self.manifest.layers:
                raise ResultsError(f"{self.run_dir}: layer {layer} not extracted; it has {self.manifest.layers}")
            vector = per_layer[self.manifest.layers.index(layer)]
        if vector.size < h * w:
            raise ResultsError(f"{self.run_dir}: row {row} has {vector.size} attention cells for a {h}x{w} grid")
        return vector[: h * w].reshape(h, w).astype(np.float64)

    def spatial_entropy(self) -> np.ndarray:
        """Per row, H_s of the layer-averaged answer→image attention map (`signals.attention.spatial_entropy`)."""
        from vlmrel_core.signals.attention import spatial_entropy

        return np.array([spatial_entropy(self.attention_map(i)) for i in range(len(self.rows))])

    def image_path(self, row: int) -> Path:
        """The row's image file: relative paths resolve against ``image_root``, else the folder of the dataset file
        the manifest names (as recorded at extraction, relative to that working directory)."""
        image = Path(str(self.rows.iloc[row]["image"]))
        root = self.image_root if self.image_root is not None else Path(self.manifest.dataset_path).parent
        path = image if image.is_absolute() else root / image
        if not path.is_file():
            raise ResultsError(f"{self.run_dir}: image of row {row} not found at {path}; pass image_root")
        return path


def load_run(run_dir: str | Path, image_root: str | Path | None = None) -> RunResults:
    """A run directory read back (manifest checked now, rows and tensors on first use)."""
    return RunResults.load(run_dir, image_root)
