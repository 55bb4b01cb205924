"""Attention signals vs the gate probe on the gate's test rows: values are the report's features, per layer."""

import numpy as np
import pytest

from vlmrel_core.analysis.metrics import auroc
from vlmrel_core.results import load_gate_bundle
from vlmrel_core.results.attention_probe import attention_probe_rows, signal_label
from vlmrel_core.results.files import ResultsError
from vlmrel_core.results.gate_splits import gate_split_scores
from vlmrel_core.results.shipped import load_shipped_run
from vlmrel_core.samples.catalog import sample_catalog
from vlmrel_core.signals.attention import spatial_entropy


@pytest.fixture(scope="module")
def rows():
    run = load_shipped_run("late_fusion", "adversarial")
    scores = gate_split_scores(load_gate_bundle(sample_catalog().gate_dir("late_fusion")), run)
    return run, scores, attention_probe_rows(run, scores)


def test_rows_are_the_gate_test_split_with_probe_scores(rows):
    run, scores, table = rows
    np.testing.assert_array_equal(table.rows, scores.test)
    np.testing.assert_allclose(table.probe_score, scores.raw[scores.test])
    np.testing.assert_array_equal(table.correct, run.correct()[scores.test])


def test_per_layer_and_mean_map_values_are_the_signals_of_the_run_maps(rows):
    run, _, table = rows
    row = int(table.rows[3])
    layer = table.layers[1]
    assert table.signal("spatial_entropy", layer)[3] == pytest.approx(spatial_entropy(run.attention_map(row, layer)))
    hs = [table.signal("spatial_entropy", l)[3] for l in table.layers]
    assert table.signal("delta_spatial_entropy", table.layers[2])[3] == pytest.approx(hs[2] - hs[1])
    assert not np.allclose(table.signal("spatial_entropy", table.layers[0]), table.signal("spatial_entropy", table.layers[-1]))
    with pytest.raises(ResultsError, match="previous layer"):
        table.signal("delta_spatial_entropy", table.layers[0])
    with pytest.raises(ResultsError, match="not extracted"):
        table.signal("entropy", 99)


def test_association_is_oriented_auroc_with_a_ci(rows):
    _, _, table = rows
    result = table.association("spatial_entropy", table.layers[2], n_boot=200)
    expected = auroc(table.correct, -table.signal("spatial_entropy", table.layers[2]))
    assert result.auroc.value == pytest.approx(expected)
    assert result.auroc.low < result.auroc.value < result.auroc.high and result.n == table.rows.size
    probe = table.association("probe", n_boot=200)
    assert probe.auroc.value > 0.6 > result.auroc.value
    assert signal_label("spatial_entropy", 2) == "H_s (layer 2)" and signal_label("probe") == "probe score"
