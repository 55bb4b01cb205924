"""Numbers the Inspect page quotes from a shipped report, read (never recomputed) through `results.report`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmrel_core.results.files import ResultsError
from vlmrel_core.results.report import load_report_summary

ATTENTION_COLUMN = "attention H_s"
PROBE_COLUMN = "probe (CV-selected layer)"


class ReportQuoteError(ValueError):
    """The report has no such number, said in words."""


@dataclass(frozen=True)
class HeadlineQuote:
    run: str
    grouping: str
    attention_auroc: str  # "0.460 [0.408, 0.507]": point and 95% CI as the report prints them
    probe_auroc: str


def headline_quote(report_json: str | Path, run: str, grouping: str = "image") -> HeadlineQuote:
    """The held-out attention (spatial entropy H_s) and probe AUROC of one run from the report's headline table."""
    path = Path(report_json)
    try:
        headline = load_report_summary(path).headline
    except (ResultsError, OSError) as err:
        raise ReportQuoteError(f"cannot read the report {path}: {err}") from err
    for row in headline:
        if row.get("run") == run and row.get("grouping") == grouping:
            try:
                return HeadlineQuote(run, grouping, str(row[ATTENTION_COLUMN]), str(row[PROBE_COLUMN]))
            except KeyError as err:
                raise ReportQuoteError(f"{path}: the headline row for {run} has no {err} column") from err
    runs = sorted({str(r.get("run")) for r in headline})
    raise ReportQuoteError(f"{path}: no headline row for run {run!r} ({grouping} grouping); runs: {runs}")
