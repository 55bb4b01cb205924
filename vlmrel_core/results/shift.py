"""The shift report read back: reports/shift/shift_report.json (`gate.shift_report.write_shift_report` output).

One entry per model; each holds, per shift (and ``in_domain``), accuracy, the certified rule's realised risk and
coverage, the novelty-routed share and the window alarm rates per window size, plus the in-domain goals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import RootModel

from vlmrel_core.results.files import LooseModel, read_json_object, validate

SHIFT_REPORT_FILE = "shift_report.json"


class RiskAtRule(LooseModel):
    coverage: float
    n_kept: int
    realised_risk: float | None


class ShiftWindow(LooseModel):
    alarm_rate: float
    per_test: dict[str, float] = {}
    kl_ks_embedding_alarm_rate: float | None = None


class ShiftRow(LooseModel):
    n: int
    accuracy: float
    mean_confidence: float
    certified_rule: RiskAtRule
    novelty_share: float
    novelty_share_image: float | None = None  # novel by the image statistics (reports before them: None)
    windows: dict[str, ShiftWindow]


class ShiftGoals(LooseModel):
    in_domain_false_alarm_rate: float
    in_domain_false_reject_rate: float


class ModelShiftReport(LooseModel):
    target_risk: float
    delta: float
    novelty_method: str
    novelty_threshold: float
    window_sizes: list[int]
    shifts: dict[str, ShiftRow]
    goals: ShiftGoals


class _ShiftFile(RootModel[dict[str, ModelShiftReport]]):
    pass


class ShiftReport:
    """Every model's shift report; ``table()`` is the long per shift × model view the dashboard shows."""

    def __init__(self, models: dict[str, ModelShiftReport], path: Path) -> None:
        self.models, self.path = models, path

    def table(self) -> pd.DataFrame:
        rows: list[dict[str, Any]] = []
        for model, report in self.models.items():
            for shift, row in report.shifts.items():
                entry: dict[str, Any] = {
                    "model": model, "shift": shift, "n": row.n, "accuracy": row.accuracy,
                    "certified_risk": row.certified_rule.realised_risk, "certified_coverage": row.certified_rule.coverage,
                    "novelty_routed_share": row.novelty_share, "image_novel_share": row.novelty_share_image,
                }
                for size in report.window_sizes:
                    window = row.windows.get(str(size))
                    entry[f"alarm_rate@{size}"] = None if window is None else window.alarm_rate
                rows.append(entry)
        return pd.DataFrame(rows)

    def in_domain_rates(self) -> pd.DataFrame:
        """Per model: the false-alarm rate of in-domain windows and the false-reject (novelty) rate of in-domain inputs."""
        return pd.DataFrame([{"model": model, "target_risk": r.target_risk, "novelty_method": r.novelty_method,
                              "in_domain_false_alarm_rate": r.goals.in_domain_false_alarm_rate,
                              "in_domain_false_reject_rate": r.goals.in_domain_false_reject_rate}
                             for model, r in self.models.items()])


def load_shift_report(path: str | Path) -> ShiftReport:
    """shift_report.json (or the folder holding it); errors name the file and the bad field."""
    path = Path(path)
    if path.is_dir():
        path = path / SHIFT_REPORT_FILE
    data = read_json_object(path, "shift report (shift_report.json)")
    return ShiftReport(validate(_ShiftFile, data, path).root, path)


__all__ = ["ModelShiftReport", "ShiftReport", "load_shift_report"]
