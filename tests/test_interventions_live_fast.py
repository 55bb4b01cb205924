"""The fast masked pass (kept inputs and residual stream, first answer token) equals the full masked generate on the
embedded models: same answers, same correctness, same confidence, for dimension masks at every layer, greyed
patches, and both at once; the tensor-space greying equals greying the image then processing it."""

import re

import numpy as np
import pytest
import torch

from vlmrel_core.data.loader import load_vqa_jsonl
from vlmrel_core.engine.answers import NO_WORDS, YES_WORDS, normalize_answer
from vlmrel_core.interventions.live import MaskSettings, live_baseline, masked_answer, run_masked, run_masked_in_parallel
from vlmrel_core.interventions import live_fast
from vlmrel_core.interventions.live_fast import (
    KeptBatch, decided_answers, first_token_logits, grey_pixel_values, prepare_batch, word_level_tokenizer,
)
from vlmrel_core.interventions.masking import grey_cells, patch_masks
from vlmrel_core.samples.catalog import sample_catalog

pytestmark = pytest.mark.slow
SAMPLES = sample_catalog()
N = 24


@pytest.fixture(scope="module", params=["late_fusion", "early_fusion"])
def model_and_baseline(request):
    from vlmrel_core.engine.loading import load_vlm

    loaded = load_vlm(SAMPLES.model_dir(request.param))
    samples = load_vqa_jsonl(SAMPLES.dataset("adversarial"))[:N]
    return loaded, live_baseline(loaded, samples, batch_size=10)  # 3 batches, the last one short


def _first_word_if_deciding(text: str) -> str:
    words = re.sub(r"[^\w\s]", " ", text).split()
    return words[0] if words and words[0].lower() in YES_WORDS | NO_WORDS else text


SETTINGS = [
    MaskSettings(-1, top_k=5),
    MaskSettings(0, random_fraction=0.5),
    MaskSettings(1, top_k=8, random_fraction=0.9, seed=3),
    MaskSettings(2, patch_fraction=0.3, patch_which="high"),
    MaskSettings(0, top_k=5, patch_fraction=0.6, patch_which="random", seed=1),
    MaskSettings(3, random_fraction=0.85, patch_fraction=0.5, patch_which="low"),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"L{s.layer}-k{s.top_k}-r{s.random_fraction}-p{s.patch_fraction}")
def test_fast_masked_pass_equals_the_full_masked_generate(model_and_baseline, settings):
    loaded, baseline = model_and_baseline
    weights = np.random.default_rng(0).normal(size=baseline.hidden_size)
    fast = run_masked(loaded, baseline, settings, weights)
    full = run_masked(loaded, baseline, settings, weights, batch_size=10, fast=False)
    # the first word where it decides the answer ("no" for "no no no"), the full text otherwise
    assert fast.answers == [_first_word_if_deciding(a) for a in full.answers]
    assert [normalize_answer(a) for a in fast.answers] == [normalize_answer(a) for a in full.answers]
    np.testing.assert_array_equal(fast.correct, full.correct)
    np.testing.assert_allclose(fast.confidence, full.confidence, atol=1e-5)
    for index in (0, N - 1):  # the page's example: the full text
        text, confidence = masked_answer(loaded, baseline, settings, weights, index)
        assert text == full.answers[index] and confidence == pytest.approx(full.confidence[index], abs=1e-5)


def test_baseline_keeps_every_layer_and_the_inputs(model_and_baseline):
    loaded, baseline = model_and_baseline
    assert [k.inputs["input_ids"].shape[0] for k in baseline.kept] == [10, 10, 4]
    n_layers = len(loaded.adapter.decoder_layers(loaded.model))
    assert all(sorted(k.layer_outputs) == list(range(n_layers)) for k in baseline.kept)
    assert word_level_tokenizer(loaded.tokenizer)
    eos, yes = loaded.tokenizer.eos_token_id, loaded.answer_tokens.yes_ids[0]
    comma = loaded.tokenizer.convert_tokens_to_ids(",")
    assert decided_answers(loaded, np.array([eos, yes, comma])) == ["", "yes", None]


