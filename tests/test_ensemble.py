import numpy as np
import pytest

from synthetic_runs import make_run
from vlmrel_core.analysis.ensemble import fit_ensembles, load_ensemble
from vlmrel_core.analysis.probes import ProbeError
from vlmrel_core.analysis.splits import SplitSpec, make_split
from vlmrel_core.engine.store import RunReader

GRID = (0.01, 1.0, 100.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), hidden_strength=(0.0, 1.0, 6.0), poolings=("last_token", "mean_all"))


def test_ensembles_concatenate_and_average_the_last_layers(run_dir, tmp_path):
    reader = RunReader(run_dir)
    split = make_split(reader.rows, SplitSpec("image"))
    result = fit_ensembles(reader, "last_token", split, k=2, n_boot=200, c_grid=GRID)
    assert result.layers == [1, 2] and result.concat.info.kind == "concat_layers"
    assert result.concat.info.n_features == 2 * 8
    states = reader.states("last_token", [1, 2])[split.test]
    np.testing.assert_allclose(result.concat.score(states), result.concat_test_scores)
    assert result.concat_auroc.value > 0.95 and result.mean_score_auroc.value > 0.9
    result.mean_score.save(tmp_path / "ens")
    again = load_ensemble(tmp_path / "ens", expected_fingerprint="synthetic-model-1", expected_hidden_size=8)
    np.testing.assert_allclose(again.score(states), result.mean_score_test_scores)
    with pytest.raises(ProbeError, match="fingerprint mismatch"):
        load_ensemble(tmp_path / "ens", expected_fingerprint="other")
