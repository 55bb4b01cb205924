"""Batched extraction must give what one question at a time gives, for every supported family.

Why: batching is where the throughput comes from (left padding, different image-token counts per sample, M-RoPE
deltas, image tiles), and a batched answer or state that differs from the single-question one would silently
change every probe trained on a batched run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_checkpoint
from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.capture import POOLINGS
from vlmrel_core.engine.loading import load_vlm
from vlmrel_core.engine.run import run_batch

QUESTIONS = [
    "is there a red circle in the image?",
    "how many blue squares are there?",
    "what objects are in the image?",
    "is there an orange cross?",
]
OUTPUTS = ("p_yes", "p_no", "yes_no_log_odds", "top1_top2_margin", "token_entropy", "mean_token_logprob")


def _images(family: str) -> list[Image.Image]:
    if family in ("llava", "paligemma"):
        return [render_scene(make_scene(i)) for i in range(len(QUESTIONS))]
    # dynamic-resolution families: different sizes give different image-token counts (and tiles) per sample
    sizes = [(32, 32), (48, 24), (24, 48), (32, 32)] if family == "qwen2_vl" else [(32, 32), (80, 40), (40, 80), (32, 32)]
    return [Image.new("RGB", size, colour) for size, colour in zip(sizes, ["red", "blue", "green", "white"])]


@pytest.fixture(scope="module", params=["llava", "paligemma", "qwen2_vl", "idefics3"])
def family_loaded(request, tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    family = request.param
    if family == "llava":
        return family, load_vlm(tiny_model_dirs["late_fusion"])
    if family == "paligemma":
        return family, load_vlm(tiny_model_dirs["early_fusion"])
    if family == "qwen2_vl":
        from test_adapters_qwen2_vl import build_tiny_qwen

        model, processor = build_tiny_qwen("qwen2_vl")
    else:
        from test_adapters_idefics3 import build_tiny_idefics3

        model, processor = build_tiny_idefics3("idefics3")
    return family, load_vlm(save_checkpoint(model, processor, tmp_path_factory.mktemp(family)))


def test_batched_run_equals_single_questions(family_loaded):
    family, loaded = family_loaded
    images = _images(family)
    batched = run_batch(loaded, images, QUESTIONS, attentions=True, max_new_tokens=4)
    if family == "qwen2_vl":
        assert len(set(batched.image_token_counts)) > 1  # per-sample image-token counts: padding beyond the question
    for i, (image, question) in enumerate(zip(images, QUESTIONS)):
        single = run_batch(loaded, [image], [question], attentions=True, max_new_tokens=4)
        assert batched.answer_text[i] == single.answer_text[0], (family, i)
        assert batched.answer[i] == single.answer[0]
        assert batched.image_token_counts[i] == single.image_token_counts[0]
        for pooling in POOLINGS:
            np.testing.assert_allclose(batched.states[pooling][i], single.states[pooling][0], atol=2e-4, rtol=1e-4,
                                       err_msg=f"{family} {pooling} sample {i}")
        for name in OUTPUTS:
            np.testing.assert_allclose(batched.output[name][i], single.output[name][0], atol=2e-4, rtol=1e-4,
                                       err_msg=f"{family} {name} sample {i}")
        np.testing.assert_allclose(batched.lens_logodds[i], single.lens_logodds[0], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(batched.attentions[i], single.attentions[0], atol=1e-5)


def _assert_same_record(got, ref, i: int, j: int, context: str) -> None:
    assert got.answer_text[i] == ref.answer_text[j], context
    assert got.image_token_counts[i] == ref.image_token_counts[j], context
    for pooling in POOLINGS:
        np.testing.assert_allclose(got.states[pooling][i], ref.states[pooling][j], atol=2e-4, rtol=1e-4,
                                   err_msg=f"{context} {pooling}")
    for name in OUTPUTS:
        np.testing.assert_allclose(got.output[name][i], ref.output[name][j], atol=2e-4, rtol=1e-4, err_msg=f"{context} {name}")
    np.testing.assert_allclose(got.lens_logodds[i], ref.lens_logodds[j], atol=2e-4, rtol=1e-4, err_msg=context)
    np.testing.assert_allclose(got.attentions[i], ref.attentions[j], atol=1e-5, err_msg=context)


def test_shared_image_prefix_equals_full_passes(family_loaded):
    """Two images, two questions each (different lengths): with an image-prefix cache, in one batch and one question
    at a time, every row equals the pass without sharing; only LLaVA shares (the cache fills and is hit)."""
    from vlmrel_core.engine.prefix_sharing import ImagePrefixCache

    family, loaded = family_loaded
    images = _images(family)[:2]
    rows_images = [images[0], images[1], images[0], images[1]]
    reference = run_batch(loaded, rows_images, QUESTIONS, attentions=True, max_new_tokens=4)
    batched_cache = ImagePrefixCache()
    batched = run_batch(loaded, rows_images, QUESTIONS, attentions=True, max_new_tokens=4, prefix_cache=batched_cache)
    one_cache = ImagePrefixCache()
    singles = [run_batch(loaded, [image], [question], attentions=True, max_new_tokens=4, prefix_cache=one_cache)
               for image, question in zip(rows_images, QUESTIONS)]
    for i in range(len(QUESTIONS)):
        _assert_same_record(batched, reference, i, i, f"{family} batched row {i}")
        _assert_same_record(singles[i], reference, 0, i, f"{family} single row {i}")
    shares = loaded.adapter.shareable_image_prefix
    assert shares == (family == "llava")
    assert (batched_cache.hits, one_cache.hits) == ((2, 2) if shares else (0, 0))
    assert len(batched_cache) == len(one_cache) == (2 if shares else 0)
    if shares:  # the shared rows ran fewer prompt tokens: one call over new images, one over the kept prefixes
        assert batched.n_forward_calls > reference.n_forward_calls
