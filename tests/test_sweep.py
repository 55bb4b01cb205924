import json

import pandas as pd
import pytest

from synthetic_runs import make_run
from vlmrel_core.analysis.metrics import auroc
from vlmrel_core.analysis.splits import SplitSpec
from vlmrel_core.analysis.sweep import sweep_layers, write_sweep
from vlmrel_core.engine.store import RunReader

GRID = (0.01, 1.0, 100.0)
#: sweep.csv's columns as documented in `sweep`'s docstring; typed loaders depend on them (add, never rename).
SWEEP_COLUMNS = ["pooling", "layer", "auroc", "auroc_low", "auroc_high", "cv_auroc", "C", "n_train", "n_test",
                 "best_of_pooling", "in_plateau", "cv_selected"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), hidden_strength=(0.0, 1.0, 6.0), poolings=("last_token", "mean_all"))


def test_layer_sweep_finds_the_informative_layer_and_a_consistent_plateau(run_dir, tmp_path):
    reader = RunReader(run_dir)
    sweep = sweep_layers(reader, split=SplitSpec("image"), n_boot=300, c_grid=GRID)
    assert len(sweep.results) == 2 * 3
    by_layer = {(r.pooling, r.layer): r for r in sweep.results}
    assert by_layer[("last_token", 0)].auroc.low <= 0.5 <= by_layer[("last_token", 0)].auroc.high
    assert by_layer[("last_token", 2)].auroc.value == 1.0
    best = sweep.best("last_token")
    assert best.layer == 2
    plateau = sweep.plateau("last_token")
    assert best in plateau and by_layer[("last_token", 0)] not in plateau
    assert all((r.auroc.high >= best.auroc.value) == (r in plateau) for r in sweep.results if r.pooling == "last_token")
    assert sweep.selected().layer == 2
    y = reader.rows["correct"].to_numpy()
    assert auroc(y[sweep.split.test], sweep.test_scores[("last_token", 2)]) == best.auroc.value
    paths = write_sweep(sweep, tmp_path / "sweep")
    assert all(p.exists() for p in paths)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["best"]["last_token"]["layer"] == 2


def test_sweep_reports_progress_per_probe_and_writes_the_documented_columns(run_dir, tmp_path):
    calls = []
    sweep = sweep_layers(RunReader(run_dir), ["last_token"], SplitSpec("image"), n_boot=50, c_grid=GRID,
                         progress=lambda done, total, stage: calls.append((done, total, stage)))
    assert calls == [(0, 3, "loading states"), (1, 3, "layer 1/3 last_token"), (2, 3, "layer 2/3 last_token"),
                     (3, 3, "layer 3/3 last_token")]
    write_sweep(sweep, tmp_path)
    frame = pd.read_csv(tmp_path / "sweep.csv")
    assert list(frame.columns) == SWEEP_COLUMNS and len(frame) == 3
    assert frame["cv_selected"].sum() == 1 and frame["in_plateau"].dtype == bool


def test_the_sweep_holds_one_layer_of_one_pooling_at_a_time(run_dir, monkeypatch):
    """Memory flat in the width of the cache: every read is one (pooling, layer), never a whole pooling."""
    reads: list[tuple[str, tuple[int, ...] | None]] = []
    original = RunReader.states

    def recording(self, pooling, layers=None):
        reads.append((pooling, None if layers is None else tuple(layers)))
        return original(self, pooling, layers)

    monkeypatch.setattr(RunReader, "states", recording)
    sweep_layers(RunReader(run_dir), split=SplitSpec("image"), n_boot=20, c_grid=(1.0,))
    assert reads and all(layers is not None and len(layers) == 1 for _, layers in reads)
    assert sorted(set(reads)) == [(p, (l,)) for p in ("last_token", "mean_all") for l in (0, 1, 2)]
