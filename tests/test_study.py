"""Accuracy with and without interventions, the paired-bootstrap effect, and the side-by-side study table."""

import numpy as np
import pandas as pd
import pytest

from vlmrel_core.data.loader import load_vqa_jsonl
from vlmrel_core.engine.answers import is_correct
from vlmrel_core.engine.run import run_batch
from vlmrel_core.interventions import ablation, study


def _hook_counts(loaded):
    layers = loaded.adapter.decoder_layers(loaded.model)
    return [len(layer._forward_hooks) for layer in layers]


# ------------------------------------------------------------------------------------------ effect and CI


def test_ablation_effect_known_differences_and_paired_ci():
    n = 400
    base = np.ones(n, dtype=int)
    ablated = base.copy()
    ablated[:40] = 0  # -10 pp overall
    types = np.array(["a"] * 200 + ["b"] * 200)  # all flips in "a": -20 pp there, 0 in "b"
    table = study.ablation_effect(base, ablated, types, n_boot=1000, seed=0)
    assert table["question_type"].tolist() == ["all", "a", "b"]
    assert table["n"].tolist() == [400, 200, 200]
    np.testing.assert_allclose(table["delta_pp"], [-10.0, -20.0, 0.0])
    low, high = table.loc[0, ["ci_low_pp", "ci_high_pp"]]
    assert low < -10 < high and high - low < 8  # binomial SE of 10% flips at n=400 is 1.5 pp
    pd.testing.assert_frame_equal(table, study.ablation_effect(base, ablated, types, n_boot=1000, seed=0))
    same = study.ablation_effect(base, base)
    assert same[["delta_pp", "ci_low_pp", "ci_high_pp"]].to_numpy().tolist() == [[0.0, 0.0, 0.0]]

    # coverage: the paired 95% CI contains the true population difference in about 95% of repeated experiments
    # (baseline 80% right; ablation forces 10% of answers wrong and 5% right: E[a - b] = 0.05 - 0.15 * 0.8 = -7 pp)
    rng = np.random.default_rng(7)
    hits = 0
    for trial in range(150):
        b = rng.random(300) < 0.8
        u = rng.random(300)
        a = np.where(u < 0.10, False, np.where(u < 0.15, True, b))
        row = study.ablation_effect(b, a, n_boot=400, seed=trial).iloc[0]
        hits += row.ci_low_pp <= -7.0 <= row.ci_high_pp
    assert 0.88 <= hits / 150 <= 0.995, hits

    with pytest.raises(ValueError, match="same questions"):
        study.ablation_effect(base, ablated[:10])
    with pytest.raises(ValueError, match="0/1"):
        study.ablation_effect(base * 2, ablated)
    with pytest.raises(ValueError, match="question types"):
        study.ablation_effect(base, ablated, ["a"])


# ------------------------------------------------------------------------------------------ evaluation and the study


def test_evaluate_accuracy_and_study_on_both_tiny_models(tiny_loaded, tiny_dataset):
    samples = load_vqa_jsonl(tiny_dataset)[:6]
    images = [s.load_image() for s in samples]
    late = tiny_loaded["late_fusion"]
    record = run_batch(late, images, [s.question for s in samples])
    expected = np.array([is_correct(a, s.label) for a, s in zip(record.answer, samples)])
    np.testing.assert_array_equal(study.evaluate_accuracy(late, samples, batch_size=4), expected)
    everything = ablation.DimensionAblation(layer=-1, dims=tuple(range(128)))
    before = _hook_counts(late)  # transformers may keep output-recording hooks of its own
    ablated = study.evaluate_accuracy(late, samples, everything, images=images, batch_size=4)
    assert ablated.dtype == bool and ablated.shape == (6,)
    assert _hook_counts(late) == before
    states = run_batch(late, images, [s.question for s in samples], layers=[1], poolings=("mean_all",)).states["mean_all"]
    np.testing.assert_allclose(study.layer_means(late, samples, 1, images=images, batch_size=4), states[:, 0].mean(0), rtol=1e-5, atol=1e-6)

    weights = np.zeros(128)
    weights[[9, 3]] = [2.0, -1.0]
    calls = []
    table = study.run_ablation_study(tiny_loaded, samples, {"late_fusion": -1, "early_fusion": 2}, weights, ks=(2,),
                                     modes=("zero", "mean"), n_boot=100, images=images,
                                     progress=lambda done, total, stage: calls.append((done, total, stage)))
    # passes: baseline, top_k x 2 modes, random_k, random_fraction, 3 masks = 8 per model; the fast path runs the
    # batch's 7 together, then mean ablation with the baseline's own means (which needs every batch's baseline)
    assert calls[0][0] == 0 and calls[-1][:2] == (16, 16) and [c[0] for c in calls] == [0, 7, 8, 15, 16]
    assert ("early_fusion: top_k k=2 mean" in {c[2] for c in calls})
    assert calls[1][2] == "late_fusion: batch 1 of 1, 7 passes"
    assert list(table.columns) == study.TABLE_COLUMNS
    assert set(table["model"]) == {"late_fusion", "early_fusion"}
    assert set(table["fusion"]) == {"late", "early"}
    conditions = {"top_k", "random_k", "random_fraction", "mask_high", "mask_low", "mask_random"}
    for _, rows in table.groupby("model"):
        assert set(rows["condition"]) == conditions
        assert (rows["question_type"] == "all").sum() == 7  # top_k x 2 modes + random_k + fraction + 3 masks
    overall = table[(table.model == "late_fusion") & (table.question_type == "all")]
    assert (overall["baseline_acc"] == expected.mean()).all()
    assert overall.loc[overall.condition == "random_fraction", "n_dims"].item() == 64
    assert set(table["layer"].dropna()) == {3, 2}  # -1 resolved to 3; patch masking has no layer
    assert ((table["ci_low_pp"] <= table["delta_pp"]) & (table["delta_pp"] <= table["ci_high_pp"])).all()
    wide = study.side_by_side(table)
    assert list(wide.columns)[-2:] == ["late_fusion", "early_fusion"] and len(wide) == len(table) // 2


