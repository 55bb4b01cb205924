"""The ablation study's fast path (kept inputs and prefill residuals per batch, first answer token) gives the same
table as the full masked generate per condition, on the embedded late-fusion model (a word-level tokenizer)."""

import numpy as np
import pandas as pd
import pytest

from vlmrel_core.data.loader import load_vqa_jsonl
from vlmrel_core.interventions import study, study_passes
from vlmrel_core.interventions.live_fast import prepare_batch, residual_bytes
from vlmrel_core.interventions.study_passes import StudyCondition, run_conditions
from vlmrel_core.samples.catalog import sample_catalog

pytestmark = pytest.mark.slow
SAMPLES = sample_catalog()
N = 30


@pytest.fixture(scope="module")
def late():
    from vlmrel_core.engine.loading import load_vlm

    loaded = load_vlm(SAMPLES.model_dir("late_fusion"), attn_implementation="eager")
    samples = load_vqa_jsonl(SAMPLES.dataset("adversarial"))[:N]
    return loaded, samples, [s.load_image() for s in samples]


def test_fast_study_table_equals_the_full_path(late):
    """Every condition (top-k zero and mean with the baseline's means, random-k, random fraction, three masks) at a
    middle layer, so the resumed pass runs later layers; batches of 8, the last one short."""
    loaded, samples, images = late
    weights = np.random.default_rng(0).normal(size=loaded.hidden_size)
    options = dict(ks=(3,), modes=("zero", "mean"), random_fraction=0.5, mask_fraction=0.3, n_boot=200, seed=2,
                   batch_size=8, images=images)
    steps = []
    fast = study.run_ablation_study(loaded, samples, 1, weights, fast=True, progress=lambda *a: steps.append(a), **options)
    full_steps = []
    full = study.run_ablation_study(loaded, samples, 1, weights, fast=False,
                                    progress=lambda *a: full_steps.append(a), **options)
    pd.testing.assert_frame_equal(fast, full)
    assert (fast["ablated_acc"] != fast["baseline_acc"]).any()  # the conditions change answers
    done = [s[0] for s in steps]  # batches of the 7 passes run together, then mean ablation by the baseline's means
    assert done == sorted(done) and steps[-1] == (8, 8, "model: top_k k=3 mean") and "batch 4 of 4" in steps[-2][2]
    assert [s[0] for s in full_steps] == list(range(9)) and full_steps[1][2] == "model: baseline"


def test_conditions_from_a_given_baseline_and_a_residual_budget_equal_the_full_path(late, monkeypatch):
    """A shared baseline and given layer means; a residual budget that only the last, short batch fits (the others
    run dimension ablations as a hooked prefill, it resumes with the mean values); a condition whose first tokens
    decide nothing (every dimension zeroed) falls back to the batch's full pass: all equal the full path."""
    loaded, samples, images = late
    hidden = loaded.hidden_size
    means = np.random.default_rng(1).normal(size=hidden)
    conditions = [StudyCondition((5, 9, 40), "mean"), StudyCondition(tuple(range(hidden)), "zero"),
                  StudyCondition(which="random"), StudyCondition(which="high")]
    base = study.ablation_baseline(loaded, samples, -1, images, attentions=True, batch_size=8)
    options = dict(means=means, mask_fraction=0.4, seed=5, batch_size=8, max_new_tokens=8, baseline=base)
    last = prepare_batch(loaded, images[24:], [s.question for s in samples[24:]])
    calls = {"full": 0, "resumed": 0}
    full_pass, resumed = study_passes.evaluate_pass, study_passes.resumed_logits

    def counted(name, function):
        return lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or function(*a, **k)

    monkeypatch.setattr(study_passes, "evaluate_pass", counted("full", full_pass))
    monkeypatch.setattr(study_passes, "resumed_logits", counted("resumed", resumed))
    _, fast = run_conditions(loaded, samples, images, 3, conditions, fast=True,
                             residual_budget=residual_bytes(last, loaded), **options)
    assert calls["full"], "every dimension zeroed should leave first tokens that decide nothing"
    assert calls["resumed"] == 2  # the last batch's two dimension conditions
    monkeypatch.setattr(study_passes, "evaluate_pass", full_pass)
    _, full = run_conditions(loaded, samples, images, 3, conditions, fast=False, **options)
    for got, expected in zip(fast, full):
        np.testing.assert_array_equal(got, expected)
