"""Session-wide fixtures for the report tests: two synthetic runs of one model and the report built on the first.

Imported by test_report.py, test_report_io.py and test_layer_signals.py (``from report_fixtures import ...``) so
the report is built once per test session, not once per module.
"""

import pytest

from synthetic_runs import make_run
from vlmrel_core.analysis.report import build_report

GRID = (0.1, 10.0)
OPTIONS = dict(n_boot=150, c_grid=GRID, n_permutations=5)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    strong = dict(hidden_strength=(0.0, 1.5, 8.0), output_strength=0.1)
    adversarial = make_run(root / "adversarial", split_name="adversarial", seed=0, self_consistency_k=10, **strong)
    random = make_run(root / "random", split_name="random", seed=1, **strong)
    return adversarial, random


@pytest.fixture(scope="session")
def report(runs):
    return build_report(runs[0], **OPTIONS)
