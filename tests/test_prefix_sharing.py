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
    paths = ["a", "b", "a", "c", "b", "a", "d", "e"]
    samples = [SimpleNamespace(image_path=p) for p in paths]
    batches = image_grouped_batches(samples, 2)
    assert batches == [[0, 1], [2, 5], [4], [3, 6], [7]]
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
