"""Self-consistency on a live (tiny, real-class) model: seeded, counted, and agreeing with greedy as T -> 0."""

from __future__ import annotations

import pytest
import torch

from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.run import run_batch
from vlmrel_core.engine.self_consistency import count_forward_calls, sample_answers
from vlmrel_core.signals.consistency import SelfConsistencyConfig, agreement_rate, majority_answer

QUESTION = "is there a red circle in the image?"


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_k_samples_are_seeded_counted_and_summarised(tiny_loaded, family):
    loaded = tiny_loaded[family]
    image = render_scene(make_scene(1))
    config = SelfConsistencyConfig(k=4, temperature=0.7, top_p=0.9, seed=11)
    with count_forward_calls(loaded.model) as outside:
        first = sample_answers(loaded, image, QUESTION, config)
    again = sample_answers(loaded, image, QUESTION, config)
    assert len(first.samples) == len(first.samples_text) == 4
    assert first.samples_text == again.samples_text and first.seed == again.seed  # seeded by (seed, image, question)
    assert first.samples == [loaded.adapter.normalize(t) for t in first.samples_text]
    assert first.agreement == agreement_rate(first.samples)
    assert first.majority_answer == majority_answer(first.samples)
    # One batched generate: calls counted independently agree, and the cost is reported as K sequences per call.
    assert first.n_forward_calls == outside.calls >= 1
    assert first.sequence_forward_passes == 4 * first.n_forward_calls
    assert first.cost_multiplier == 4


def test_another_seed_draws_other_samples(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    image = render_scene(make_scene(2))
    a = sample_answers(loaded, image, QUESTION, SelfConsistencyConfig(k=4, seed=0))
    b = sample_answers(loaded, image, QUESTION, SelfConsistencyConfig(k=4, seed=1))
    assert a.samples_text != b.samples_text  # random tiny model at T=0.7: 4 x 8 tokens never all coincide


def test_sampling_restores_the_global_rng_and_removes_its_hook(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    image = render_scene(make_scene(3))
    hooks_before = len(loaded.model._forward_pre_hooks)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample_answers(loaded, image, QUESTION, SelfConsistencyConfig(k=2, seed=5))
    assert torch.equal(torch.rand(3), expected)
    assert len(loaded.model._forward_pre_hooks) == hooks_before


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_near_zero_temperature_agrees_with_the_greedy_answer(tiny_loaded, family):
    loaded = tiny_loaded[family]
    image = render_scene(make_scene(4))
    greedy = run_batch(loaded, [image], [QUESTION], layers=[0], poolings=["last_token"], logit_lens=False)
    result = sample_answers(loaded, image, QUESTION, SelfConsistencyConfig(k=3, temperature=1e-4, top_p=1.0))
    assert result.samples_text == [greedy.answer_text[0]] * 3
    assert result.agreement == 1.0 and result.majority_answer == greedy.answer[0]


def test_empty_question_is_refused(tiny_loaded):
    with pytest.raises(ValueError, match="question is empty"):
        sample_answers(tiny_loaded["late_fusion"], render_scene(make_scene(0)), "  ")
