"""Live masking on the embedded late-fusion model: the unmasked pass reproduces the shipped extraction's answers,
settings combine top-k / random dimensions and greyed patches, and the paired effect is computed on the same
questions."""

import numpy as np
import pandas as pd
import pytest

from vlmrel_core.data.loader import load_vqa_jsonl
from vlmrel_core.figures.interventions import live_masking_figure
from vlmrel_core.interventions.live import (
    MaskSettings, PassResult, live_baseline, masked_dimensions, paired_effect, run_masked,
)
from vlmrel_core.results.shipped import load_shipped_run
from vlmrel_core.samples.catalog import sample_catalog

pytestmark = pytest.mark.slow
SAMPLES = sample_catalog()
N = 12


@pytest.fixture(scope="module")
def model_and_baseline():
    from vlmrel_core.engine.loading import load_vlm

    loaded = load_vlm(SAMPLES.model_dir("late_fusion"))
    samples = load_vqa_jsonl(SAMPLES.dataset("adversarial"))[:N]
    return loaded, live_baseline(loaded, samples, batch_size=6)


def test_unmasked_pass_matches_the_shipped_extraction(model_and_baseline):
    _, baseline = model_and_baseline
    rows = load_shipped_run("late_fusion", "adversarial").rows.set_index("sample_id")
    shipped = rows.loc[[s.sample_id for s in baseline.samples]]
    assert baseline.result.answers == [str(a) for a in shipped["answer_text"]]
    np.testing.assert_array_equal(baseline.result.correct, shipped["correct"].to_numpy(dtype=bool))
    np.testing.assert_allclose(baseline.result.confidence, shipped["max_answer_prob"], atol=1e-4)
    assert len(baseline.attention_maps) == N and baseline.attention_maps[0].shape == baseline.grids[0]


def test_masked_dimensions_combine_top_k_and_a_disjoint_random_share():
    weights = np.array([0.1, -5.0, 0.2, 3.0, 0.0, 0.05, 0.3, -0.4])
    assert masked_dimensions(MaskSettings(0, top_k=2), weights, 8).tolist() == [1, 3]
    both = masked_dimensions(MaskSettings(0, top_k=2, random_fraction=0.5), weights, 8)
    assert both.size == 2 + 4 and {1, 3} <= set(both.tolist()) and len(set(both.tolist())) == both.size
    assert masked_dimensions(MaskSettings(0), weights, 8).size == 0
    with pytest.raises(ValueError, match="patch_which"):
        MaskSettings(0, patch_which="middle")


def test_masking_changes_the_answers_and_identity_is_the_baseline(model_and_baseline):
    loaded, baseline = model_and_baseline
    weights = np.random.default_rng(0).normal(size=baseline.hidden_size)
    assert run_masked(loaded, baseline, MaskSettings(-1), weights) is baseline.result
    greyed = run_masked(loaded, baseline, MaskSettings(-1, patch_fraction=1.0), weights, batch_size=6)
    assert not np.allclose(greyed.confidence, baseline.result.confidence)
    zeroed = run_masked(loaded, baseline, MaskSettings(1, random_fraction=0.9), weights, batch_size=6)
    assert not np.allclose(zeroed.confidence, baseline.result.confidence)
    assert len(zeroed.answers) == N


def test_paired_effect_and_its_figure():
    before = PassResult(["yes"] * 6, np.array([1, 1, 1, 0, 1, 0], bool), np.full(6, 0.8))
    after = PassResult(["no"] * 6, np.array([1, 0, 1, 0, 0, 0], bool), np.full(6, 0.6))
    effect = paired_effect(before, after, n_boot=200)
    accuracy = effect.set_index("metric").loc["accuracy"]
    assert accuracy["unmasked"] == pytest.approx(4 / 6) and accuracy["delta"] == pytest.approx(-2 / 6)
    assert accuracy["ci_low"] <= accuracy["delta"] <= accuracy["ci_high"] <= 0
    confidence = effect.set_index("metric").loc["confidence"]
    assert confidence["delta"] == pytest.approx(-0.2) and confidence["ci_low"] == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="same questions"):
        paired_effect(before, PassResult([], np.zeros(0, bool), np.zeros(0)))
    figure = live_masking_figure({"late": effect, "early": effect.assign(masked=effect["unmasked"])})
    masked = [t for t in figure.data if t.name == "masked"]
    assert [t.y[0] for t in masked[:2]] == [pytest.approx(2 / 6), pytest.approx(4 / 6)]
    assert masked[0].error_y.arrayminus[0] == pytest.approx(2 / 6 - (4 / 6 + accuracy["ci_low"]))
    with pytest.raises(ValueError, match="no masking results"):
        live_masking_figure({})
    assert isinstance(effect, pd.DataFrame)
