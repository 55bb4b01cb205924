"""The library reading its own artifacts back: one typed loader per file it writes (errors name the file).

Loader → artifact:
  load_run / load_run_manifest      extraction run (manifest.json + parquet rows + safetensors), via engine.store
  load_sweep                        reports/<fam>/sweep.csv (or a `vlmrel sweep` folder)
  load_report                       a report folder: report.json, table7.csv, gains.csv, transfer.csv,
                                    layer_signals.csv, sweep.csv (each also alone: load_report_summary, load_table7,
                                    load_gains, load_transfer, load_layer_signals)
  load_calibration                  gate bundle calibration.json + report.json reliability bins / ECE / MCE / Brier
  load_gate_bundle / load_gate_report   gate.yaml + probe + calibration (gate's own loaders) + report.json
  load_drift                        gate bundle drift.json (with or without per-window values)
  load_ablation_table               reports/ablation/*.csv
  load_live_run                     gates/<fam>/live_run.json
  load_shift_report                 reports/shift/shift_report.json (per shift x model table, in-domain rates)
  load_family_results               all of the above for one shipped family, through the sample-data catalog
"""

from vlmrel_core.results.files import ResultsError
from vlmrel_core.results.gate import (
    CalibrationMetrics, CalibrationResults, GateBundleResults, GateReport, LiveRun, ReliabilityBins, RiskCoverage,
    SignalCalibration, load_calibration, load_gate_bundle, load_gate_report, load_live_run,
)
from vlmrel_core.results.monitoring import (
    AblationTable, DriftComparison, DriftResults, DriftWindow, DriftWindows, load_ablation_table, load_drift,
)
from vlmrel_core.results.report import (
    ReportResults, ReportSummary, SweepTable, load_gains, load_layer_signals, load_report, load_report_summary,
    load_sweep, load_table7, load_transfer,
)
from vlmrel_core.results.runs import LensCurves, RunResults, load_run, load_run_manifest
from vlmrel_core.results.shift import ModelShiftReport, ShiftReport, load_shift_report
from vlmrel_core.results.shipped import FamilyResults, load_family_results, load_shipped_ablation, load_shipped_run

__all__ = [
    "AblationTable", "CalibrationMetrics", "CalibrationResults", "DriftComparison", "DriftResults", "DriftWindow",
    "DriftWindows", "FamilyResults", "GateBundleResults", "GateReport", "LensCurves", "LiveRun", "ModelShiftReport", "ReliabilityBins",
    "ReportResults", "ReportSummary", "ResultsError", "RiskCoverage", "RunResults", "ShiftReport", "SignalCalibration", "SweepTable",
    "load_ablation_table", "load_calibration", "load_drift", "load_family_results", "load_gains", "load_gate_bundle",
    "load_gate_report", "load_layer_signals", "load_live_run", "load_report", "load_report_summary", "load_run",
    "load_run_manifest", "load_shift_report", "load_shipped_ablation", "load_shipped_run", "load_sweep", "load_table7", "load_transfer",
]
