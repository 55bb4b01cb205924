"""Image-prefix sharing (`engine.prefix_sharing`): the kept-prefix cache, how extraction groups questions by image,
and that sharing never changes what a run records (beyond float tolerance) or mixes up two images."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.extract import extract
from vlmrel_core.engine.prefix_sharing import CachedPrefix, ImagePrefixCache, image_grouped_batches
from vlmrel_core.engine.run import run_batch
from vlmrel_core.engine.store import RunReader

TENSORS = ("states.last_token", "states.mean_all", "states.mean_image", "states.mean_text", "lens_logodds", "attention_image")


def _entry(n_values: int, layers=(0, 1)) -> CachedPrefix:
    kv = ((torch.zeros(1, 1, n_values, 1), torch.zeros(1, 1, n_values, 1)),)
    return CachedPrefix(kv, {layer: torch.zeros(3, 1) for layer in layers}, n_values)


def test_cache_is_lru_bounded_in_bytes_and_refuses_what_cannot_fit():
    one = _entry(10).nbytes
    cache = ImagePrefixCache(max_bytes=2 * one)
    assert cache.put(b"a", _entry(10)) and cache.put(b"b", _entry(10))
    assert cache.get(b"a", [0]) is not None  # "a" is now the most recently used
    cache.put(b"c", _entry(10))
    assert cache.get(b"b", [0]) is None and cache.get(b"a", [0]) is not None and cache.get(b"c", [0]) is not None
    assert cache.nbytes == 2 * one and len(cache) == 2
    assert not cache.put(b"big", _entry(100)) and cache.get(b"big", [0]) is None
    assert cache.get(b"a", [0, 1, 2]) is None  # no token sums for layer 2: the row must run in full
    with pytest.raises(ValueError):
        ImagePrefixCache(max_bytes=-1)


def test_image_grouped_batches_put_first_questions_first_and_cover_every_row_once():
    """Chunks of up to 2 images: their first questions, then their other questions; every row exactly once."""
    paths = ["a", "b", "a", "c", "b", "a", "d", "e"]
    samples = [SimpleNamespace(image_path=p) for p in paths]
    chunks = image_grouped_batches(samples, 2)
    assert chunks == [[[0, 1], [2, 5], [4]], [[3, 6]], [[7]]]
    batches = [b for chunk in chunks for b in chunk]
    assert sorted(i for b in batches for i in b) == list(range(len(paths)))
    assert all(len(b) <= 2 for b in batches)


def test_a_different_image_never_reuses_a_kept_prefix(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    first, second = render_scene(make_scene(1)), render_scene(make_scene(2))
    question = "is there a red circle in the image?"
    cache = ImagePrefixCache()
    run_batch(loaded, [first], [question], max_new_tokens=4, prefix_cache=cache)
    shared = run_batch(loaded, [second], [question], max_new_tokens=4, prefix_cache=cache)
    alone = run_batch(loaded, [second], [question], max_new_tokens=4)
    assert cache.hits == 0 and len(cache) == 2
    np.testing.assert_array_equal(shared.states["mean_image"], alone.states["mean_image"])


def test_a_cache_too_small_for_any_prefix_runs_every_row_in_full(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    image = render_scene(make_scene(4))
    questions = ["is there a red circle in the image?", "is there a blue square?"]
    cache = ImagePrefixCache(max_bytes=0)
    got = run_batch(loaded, [image, image], questions, max_new_tokens=4, prefix_cache=cache)
    reference = run_batch(loaded, [image, image], questions, max_new_tokens=4)
    assert cache.hits == 0 and len(cache) == 0
    assert got.answer_text == reference.answer_text
    np.testing.assert_allclose(got.states["mean_all"], reference.states["mean_all"], atol=1e-6)


def test_extraction_with_sharing_equals_extraction_without(tiny_loaded, tiny_dataset: Path, tmp_path: Path):
    """Same rows in the same (dataset) order, tensors to float16 storage tolerance; batch 3 splits image pairs."""
    loaded = tiny_loaded["late_fusion"]
    runs = {}
    for share in (True, False):
        out = tmp_path / f"share_{share}"
        extract(loaded, tiny_dataset, out, batch_size=3, shard_size=9, max_new_tokens=4, share_image_prefix=share)
        runs[share] = RunReader(out)
    shared, full = runs[True], runs[False]
    assert shared.rows["image"].duplicated().any()  # the split asks several questions per image
    pd.testing.assert_frame_equal(shared.rows, full.rows, check_exact=False, atol=1e-5)
    for name in TENSORS:
        np.testing.assert_allclose(shared.tensor(name), full.tensor(name), atol=2e-3, rtol=2e-3, err_msg=name)


def test_gray_zone_samples_from_a_shared_prefix_prefill(tiny_loaded):
    """A batch run in two calls (new images, then kept prefixes with padding between prefix and question) keeps
    each row's prompt cache: at T -> 0 every row's samples are its own greedy answer, and at batch 1 a kept-prefix
    prefill draws exactly the samples of a prefill of its own."""
    from vlmrel_core.engine.run import PrefillParts
    from vlmrel_core.engine.self_consistency import sample_answers
    from vlmrel_core.signals.consistency import SelfConsistencyConfig

    loaded = tiny_loaded["late_fusion"]
    first, second = render_scene(make_scene(8)), render_scene(make_scene(9))
    images = [first, second, first, second]
    questions = ["is there a red circle in the image?", "what objects are in the image?",
                 "is there a blue square on the left of the image?", "is there a green cross?"]
    cache = ImagePrefixCache()
    batch = run_batch(loaded, images, questions, layers=[0], poolings=["last_token"], logit_lens=False,
                      max_new_tokens=4, keep_prefill=True, prefix_cache=cache)
    assert isinstance(batch.prefill, PrefillParts) and cache.hits == 2
    cold = SelfConsistencyConfig(k=2, temperature=1e-4, top_p=1.0)
    for i in (3, 0, 2, 1):
        result = sample_answers(loaded, images[i], questions[i], cold, max_new_tokens=4, prefill=batch.prefill.row(i))
        assert result.samples_text == [batch.answer_text[i]] * 2, i
    config = SelfConsistencyConfig(k=6, seed=2)
    single = run_batch(loaded, [first], [questions[2]], layers=[0], poolings=["last_token"], logit_lens=False,
                       max_new_tokens=4, keep_prefill=True, prefix_cache=cache)
    assert cache.hits == 3
    reused = sample_answers(loaded, first, questions[2], config, max_new_tokens=4, prefill=single.prefill.row(0))
    own = sample_answers(loaded, first, questions[2], config, max_new_tokens=4)
    assert reused.samples_text == own.samples_text


def test_a_hooked_call_neither_uses_nor_keeps_prefixes(tiny_loaded):
    """Under an ablation hook the model is not the loaded one: a kept prefix would smuggle unablated states in (and
    a prefix kept under the hook would serve plain calls later), so `run_batch` runs such calls in full."""
    from vlmrel_core.interventions.ablation import DimensionAblation

    loaded = tiny_loaded["late_fusion"]
    image = render_scene(make_scene(11))
    questions = ["is there a red circle in the image?", "is there a blue square?"]
    cache = ImagePrefixCache()
    run_batch(loaded, [image], questions[:1], max_new_tokens=4, prefix_cache=cache)
    assert len(cache) == 1
    everything = DimensionAblation(layer=0, dims=tuple(range(loaded.hidden_size)))
    with everything(loaded):
        hooked = run_batch(loaded, [image, image], questions, max_new_tokens=4, prefix_cache=cache)
        alone = run_batch(loaded, [image, image], questions, max_new_tokens=4)
    assert cache.hits == 0 and len(cache) == 1
    assert hooked.answer_text == alone.answer_text
    np.testing.assert_array_equal(hooked.states["mean_all"], alone.states["mean_all"])
