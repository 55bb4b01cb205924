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


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_prompt_is_prefilled_once_and_decoded_for_k_rows(tiny_loaded, family):
    """The K samples share one prefill of ONE row (vision tower included); only decode steps carry K rows."""
    loaded = tiny_loaded[family]
    calls: list[tuple[int, int]] = []
    vision_rows: list[int] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids")
        shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
        calls.append((int(shape[0]), int(shape[1])))

    def record_vision(module, args, kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        vision_rows.append(int(pixels.shape[0]))

    handles = [loaded.model.register_forward_pre_hook(record, with_kwargs=True),
               loaded.model.model.vision_tower.register_forward_pre_hook(record_vision, with_kwargs=True)]
    try:
        result = sample_answers(loaded, render_scene(make_scene(5)), QUESTION, SelfConsistencyConfig(k=6), max_new_tokens=4)
    finally:
        for handle in handles:
            handle.remove()
    assert vision_rows == [1]  # the image is encoded once, not K times
    assert calls[0][0] == 1 and calls[0][1] > 1  # one row: the whole prompt
    assert all(rows == 6 and length == 1 for rows, length in calls[1:])  # then K rows, one new token each
    assert result.n_forward_calls == len(calls) <= 4  # prefill + at most max_new_tokens - 1 decode steps


def test_first_token_distribution_is_the_one_generate_samples_from(tiny_loaded):
    """Same distribution as `generate(do_sample=True, num_return_sequences=K)`: its own processed scores, and
    the empirical frequency of K seeded first tokens within binomial error of them."""
    from vlmrel_core.engine.self_consistency import _first_token_probs, _prepare

    loaded = tiny_loaded["late_fusion"]
    image = render_scene(make_scene(6))
    config = SelfConsistencyConfig(k=3000, temperature=2.0, top_p=0.95, seed=3)
    inputs = _prepare(loaded, image, QUESTION)
    with torch.no_grad():
        torch.manual_seed(0)
        reference = loaded.model.generate(**inputs, do_sample=True, temperature=2.0, top_p=0.95, top_k=0, max_new_tokens=1,
                                          output_scores=True, output_logits=True, return_dict_in_generate=True,
                                          pad_token_id=loaded.tokenizer.pad_token_id)
    expected = torch.softmax(reference.scores[0][0].float(), dim=-1)
    torch.testing.assert_close(_first_token_probs(reference.logits[0], config)[0], expected)
    assert (expected > 0.01).sum() >= 3  # a spread distribution, so the frequency check means something
    result = sample_answers(loaded, image, QUESTION, config, max_new_tokens=1)
    ids = loaded.tokenizer(result.samples_text, add_special_tokens=False)["input_ids"]
    counts = torch.zeros_like(expected)
    for row in ids:
        if row:
            counts[row[0]] += 1
    n = float(counts.sum())
    assert n > 0.9 * config.k  # (special tokens decode to nothing and are left out of the count)
    observed = counts / n
    mask = expected > 0.02
    sigma = torch.sqrt(expected[mask] * (1 - expected[mask]) / n)
    assert torch.all((observed[mask] - expected[mask] / expected[mask].sum() * observed[mask].sum()).abs() < 5 * sigma + 0.01)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "idefics3"])
def test_shared_prefill_decodes_like_generate_for_dynamic_resolution_families(model_type, tmp_path):
    """M-RoPE deltas (Qwen2-VL) and image tiles (Idefics3) survive the repeated cache: T -> 0 gives greedy."""
    from PIL import Image

    from conftest import save_checkpoint
    from vlmrel_core.engine.loading import load_vlm

    if model_type == "qwen2_vl":
        from test_adapters_qwen2_vl import build_tiny_qwen as build
    else:
        from test_adapters_idefics3 import build_tiny_idefics3 as build
    loaded = load_vlm(save_checkpoint(*build(model_type), tmp_path / model_type))
    image = Image.new("RGB", (48, 24), "red")
    greedy = run_batch(loaded, [image], [QUESTION], layers=[0], poolings=["last_token"], logit_lens=False, max_new_tokens=4)
    result = sample_answers(loaded, image, QUESTION, SelfConsistencyConfig(k=3, temperature=1e-4, top_p=1.0), max_new_tokens=4)
    assert result.samples_text == [greedy.answer_text[0]] * 3


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_gray_zone_samples_from_the_greedy_pass_prefill(tiny_loaded, family):
    """`run_batch(keep_prefill=True)` keeps the prompt cache; sampling from one row of it makes no prompt pass
    (every call carries K rows of one token), and at batch 1 draws exactly the samples of a prefill of its own."""
    loaded = tiny_loaded[family]
    images = [render_scene(make_scene(i)) for i in (5, 6, 7)]
    questions = [QUESTION, "is there a blue square in the image?", "what color is the circle?"]
    config = SelfConsistencyConfig(k=6, seed=2)
    single = run_batch(loaded, images[:1], questions[:1], layers=[0], poolings=["last_token"], logit_lens=False,
                       max_new_tokens=4, keep_prefill=True)
    assert single.prefill is not None and single.prefill.cache.get_seq_length() == single.prefill.inputs["input_ids"].shape[1]
    calls: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))

    handle = loaded.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        reused = sample_answers(loaded, images[0], questions[0], config, max_new_tokens=4, prefill=single.prefill.row(0))
    finally:
        handle.remove()
    assert calls and all(shape == (6, 1) for shape in calls)  # decode steps only: no pass over the prompt
    own = sample_answers(loaded, images[0], questions[0], config, max_new_tokens=4)
    assert reused.samples_text == own.samples_text and reused.n_forward_calls == own.n_forward_calls - 1

    # a left-padded batch: each row's cache (a copy; the batch's stays whole) decodes that row's own answer at T -> 0
    batch = run_batch(loaded, images, questions, layers=[0], poolings=["last_token"], logit_lens=False,
                      max_new_tokens=4, keep_prefill=True)
    cold = SelfConsistencyConfig(k=2, temperature=1e-4, top_p=1.0)
    for i in (2, 0, 1):
        result = sample_answers(loaded, images[i], questions[i], cold, max_new_tokens=4, prefill=batch.prefill.row(i))
        assert result.samples_text == [batch.answer_text[i]] * 2
    assert batch.prefill.first_logits.shape[0] == 3


def test_no_prefill_kept_unless_asked_or_where_the_adapter_keeps_batch_state(tiny_loaded):
    from vlmrel_core.engine.adapters.idefics3 import Idefics3Adapter
    from vlmrel_core.engine.adapters.qwen2_vl import Qwen2VLAdapter

    loaded = tiny_loaded["late_fusion"]
    record = run_batch(loaded, [render_scene(make_scene(1))], [QUESTION], layers=[0], poolings=["last_token"],
                       logit_lens=False, max_new_tokens=2)
    assert record.prefill is None  # only when asked
    assert not Qwen2VLAdapter.reusable_prefill and not Idefics3Adapter.reusable_prefill  # M-RoPE deltas, tiles
