"""A report folder read back (`vlmrel report --out`): report.json, Table 7, gains, transfer, layer signals, sweep.

Why typed: the dashboard and the HTML report draw these tables; a renamed column or a hand-edited file must fail
here naming the file, not as a KeyError inside a chart. Column sets are those `analysis.report.write_report`
writes; the loaders check them and never rename a writer's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vlmrel_core.results.files import LooseModel, ResultsError, read_csv_table, read_json_object, validate

ESTIMATE = ("auroc", "auroc_low", "auroc_high")
SIGNAL_COLUMNS = ("signal", "kind", "description", *ESTIMATE, "r_pb", "r_pb_low", "r_pb_high", "cost", "C",
                  "n_features", "note", "orientation", "run", "grouping")
SWEEP_COLUMNS = ("pooling", "layer", *ESTIMATE, "cv_auroc", "C", "n_train", "n_test", "best_of_pooling",
                 "in_plateau", "cv_selected", "run", "grouping")
SWEEP_FLAGS = ("best_of_pooling", "in_plateau", "cv_selected")
TABLE7_COLUMNS = ("key", *SIGNAL_COLUMNS, "n_test")
LAYER_SIGNAL_COLUMNS = (*SIGNAL_COLUMNS, "layer")
GAIN_COLUMNS = ("comparison", "better", "baseline", "grouping", "gain", "row_ci_low", "row_ci_high", "group_ci_low",
                "group_ci_high", "verdict", "run")
TRANSFER_COLUMNS = ("kind", "source", "target", "pooling", "layer", "in_domain_auroc", "in_domain_low", "in_domain_high",
                    "transfer_auroc", "transfer_low", "transfer_high", "difference", "difference_low",
                    "difference_high", "n_train_source", "n_train_target", "n_test")


class LayerPoint(LooseModel):
    pooling: str
    layer: int
    auroc: float
    auroc_low: float
    auroc_high: float
    cv_auroc: float | None = None
    C: float | None = None
    n_train: int
    n_test: int


class SweepSummary(LooseModel):
    """`LayerSweep.to_dict()` of one run × grouping, as stored in report.json."""

    run_dir: str
    model_fingerprint: str
    split: dict[str, Any]
    results: list[LayerPoint]
    best: dict[str, LayerPoint]
    best_overall: LayerPoint
    plateau: dict[str, list[int]]
    cv_selected: LayerPoint
    plateau_rule: str


class Gain(LooseModel):
    comparison: str
    better: str
    baseline: str
    grouping: str
    gain: float
    row_ci_low: float
    row_ci_high: float
    group_ci_low: float
    group_ci_high: float
    verdict: str


class Claim(LooseModel):
    run: str
    holds: bool
    sentence: str
    gain_over_item_control: Gain | None
    gain_over_max_prob: Gain | None


class RunSummary(LooseModel):
    name: str
    run_dir: str
    n: int
    accuracy: float
    manifest: dict[str, Any]
    notes: list[str]
    sweep: dict[str, SweepSummary]
    claim: Claim


class ReportSummary(LooseModel):
    """report.json: settings, one summary per run (sweep, claim), the headline rows and the notes."""

    settings: dict[str, Any]
    runs: list[RunSummary]
    headline: list[dict[str, Any]]
    notes: list[str]

    def run(self, name: str) -> RunSummary:
        for run in self.runs:
            if run.name == name:
                return run
        raise ResultsError(f"no run {name!r} in this report; it has {[r.name for r in self.runs]}")


@dataclass(frozen=True)
class SweepTable:
    """sweep.csv: held-out AUROC per run × grouping × pooling × layer, with best / plateau / CV-selected flags."""

    frame: pd.DataFrame
    path: Path

    def runs(self) -> list[str]:
        return list(dict.fromkeys(self.frame["run"]))

    def part(self, run: str | None = None, grouping: str = "image") -> pd.DataFrame:
        """One run × grouping (default: the first run), in file order."""
        run = self.runs()[0] if run is None else run
        part = self.frame[(self.frame["run"] == run) & (self.frame["grouping"] == grouping)]
        if part.empty:
            raise ResultsError(f"{self.path}: no rows for run {run!r}, grouping {grouping!r}; runs: {self.runs()}")
        return part.reset_index(drop=True)

    def selected(self, run: str | None = None, grouping: str = "image") -> pd.Series:
        """The CV-selected (pooling, layer) row."""
        chosen = self.part(run, grouping)
        chosen = chosen[chosen["cv_selected"]]
        if len(chosen) != 1:
            raise ResultsError(f"{self.path}: expected one cv_selected row for {run!r}/{grouping}, found {len(chosen)}")
        return chosen.iloc[0]

    def plateau(self, pooling: str, run: str | None = None, grouping: str = "image") -> list[int]:
        part = self.part(run, grouping)
        return [int(v) for v in part[(part["pooling"] == pooling) & part["in_plateau"]]["layer"]]


def load_sweep(path: str | Path) -> SweepTable:
    """sweep.csv from a report folder (or a `vlmrel sweep` output folder's sweep.csv); a folder means its sweep.csv."""
    path = Path(path)
    if path.is_dir():
        path = path / "sweep.csv"
    frame = read_csv_table(path, "layer sweep table", SWEEP_COLUMNS, bool_columns=SWEEP_FLAGS)
    return SweepTable(frame, path)


def load_table7(path: str | Path) -> pd.DataFrame:
    return read_csv_table(path, "Table 7", TABLE7_COLUMNS)


def load_gains(path: str | Path) -> pd.DataFrame:
    return read_csv_table(path, "gains table", GAIN_COLUMNS)


def load_transfer(path: str | Path) -> pd.DataFrame:
    """transfer.csv (empty when the report had nothing to transfer: a header-only or empty file)."""
    return read_csv_table(path, "transfer table", TRANSFER_COLUMNS, allow_empty=True)


def load_layer_signals(path: str | Path) -> pd.DataFrame:
    """layer_signals.csv: per decoder layer, attention / logit-lens / probe AUROC (+CI) per run."""
    return read_csv_table(path, "per-layer signal table", LAYER_SIGNAL_COLUMNS, allow_empty=True)


def load_report_summary(path: str | Path) -> ReportSummary:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    return validate(ReportSummary, read_json_object(path, "report summary (report.json)"), path)


@dataclass(frozen=True)
class ReportResults:
    """Everything in one report folder."""

    out_dir: Path
    summary: ReportSummary
    table7: pd.DataFrame
    gains: pd.DataFrame
    transfer: pd.DataFrame
    layer_signals: pd.DataFrame
    sweep: SweepTable

    def signal(self, key: str, run: str | None = None, grouping: str = "image") -> pd.Series:
        """One Table 7 row by its key (e.g. 'max_answer_prob', 'control_item'), for a run (default: the first)."""
        run = self.summary.runs[0].name if run is None else run
        rows = self.table7[(self.table7["key"] == key) & (self.table7["run"] == run) & (self.table7["grouping"] == grouping)]
        if rows.empty:
            keys = sorted(set(self.table7[self.table7["run"] == run]["key"]))
            raise ResultsError(f"{self.out_dir / 'table7.csv'}: no signal {key!r} for {run}/{grouping}; keys: {keys}")
        return rows.iloc[0]


def name_repeated_runs(frame: pd.DataFrame, run_names: list[str], keys: tuple[str, ...]) -> pd.DataFrame:
    """Give the k-th repeat of a run's block the report's k-th name for it ('x', 'x#2', ...).

    Why: reports written before the writer relabelled its tables named a second run of the same split 'x#2' in
    report.json and sweep.csv but 'x' in table7.csv / layer_signals.csv, so its rows read as duplicates of the
    first run. Blocks are in run order, so the n-th occurrence of (run, *keys) belongs to the n-th run named so.
    """
    if frame.empty:
        return frame
    names_by_base: dict[str, list[str]] = {}
    for name in run_names:
        names_by_base.setdefault(name.split("#", 1)[0], []).append(name)
    blocks_seen: dict[str, int] = {}
    current, seen_keys, runs = None, set(), []
    for run, key in zip(frame["run"], zip(*(frame[k] for k in keys))):
        if run != current or key in seen_keys:  # a new block: another run, or this run's keys starting over
            blocks_seen[run] = blocks_seen.get(run, 0) + 1
            current, seen_keys = run, set()
        seen_keys.add(key)
        names = names_by_base.get(run, [run])
        k = blocks_seen[run] - 1
        runs.append(names[k] if k < len(names) else run)
    return frame.assign(run=runs)


def load_report(out_dir: str | Path) -> ReportResults:
    """A `vlmrel report --out` folder: report.json + the five CSV tables (repeated runs named as in report.json)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ResultsError(f"report folder not found: {out}")
    summary = load_report_summary(out / "report.json")
    names = [run.name for run in summary.runs]
    return ReportResults(
        out_dir=out,
        summary=summary,
        table7=name_repeated_runs(load_table7(out / "table7.csv"), names, ("grouping", "key")),
        gains=load_gains(out / "gains.csv"),
        transfer=load_transfer(out / "transfer.csv"),
        layer_signals=name_repeated_runs(load_layer_signals(out / "layer_signals.csv"), names, ("signal", "layer")),
        sweep=load_sweep(out / "sweep.csv"),
    )