def test_greying_the_pixel_tensor_equals_greying_the_image(model_and_baseline):
    loaded, baseline = model_and_baseline
    kept, images = baseline.kept[0], baseline.images[:10]
    masks = patch_masks(10, None, baseline.grids[:10], 0.4, "random", seed=5)
    greyed = grey_pixel_values(loaded, kept, images, masks)
    processed = prepare_batch(loaded, [grey_cells(i, m) for i, m in zip(images, masks)], ["x"] * 10)["pixel_values"]
    assert kept.pixels_greyable and torch.equal(greyed, processed)


def test_a_budget_of_zero_keeps_no_residuals_and_stays_exact(model_and_baseline):
    loaded, baseline = model_and_baseline
    small = live_baseline(loaded, baseline.samples[:6], batch_size=6, residual_budget=0)
    assert small.kept and not small.kept[0].layer_outputs
    weights = np.random.default_rng(1).normal(size=small.hidden_size)
    settings = MaskSettings(1, top_k=4)
    fast, full = run_masked(loaded, small, settings, weights), run_masked(loaded, small, settings, weights, fast=False)
    assert fast.answers == full.answers
    np.testing.assert_allclose(fast.confidence, full.confidence, atol=1e-5)


def test_models_in_parallel_threads_equal_one_after_the_other(model_and_baseline):
    """Two passes on one shared model at once: the ablation hook of one thread never reaches the other."""
    loaded, baseline = model_and_baseline
    weights = np.random.default_rng(2).normal(size=baseline.hidden_size)
    jobs = {"ablated": (loaded, baseline, MaskSettings(0, random_fraction=0.8, patch_fraction=0.2), weights),
            "greyed only": (loaded, baseline, MaskSettings(0, patch_fraction=0.2), weights)}
    parallel = run_masked_in_parallel(jobs)
    for label, job in jobs.items():
        alone = run_masked(*job)
        assert parallel[label].answers == alone.answers
        np.testing.assert_allclose(parallel[label].confidence, alone.confidence, atol=1e-6)
    assert not np.allclose(parallel["ablated"].confidence, parallel["greyed only"].confidence)


def test_first_token_logits_equal_generate_bit_for_bit(model_and_baseline):
    """The masked passes' prefill (LLaVA: the greedy loop, without `generate`'s setup) gives `generate`'s
    first-token logits and tokens exactly, on a left-padded batch."""
    loaded, baseline = model_and_baseline
    questions = [s.question for s in baseline.samples[:3]]
    questions[1] = "is there a triangle in the image?"  # one word shorter: the batch is left-padded
    inputs = prepare_batch(loaded, baseline.images[:3], questions)
    assert (inputs["attention_mask"] == 0).any()
    assert loaded.plain_greedy == (loaded.adapter.family == "llava")
    with torch.inference_mode():
        reference = loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True, pad_token_id=loaded.tokenizer.pad_token_id)
    logits, tokens = first_token_logits(loaded, inputs)
    assert torch.equal(logits, reference.logits[0].float())
    np.testing.assert_array_equal(tokens, reference.sequences[:, -1].numpy())


def test_greying_is_checked_once_per_processed_size(model_and_baseline, monkeypatch):
    """The grey fill and the pixel-locality check are processor calls: made for the first batch of a size only,
    and the greyed tensors stay those of greying the images then processing them."""
    loaded, baseline = model_and_baseline
    live_fast._GREYING.pop(loaded.model, None)
    calls = []
    processed = live_fast._processed_pixels
    monkeypatch.setattr(live_fast, "_processed_pixels", lambda *a: calls.append(1) or processed(*a))
    for kept_index, rows in ((1, slice(10, 20)), (2, slice(20, 24)), (1, slice(10, 20))):
        kept = KeptBatch(baseline.kept[kept_index].inputs)
        images = baseline.images[rows]
        masks = patch_masks(len(images), None, baseline.grids[rows], 0.4, "random", seed=kept_index)
        greyed = grey_pixel_values(loaded, kept, images, masks)
        expected = prepare_batch(loaded, [grey_cells(i, m) for i, m in zip(images, masks)], ["x"] * len(images))
        assert torch.equal(greyed, expected["pixel_values"])
    assert len(calls) == 2  # the fill and the check, for the first batch only
