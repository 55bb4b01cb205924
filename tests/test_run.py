import numpy as np
import pytest

from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.run import run_batch

QUESTIONS = ["is there a red circle in the image?", "what objects are in the image?", "how many squares are there?", "is there an orange cross in the image?"]


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_pitfall_batched_equals_single_with_left_padding(tiny_loaded, family):
    loaded = tiny_loaded[family]
    images = [render_scene(make_scene(i)) for i in range(4)]
    batched = run_batch(loaded, images, QUESTIONS, attentions=True)
    for i in range(4):
        single = run_batch(loaded, images[i : i + 1], QUESTIONS[i : i + 1], attentions=True)
        assert single.answer_text[0] == batched.answer_text[i]
        for pooling in batched.states:
            np.testing.assert_allclose(single.states[pooling][0], batched.states[pooling][i], atol=1e-4)
        np.testing.assert_allclose(single.output["p_yes"][0], batched.output["p_yes"][i], atol=1e-5)
        np.testing.assert_allclose(single.attentions[0], batched.attentions[i], atol=1e-5)


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_pitfall_final_norm_applied_once_logit_lens_last_layer_reproduces_the_answer_logits(tiny_loaded, family):
    """The lens applies the final norm to every captured (pre-norm) layer, so its last layer equals the output."""
    loaded = tiny_loaded[family]
    record = run_batch(loaded, [render_scene(make_scene(i)) for i in range(3)], QUESTIONS[:3])
    assert record.lens_logodds.shape == (3, loaded.n_layers)
    np.testing.assert_allclose(record.lens_logodds[:, -1], record.output["yes_no_log_odds"], atol=1e-4)
    assert not np.allclose(record.lens_logodds[:, 0], record.lens_logodds[:, -1])


def test_output_signals_are_consistent(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    record = run_batch(loaded, [render_scene(make_scene(i)) for i in range(3)], QUESTIONS[:3])
    out = record.output
    np.testing.assert_allclose(out["max_answer_prob"], np.maximum(out["p_yes"], out["p_no"]) / (out["p_yes"] + out["p_no"]), rtol=1e-5)
    assert ((out["top1_prob"] >= out["p_yes"] - 1e-7) & (out["top1_prob"] >= out["p_no"] - 1e-7)).all()
    assert (out["mean_token_logprob"] <= 0).all()
    assert record.image_grids == [(8, 8)] * 3


def test_bad_inputs_are_clear_errors(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    with pytest.raises(ValueError, match="2 images for 1 questions"):
        run_batch(loaded, [render_scene(make_scene(0))] * 2, ["q?"])
    with pytest.raises(TypeError, match="expected a PIL image"):
        run_batch(loaded, [np.zeros((4, 4))], ["q?"])
    with pytest.raises(ValueError, match="empty batch"):
        run_batch(loaded, [], [])


def test_prebuilt_inputs_give_the_same_record(tiny_loaded):
    """``inputs`` built by `live_fast.prepare_batch` (the same processor call) skip processing, same results."""
    from vlmrel_core.interventions.live_fast import prepare_batch

    loaded = tiny_loaded["late_fusion"]
    images = [render_scene(make_scene(i)) for i in range(3)]
    inputs = prepare_batch(loaded, images, QUESTIONS[:3])
    built, given = run_batch(loaded, images, QUESTIONS[:3]), run_batch(loaded, images, QUESTIONS[:3], inputs=inputs)
    assert given.answer_text == built.answer_text
    np.testing.assert_array_equal(given.states["last_token"], built.states["last_token"])
    with pytest.raises(ValueError, match="inputs for 3 rows, 2 questions"):
        run_batch(loaded, images[:2], QUESTIONS[:2], inputs=inputs)
