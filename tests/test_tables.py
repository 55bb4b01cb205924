import numpy as np
import pandas as pd

from vlmrel_core.analysis.metrics import Estimate
from vlmrel_core.analysis.tables import format_estimate, markdown_table, row_estimate, sweep_display


def test_estimates_and_markdown_cells():
    assert format_estimate(Estimate(0.7321, 0.7012, 0.76)) == "0.732 [0.701, 0.760]"
    assert format_estimate(Estimate(0.05, -0.01, 0.1), signed=True) == "+0.050 [-0.010, +0.100]"
    assert format_estimate(None) == "—" and format_estimate(Estimate(np.nan, 0, 1)) == "—"
    table = markdown_table(pd.DataFrame({"a": ["x|y", None], "b": [1.5, np.inf]}))
    assert table.split("\n") == ["| a | b |", "|---|---|", "| x\\|y | 1.5 |", "|  |  |"]
    row = pd.Series({"auroc": 0.8, "auroc_low": 0.7, "auroc_high": 0.9, "r_pb": np.nan})
    assert row_estimate(row, "auroc") == Estimate(0.8, 0.7, 0.9) and row_estimate(row, "r_pb") is None


def test_sweep_display_formats_the_sweep_columns():
    frame = pd.DataFrame({"pooling": ["last_token"] * 2, "layer": [0, 1], "auroc": [0.5, 0.9], "auroc_low": [0.4, 0.8],
                          "auroc_high": [0.6, 1.0], "cv_auroc": [0.51234, 0.9], "C": [1.0, 10.0],
                          "best_of_pooling": [False, True], "in_plateau": [False, True], "cv_selected": [False, True]})
    shown = sweep_display(frame)
    assert list(shown["best"]) == ["", "best"] and list(shown["train CV AUROC"]) == [0.512, 0.9]
    assert "CV-selected" not in shown and list(sweep_display(frame, cv_selected=True)["CV-selected"]) == ["", "yes"]
