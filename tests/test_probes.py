import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vlmrel_core.analysis.metrics import auroc, auroc_ci
from vlmrel_core.analysis.probes import PROBE_JSON, PROBE_TENSORS, ProbeError, fit_probe, load_probe

GRID = (0.01, 1.0, 100.0)


def _planted(n=300, d=12, dim=7, strength=1.5, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    X = rng.normal(size=(n, d))
    X[:, dim] += strength * (2 * y - 1)
    groups = np.repeat(np.arange(n // 3), 3).astype(str)
    return X, y, groups


def test_score_equals_sklearn_predict_proba_and_planted_dimension_ranks_first():
    X, y, groups = _planted()
    probe = fit_probe(X, y, groups, seed=0, c_grid=GRID)
    np.testing.assert_allclose(probe.score(X), probe.pipeline.predict_proba(X)[:, 1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(probe.decision_function(X), probe.pipeline.decision_function(X), atol=1e-10)
    assert probe.ranked_dimensions()[0] == 7
    assert np.argmax(np.abs(probe.raw_weights)) == 7
    assert probe.info.C in GRID and probe.info.n_train == 300 and probe.info.cv_folds == 5


def test_separable_states_give_held_out_auroc_one():
    X, y, groups = _planted(strength=8.0)
    probe = fit_probe(X[:200], y[:200], groups[:200], c_grid=GRID)
    assert auroc(y[200:], probe.score(X[200:])) == 1.0


def test_permuted_label_probe_ci_covers_one_half():
    X, y, groups = _planted(n=600, strength=0.0, seed=1)
    rng = np.random.default_rng(0)
    probe = fit_probe(X[:400], rng.permutation(y[:400]), groups[:400], c_grid=GRID)
    estimate = auroc_ci(y[400:], probe.score(X[400:]), n_boot=300, seed=0)
    assert estimate.low <= 0.5 <= estimate.high


def test_save_load_round_trip_and_wrong_model_is_refused(tmp_path):
    X, y, groups = _planted()
    probe = fit_probe(X, y, groups, c_grid=GRID, model_fingerprint="model-A", pooling="last_token", layers=[3])
    probe.save(tmp_path / "p")
    loaded = load_probe(tmp_path / "p", expected_fingerprint="model-A", expected_hidden_size=12)
    assert loaded.pipeline is None
    np.testing.assert_array_equal(loaded.score(X), probe.score(X))
    assert loaded.info.layers == [3] and loaded.info.training_data_hash == probe.info.training_data_hash
    with pytest.raises(ProbeError, match="model fingerprint mismatch.*'model-A'.*'model-B'"):
        load_probe(tmp_path / "p", expected_fingerprint="model-B")
    with pytest.raises(ProbeError, match="hidden size mismatch.*12.*4096"):
        load_probe(tmp_path / "p", expected_hidden_size=4096)
    with pytest.raises(ProbeError, match="expects 12 features"):
        loaded.score(X[:, :5])


def test_tampered_or_garbage_probe_files_are_clear_errors(tmp_path):
    X, y, groups = _planted()
    directory = fit_probe(X, y, groups, c_grid=GRID).save(tmp_path / "p")
    tensors = load_file(str(directory / PROBE_TENSORS))
    tensors["coef"] = tensors["coef"] * 2.0
    save_file(tensors, str(directory / PROBE_TENSORS))
    with pytest.raises(ProbeError, match="does not match the checksum"):
        load_probe(directory)

    (directory / PROBE_TENSORS).write_bytes(b"\x00garbage" * 8)
    with pytest.raises(ProbeError, match="cannot read .*probe.safetensors"):
        load_probe(directory)

    (directory / PROBE_JSON).write_text(json.dumps({"__reduce__": "os.system"}))
    with pytest.raises(ProbeError, match="not a valid vlmrel probe description"):
        load_probe(directory)

    (directory / PROBE_JSON).unlink()
    with pytest.raises(ProbeError, match="not a saved probe"):
        load_probe(directory)
