"""The shipped results of one embedded family, located through the sample-data catalog and read by the loaders."""

from __future__ import annotations

from dataclasses import dataclass

from vlmrel_core.results.gate import GateBundleResults, LiveRun, load_gate_bundle, load_live_run
from vlmrel_core.results.monitoring import AblationTable, DriftResults, load_ablation_table, load_drift
from vlmrel_core.results.report import ReportResults, load_report
from vlmrel_core.results.runs import RunResults, load_run
from vlmrel_core.samples.catalog import ABLATION_TABLES, SampleCatalog, sample_catalog


@dataclass(frozen=True)
class FamilyResults:
    """Report, gate bundle (with calibration), drift checks and live run of one family."""

    family: str
    report: ReportResults
    gate: GateBundleResults
    drift: DriftResults
    live_run: LiveRun


def load_family_results(family: str, catalog: SampleCatalog | None = None) -> FamilyResults:
    catalog = catalog or sample_catalog()
    return FamilyResults(
        family=family,
        report=load_report(catalog.report_dir(family)),
        gate=load_gate_bundle(catalog.gate_dir(family)),
        drift=load_drift(catalog.gate_file(family, "drift.json")),
        live_run=load_live_run(catalog.gate_file(family, "live_run.json")),
    )


def load_shipped_run(family: str, run: str, catalog: SampleCatalog | None = None) -> RunResults:
    """A shipped run whose image paths resolve inside the catalog (drift runs: shapes_drift, others: shapes_pope)."""
    catalog = catalog or sample_catalog()
    images = catalog.drift_dir() if run.startswith("drift_") else catalog.pope_dir()
    return load_run(catalog.run_dir(family, run), image_root=images)


def load_shipped_ablation(split: str = "adversarial", catalog: SampleCatalog | None = None) -> AblationTable:
    if split not in ABLATION_TABLES:
        raise ValueError(f"unknown ablation table {split!r}; expected one of {list(ABLATION_TABLES)}")
    return load_ablation_table((catalog or sample_catalog()).ablation_table(split))
