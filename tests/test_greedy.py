"""`engine.greedy`: greedy decoding without `generate`'s setup must give `generate`'s tokens and logits, and must
step aside for any model or generation config where it could not."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.greedy import greedy_generate, plain_greedy_supported

QUESTIONS = ["is there a red circle in the image?", "what objects are in the image?", "is there a blue square?"]


def _generate(loaded, inputs, max_new_tokens, cache=None):
    from vlmrel_core.engine.greedy import cache_kwarg

    extra = {cache_kwarg(): cache} if cache is not None else {}
    return loaded.model.generate(**inputs, **extra, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=loaded.tokenizer.pad_token_id)


@pytest.mark.parametrize("max_new_tokens", [1, 6])
def test_greedy_equals_generate_on_a_left_padded_batch(tiny_loaded, max_new_tokens):
    loaded = tiny_loaded["late_fusion"]
    assert loaded.plain_greedy
    images = [render_scene(make_scene(i)) for i in range(len(QUESTIONS))]
    inputs = loaded.adapter.prepare_inputs(loaded.processor, images, QUESTIONS)
    assert int(inputs["attention_mask"].sum(dim=1).min()) < inputs["attention_mask"].shape[1]  # padding exercised
    with torch.inference_mode():
        expected = _generate(loaded, inputs, max_new_tokens)
        got = greedy_generate(loaded.model, inputs, max_new_tokens, loaded.tokenizer.pad_token_id)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.logits) == len(expected.logits)
    for ours, theirs in zip(got.logits, expected.logits):
        torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    assert got.cache.get_seq_length() == expected.cache.get_seq_length()


def test_greedy_continues_from_a_cache_holding_part_of_the_prompt(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    inputs = loaded.adapter.prepare_inputs(loaded.processor, [render_scene(make_scene(3))], QUESTIONS[:1])
    with torch.inference_mode():
        prefix = _generate(loaded, {k: v[:, :-4] if v.ndim == 2 else v for k, v in inputs.items()}, 1).cache
        assert prefix.get_seq_length() == inputs["input_ids"].shape[1] - 4  # the prompt minus its last 4 tokens
        text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
        expected = _generate(loaded, text_only, 5, cache=copy.deepcopy(prefix))
        got = greedy_generate(loaded.model, text_only, 5, loaded.tokenizer.pad_token_id, cache=prefix)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits).float(), atol=1e-5, rtol=1e-5)


def test_greedy_steps_aside_where_it_could_differ(tiny_loaded):
    late, early = tiny_loaded["late_fusion"], tiny_loaded["early_fusion"]
    assert not plain_greedy_supported(early.model, early.adapter)  # PaliGemma's prefix-LM steps: generate
    model = copy.copy(late.model)
    model.generation_config = copy.deepcopy(late.model.generation_config)
    assert plain_greedy_supported(model, late.adapter)
    model.generation_config.repetition_penalty = 1.3  # a logits processor greedy search would apply
    assert not plain_greedy_supported(model, late.adapter)
    model.generation_config = copy.deepcopy(late.model.generation_config)
    model.generation_config.suppress_tokens = [5]
    assert not plain_greedy_supported(model, late.adapter)
