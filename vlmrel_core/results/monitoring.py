"""Drift checks and ablation tables read back: a gate bundle's drift.json and reports/ablation/*.csv.

drift.json maps a comparison name (e.g. 'in_domain', 'shifted') to `gate.runtime.drift_between_runs`'s result.
Its ``windows`` block may carry per-window values (``windows.values``: index, start, stop, n, kl, ks_statistic,
ks_pvalue, embedding_shift, mean_confidence, alert, reasons); files written before that have only the counts,
and both read here. Ablation tables are `interventions.run_ablation_study` output (its TABLE_COLUMNS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import RootModel, model_validator

from vlmrel_core.results.files import LooseModel, ResultsError, read_csv_table, read_json_object, validate

DRIFT_FILE = "drift.json"


class DriftWindow(LooseModel):
    index: int
    start: int
    stop: int
    n: int
    kl: float
    ks_statistic: float
    ks_pvalue: float
    embedding_shift: float | None
    mean_confidence: float
    alert: bool
    reasons: list[str]


class DriftWindows(LooseModel):
    size: int
    n: int
    n_alert: int
    values: list[DriftWindow] | None = None

    @model_validator(mode="after")
    def _counts_match(self) -> "DriftWindows":
        if self.values is not None:
            if len(self.values) != self.n:
                raise ValueError(f"n={self.n} but {len(self.values)} window values")
            if sum(w.alert for w in self.values) != self.n_alert:
                raise ValueError(f"n_alert={self.n_alert} but {sum(w.alert for w in self.values)} alerting windows")
        return self


class DriftComparison(LooseModel):
    """One current run against the reference: KL, KS, embedding shift, thresholds, alert and its reasons."""

    reference_run: str
    current_run: str
    n_reference: int
    n_current: int
    mean_confidence: dict[str, float]
    thresholds: dict[str, float]
    kl: float
    ks_statistic: float
    ks_pvalue: float
    embedding_shift: float | None
    alert: bool
    reasons: list[str]
    windows: DriftWindows
    recalibration: dict[str, Any] | None = None

    def window_frame(self) -> pd.DataFrame:
        """Per-window values as a frame (empty, with the columns, when the file predates per-window values)."""
        columns = list(DriftWindow.model_fields)
        if not self.windows.values:
            return pd.DataFrame(columns=columns)
        return pd.DataFrame([w.model_dump() for w in self.windows.values])[columns]


class _DriftFile(RootModel[dict[str, DriftComparison]]):
    pass


@dataclass(frozen=True)
class DriftResults:
    path: Path
    comparisons: dict[str, DriftComparison]

    def __getitem__(self, name: str) -> DriftComparison:
        if name not in self.comparisons:
            raise ResultsError(f"{self.path}: no drift comparison {name!r}; it has {sorted(self.comparisons)}")
        return self.comparisons[name]

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([{"comparison": name, "kl": c.kl, "ks_statistic": c.ks_statistic, "ks_pvalue": c.ks_pvalue,
                              "embedding_shift": c.embedding_shift, "alert": c.alert, "n_current": c.n_current,
                              "windows_alerting": f"{c.windows.n_alert}/{c.windows.n}"}
                             for name, c in self.comparisons.items()])


def load_drift(path: str | Path) -> DriftResults:
    """A bundle's drift.json (the folder or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / DRIFT_FILE
    data = read_json_object(path, "drift result (drift.json)")
    if not data:
        raise ResultsError(f"{path} holds no drift comparisons")
    return DriftResults(path, validate(_DriftFile, data, path).root)


@dataclass(frozen=True)
class AblationTable:
    """Accuracy change (pp, paired bootstrap CI) per model × condition × question type."""

    frame: pd.DataFrame
    path: Path

    def models(self) -> list[str]:
        return list(dict.fromkeys(self.frame["model"]))

    def overall(self, question_type: str = "all") -> pd.DataFrame:
        """Rows of one question type (default 'all'), first random draw only, in file order."""
        rows = self.frame[self.frame["question_type"] == question_type]
        if rows.empty:
            raise ResultsError(f"{self.path}: no rows for question type {question_type!r}; "
                               f"it has {sorted(set(self.frame['question_type']))}")
        draws = rows["draw"]
        return rows[draws.isna() | (draws == draws.min())].reset_index(drop=True)


def load_ablation_table(path: str | Path) -> AblationTable:
    path = Path(path)
    from vlmrel_core.interventions.study import TABLE_COLUMNS  # torch: only when an ablation table is read

    frame = read_csv_table(path, "ablation table", TABLE_COLUMNS)
    for column in ("layer", "k", "n_dims", "draw"):
        frame[column] = frame[column].astype("Int64")
    bad = frame[(frame["ci_low_pp"] > frame["delta_pp"] + 1e-9) | (frame["ci_high_pp"] < frame["delta_pp"] - 1e-9)]
    if not bad.empty:
        raise ResultsError(f"{path}: rows {list(bad.index)[:5]} have a delta outside their CI")
    return AblationTable(frame, path)