def test_shared_baseline_equals_a_fresh_baseline_per_condition(tiny_loaded, tiny_dataset):
    """The study pairs every condition with one unablated pass (given or its own); the numbers equal pairing each
    condition with a baseline run just for it, the way a per-condition script would."""
    samples = load_vqa_jsonl(tiny_dataset)[:6]
    images = [s.load_image() for s in samples]
    late = tiny_loaded["late_fusion"]
    weights = np.zeros(128)
    weights[[9, 3, 40]] = [2.0, -1.0, 0.5]
    options = dict(ks=(2,), modes=("zero",), random_fraction=0.5, mask_fraction=0.3, n_boot=50, seed=3,
                   batch_size=4, images=images)
    own = study.run_ablation_study(late, samples, -1, weights, **options)
    shared = study.ablation_baseline(late, samples, -1, images, attentions=True, batch_size=4)
    given = study.run_ablation_study(late, samples, -1, weights, baselines={"model": shared}, **options)
    pd.testing.assert_frame_equal(own, given)

    types = [study._question_type(s) for s in samples]
    top = ablation.top_k_dimensions(weights, 2)
    fraction = ablation.random_dimensions(128, fraction=0.5, seed=3 + 104729)
    for salt, (condition, dims) in enumerate([("top_k", top), ("random_k", None), ("random_fraction", fraction)]):
        if dims is None:
            dims = ablation.random_dimensions(128, k=2, seed=3 + 1, exclude=top)
        fresh_base = study.evaluate_accuracy(late, samples, images=images, batch_size=4)
        ablated = study.evaluate_accuracy(late, samples, ablation.DimensionAblation(3, tuple(int(d) for d in dims)),
                                          images=images, batch_size=4)
        expected = study.ablation_effect(fresh_base, ablated, types, n_boot=50, seed=3 * 1_000_003 + salt)
        rows = own[own["condition"] == condition].reset_index(drop=True)[list(expected.columns)]
        pd.testing.assert_frame_equal(rows, expected)

    with pytest.raises(ValueError, match="attention maps"):
        no_maps = study.ablation_baseline(late, samples, -1, images, attentions=False, batch_size=4)
        study.run_ablation_study(late, samples, -1, weights, baselines={"model": no_maps}, **options)
    with pytest.raises(ValueError, match="questions"):
        study.run_ablation_study(late, samples[:4], -1, weights, baselines={"model": shared},
                                 **{**options, "images": images[:4]})


def test_every_models_inputs_are_checked_before_the_first_pass(tiny_loaded, tiny_dataset):
    """A wrong weight vector, k or baseline for the second model fails before the first model's passes run."""
    samples = load_vqa_jsonl(tiny_dataset)[:4]
    late = tiny_loaded["late_fusion"]
    calls = []
    options = dict(n_boot=10, progress=lambda done, total, stage: calls.append(done))
    right, wrong = np.arange(128, dtype=float), np.zeros(64)
    two = {"first": late, "second": late}
    with pytest.raises(ValueError, match="second: 64 probe weights for hidden size 128"):
        study.run_ablation_study(two, samples, -1, {"first": right, "second": wrong}, **options)
    with pytest.raises(ValueError, match=r"k must be an integer in 0\.\.128, got 500"):
        study.run_ablation_study(two, samples, -1, right, ks=(5, 500), **options)
    short = study.AblationBaseline(correct=np.ones(2, dtype=bool), answers=["yes", "no"])
    with pytest.raises(ValueError, match="second: the given baseline has 2 questions"):
        study.run_ablation_study(two, samples, -1, right, baselines={"second": short}, mask_fraction=None, **options)
    assert calls == []  # not even the first progress report: nothing ran
