"""Text formatting shared by every written table: "value [low, high]" cells and Markdown tables.

Why its own module: the sweep writer and the report writer both format estimates and tables; keeping the
formatting here (below both) means neither imports the other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from vlmrel_core.analysis.metrics import Estimate


def format_estimate(estimate: Estimate | None, digits: int = 3, signed: bool = False) -> str:
    """"0.732 [0.701, 0.760]" (or "—" when undefined)."""
    if estimate is None or not np.isfinite(estimate.value):
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(estimate.value)} [{f.format(estimate.low)}, {f.format(estimate.high)}]"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency); pipes inside cells are escaped."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return ""
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def row_estimate(row: pd.Series, prefix: str) -> Estimate | None:
    value = row.get(prefix)
    if value is None or pd.isna(value):
        return None
    return Estimate(float(value), float(row[f"{prefix}_low"]), float(row[f"{prefix}_high"]))



def sweep_display(frame: pd.DataFrame, cv_selected: bool = False) -> pd.DataFrame:
    """The human-readable sweep table (from `LayerSweep.to_frame` columns); ``cv_selected`` adds that column."""
    shown = pd.DataFrame({
        "pooling": frame["pooling"],
        "layer": frame["layer"],
        "held-out AUROC [95% CI]": [format_estimate(Estimate(v, lo, hi)) for v, lo, hi in
                                    zip(frame["auroc"], frame["auroc_low"], frame["auroc_high"])],
        "train CV AUROC": frame["cv_auroc"].round(3),
        "C": frame["C"],
        "best": frame["best_of_pooling"].map({True: "best", False: ""}),
        "plateau": frame["in_plateau"].map({True: "yes", False: ""}),
    })
    if cv_selected:
        shown["CV-selected"] = frame["cv_selected"].map({True: "yes", False: ""})
    return shown
