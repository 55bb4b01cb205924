import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from synthetic_runs import make_run
from vlmrel_core.analysis.cluster_bootstrap import grouped_auroc_ci, grouped_auroc_gain_ci, weighted_auroc_rows
from vlmrel_core.analysis.controls import evaluate_scores, one_hot, run_all_controls, run_controls
from vlmrel_core.analysis.metrics import auroc_ci
from vlmrel_core.analysis.claims import make_claim
from vlmrel_core.analysis.probes import fit_run_probe
from vlmrel_core.analysis.splits import SplitSpec, make_split
from vlmrel_core.engine.store import RunReader

GRID = (0.01, 1.0, 100.0)


@pytest.fixture(scope="module")
def hidden_knows(tmp_path_factory):
    """Correctness is written in layer 2 of the hidden state; outputs are weak; items are equally hard."""
    path = make_run(tmp_path_factory.mktemp("hidden"), hidden_strength=(0.0, 1.0, 3.0), output_strength=0.1)
    return run_all_controls(RunReader(path), n_boot=200, c_grid=GRID, n_permutations=10)


@pytest.fixture(scope="module")
def item_knows(tmp_path_factory):
    """Correctness depends only on which object is asked; the hidden state and outputs carry nothing."""
    path = make_run(tmp_path_factory.mktemp("item"), hidden_strength=(0.0, 0.0, 0.0), item_difficulty=True,
                    output_strength=0.0, n_images=80, seed=2)
    reader = RunReader(path)
    split = make_split(reader.rows, SplitSpec("image"))
    probe = fit_run_probe(reader, "last_token", [2], split, c_grid=GRID)
    return run_controls(reader, split, probe, n_boot=200, c_grid=GRID, n_permutations=10)


def test_a_real_hidden_signal_beats_every_control_on_both_splits(hidden_knows):
    assert set(hidden_knows) == {"image", "item"}
    for grouping, suite in hidden_knows.items():
        assert suite.grouping == grouping
        for baseline in ("max_answer_prob", "item_control", "answer_only", "no_model"):
            assert suite.gains[f"probe_vs_{baseline}"].verdict() == "gain", (grouping, baseline)
        no_model = suite.signals["no_model"].auroc
        assert no_model.low <= 0.5 <= no_model.high
        null = suite.permutation_null
        assert null.aurocs.size == 10 and 0.3 < null.aurocs.mean() < 0.7
        shuffled = suite.signals["shuffled_label_probe"].auroc
        assert shuffled.low <= 0.5 <= shuffled.high
        assert null.p_value == pytest.approx(1 / 11)
        assert suite.signals["fusion"].auroc.value >= suite.signals["output_model"].auroc.value
    assert make_claim("m/split", hidden_knows).holds


def test_per_item_difficulty_is_caught_by_the_item_control(item_knows):
    probe, item = item_knows.signals["probe"].auroc, item_knows.signals["item_control"].auroc
    assert probe.low <= 0.5 <= probe.high
    assert item.value > 0.65
    gain = item_knows.gains["probe_vs_item_control"]
    assert gain.row_paired.high < 0 and gain.verdict() == "loss"


def test_probe_from_another_split_is_refused(tmp_path):
    reader = RunReader(make_run(tmp_path / "r"))
    image = make_split(reader.rows, SplitSpec("image"))
    item = make_split(reader.rows, SplitSpec("item"))
    probe = fit_run_probe(reader, "last_token", [2], image, c_grid=GRID)
    with pytest.raises(ValueError, match="another split"):
        run_controls(reader, item, probe, n_boot=50, c_grid=GRID)


def test_one_hot_uses_training_categories_only():
    values = np.array(["a", "b", "a", "c", "d"])
    matrix, categories = one_hot(values, train=np.array([0, 1, 2]))
    assert categories == ["a", "b"]
    np.testing.assert_array_equal(matrix, [[1, 0], [0, 1], [1, 0], [0, 0], [0, 0]])


def test_scores_equal_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.6).astype(int)
    score = rng.normal(size=200) + y
    signal = evaluate_scores("s", "output", "", y, score, "1×", n_boot=100)
    assert signal.auroc.value == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert signal.r_pb.value == pytest.approx(stats.pointbiserialr(y, score).statistic, abs=1e-12)
    constant = evaluate_scores("c", "attention", "", y, np.zeros(200), "1×", n_boot=50)
    assert constant.auroc.value == 0.5 and constant.r_pb is None and "undefined" in constant.note


def test_weighted_auroc_matches_sklearn_with_ties_and_replication():
    rng = np.random.default_rng(1)
    y = (rng.random(120) < 0.5).astype(int)
    score = rng.integers(0, 6, 120).astype(float)  # many ties
    assert weighted_auroc_rows(y, score, np.ones((1, 120)))[0] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    weights = rng.integers(0, 4, 120)
    replicated = np.repeat(np.arange(120), weights)
    expected = roc_auc_score(y[replicated], score[replicated])
    assert weighted_auroc_rows(y, score, weights[None].astype(float))[0] == pytest.approx(expected, abs=1e-12)


def test_group_bootstrap_is_wider_than_row_bootstrap_when_errors_cluster():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(8), 50)
    difficulty = rng.normal(size=8)[groups]
    y = (difficulty + 0.3 * rng.normal(size=400) > 0).astype(int)
    score = difficulty + rng.normal(size=400)
    grouped = grouped_auroc_ci(y, score, groups, n_boot=300)
    rows = auroc_ci(y, score, n_boot=300)
    assert grouped.value == rows.value and grouped.low <= grouped.value <= grouped.high
    assert grouped.high - grouped.low > 1.5 * (rows.high - rows.low)
    gain = grouped_auroc_gain_ci(y, score, score, groups, n_boot=100)
    assert gain.value == gain.low == gain.high == 0.0
