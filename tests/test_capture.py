import threading

import numpy as np
import pytest
import torch

from vlmrel_core.engine.adapters import AdapterError
from vlmrel_core.engine.capture import POOLINGS, TokenLayout, capture, resolve_layers
from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.run import run_batch

QUESTIONS = ["is there a red circle in the image?", "what objects are in the image?", "how many squares are there?"]


def _inputs(loaded, n=3):
    images = [render_scene(make_scene(i)) for i in range(n)]
    return loaded.adapter.prepare_inputs(loaded.processor, images, QUESTIONS[:n])


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_capture_equals_output_hidden_states_and_pools_correctly(tiny_loaded, family):
    loaded = tiny_loaded[family]
    inputs = _inputs(loaded)
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs["attention_mask"], loaded.adapter.image_token_id(loaded.model))
    with torch.no_grad(), capture(loaded.model, loaded.adapter, layout) as captured:
        out = loaded.model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states  # L+1 entries: 0 = embeddings, last = after the final norm
    n = loaded.n_layers
    assert len(hidden) == n + 1
    last = captured.states["last_token"]
    b = torch.arange(3)
    for layer in range(n - 1):
        torch.testing.assert_close(last[:, layer], hidden[layer + 1][b, layout.last_index].float())
    # our last layer is the decoder-layer output BEFORE the final norm; HF's last entry has the norm applied
    norm = loaded.adapter.final_norm(loaded.model)
    torch.testing.assert_close(norm(last[:, n - 1]), hidden[n][b, layout.last_index].float(), atol=1e-5, rtol=1e-4)
    mask = layout.image_mask[1]
    torch.testing.assert_close(captured.states["mean_image"][1, 0], hidden[1][1, mask].float().mean(0))
    text = layout.attention_mask[2] & ~layout.image_mask[2]
    torch.testing.assert_close(captured.states["mean_text"][2, 1], hidden[2][2, text].float().mean(0))
    real = layout.attention_mask[0]
    torch.testing.assert_close(captured.states["mean_all"][0, 2], hidden[3][0, real].float().mean(0))


def test_pitfall_right_padding_makes_the_last_token_a_pad_token():
    ids = torch.tensor([[0, 0, 5, 9, 9, 7], [3, 9, 9, 4, 4, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    layout = TokenLayout.from_inputs(ids, mask, image_token_id=9)
    assert layout.last_index.tolist() == [5, 5]
    assert layout.image_token_counts == [2, 2]
    right = TokenLayout.from_inputs(ids, torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]), image_token_id=9)
    assert right.last_index.tolist() == [3, 5]


def test_pitfall_generate_states_are_read_in_the_prefill_only(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    layers = loaded.adapter.decoder_layers(loaded.model)
    before = [len(layer._forward_hooks) for layer in layers], len(loaded.model._forward_pre_hooks)
    record = run_batch(loaded, [render_scene(make_scene(0))], [QUESTIONS[1]], max_new_tokens=4, attentions=True)
    after = [len(layer._forward_hooks) for layer in layers], len(loaded.model._forward_pre_hooks)
    assert before == after  # transformers may keep hooks of its own; ours are gone
    # one prefill + one call per further generated token; the capture kept the prefill only
    assert 1 <= record.n_forward_calls <= 4
    assert record.states["last_token"].shape == (1, 4, 128)


def test_layer_selection_and_errors(tiny_loaded):
    assert resolve_layers(4, [-1, 0]) == [3, 0]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers(4, [4])
    with pytest.raises(ValueError, match="duplicate"):
        resolve_layers(4, [1, -3])
    loaded = tiny_loaded["late_fusion"]
    record = run_batch(loaded, [render_scene(make_scene(0))], [QUESTIONS[0]], layers=[2], poolings=("mean_image",), logit_lens=False)
    assert record.layers == [2] and set(record.states) == {"mean_image"}


def test_pitfall_sdpa_returns_no_attention_weights_so_eager_is_required(tiny_model_dirs):
    from vlmrel_core.engine.loading import load_vlm

    sdpa = load_vlm(tiny_model_dirs["late_fusion"], attn_implementation="sdpa")
    with pytest.raises(AdapterError, match="eager"):
        run_batch(sdpa, [render_scene(make_scene(0))], [QUESTIONS[0]], attentions=True)


def test_captured_attention_matches_output_attentions(tiny_loaded):
    loaded = tiny_loaded["early_fusion"]
    inputs = _inputs(loaded, 2)
    record = run_batch(loaded, [render_scene(make_scene(i)) for i in range(2)], QUESTIONS[:2], attentions=True, max_new_tokens=1)
    with torch.no_grad():
        out = loaded.model(**inputs, output_attentions=True)
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs["attention_mask"], loaded.adapter.image_token_id(loaded.model))
    for b in range(2):
        for layer in range(loaded.n_layers):
            expected = out.attentions[layer][b, :, layout.last_index[b], :].mean(0)[layout.image_mask[b]]
            np.testing.assert_allclose(record.attentions[b][layer], expected.numpy(), atol=1e-6)
        assert record.attentions[b].shape == (4, 64)
        assert (record.attentions[b].sum(axis=1) <= 1 + 1e-5).all()


def test_eight_threads_on_one_shared_model_match_sequential(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    jobs = [([render_scene(make_scene(i))], [QUESTIONS[i % 3]]) for i in range(8)]
    sequential = [run_batch(loaded, imgs, qs, attentions=True) for imgs, qs in jobs]
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = run_batch(loaded, *jobs[i], attentions=True)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, expected in enumerate(sequential):
        got = results[i]
        assert got.answer_text == expected.answer_text
        assert got.n_forward_calls == expected.n_forward_calls
        for pooling, states in expected.states.items():
            np.testing.assert_allclose(got.states[pooling], states, atol=1e-5)
        np.testing.assert_allclose(got.attentions[0], expected.attentions[0], atol=1e-6)


def _generate_path_and_plain_forward(loaded, n=3, poolings=POOLINGS):
    """What run_batch captures during generate's prefill, and output_hidden_states of one plain forward."""
    images = [render_scene(make_scene(i)) for i in range(n)]
    record = run_batch(loaded, images, QUESTIONS[:n], poolings=poolings, max_new_tokens=3)
    inputs = loaded.adapter.prepare_inputs(loaded.processor, images, QUESTIONS[:n])
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs["attention_mask"], loaded.adapter.image_token_id(loaded.model))
    with torch.no_grad():
        hidden = loaded.model(**inputs, output_hidden_states=True).hidden_states
    return record, layout, hidden


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_pitfall_generate_prefill_states_equal_plain_forward_at_every_layer(tiny_loaded, family):
    """generate's prefill, as run_batch captures it, equals a plain forward's output_hidden_states at EVERY layer
    and for every pooling: index 0 of output_hidden_states is the embeddings (skipped), the last entry carries the
    final norm (compared after applying it to our pre-norm capture)."""
    loaded = tiny_loaded[family]
    record, layout, hidden = _generate_path_and_plain_forward(loaded)
    n = loaded.n_layers
    assert len(hidden) == n + 1 and record.layers == list(range(n))
    norm = loaded.adapter.final_norm(loaded.model)
    b = torch.arange(3)
    masks = {
        "mean_all": layout.attention_mask,
        "mean_image": layout.image_mask,
        "mean_text": layout.attention_mask & ~layout.image_mask,
    }
    for layer in range(n):
        reference = hidden[layer + 1].float()
        if layer == n - 1:  # HF's last entry is after the final norm; ours is the decoder layer's own output
            last = norm(torch.from_numpy(record.states["last_token"][:, layer]))
            torch.testing.assert_close(last, reference[b, layout.last_index], atol=1e-5, rtol=1e-4)
            continue
        torch.testing.assert_close(torch.from_numpy(record.states["last_token"][:, layer]), reference[b, layout.last_index],
                                   atol=1e-5, rtol=1e-4, msg=f"last_token layer {layer}")
        for pooling, mask in masks.items():
            expected = torch.stack([reference[i, mask[i]].mean(0) for i in range(3)])
            torch.testing.assert_close(torch.from_numpy(record.states[pooling][:, layer]), expected, atol=1e-5, rtol=1e-4,
                                       msg=f"{pooling} layer {layer}")


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_pitfall_hidden_states_index_0_is_the_embedding_output(tiny_loaded, family):
    """Our layer 0 is the first decoder layer's output = output_hidden_states[1], never [0] (the embeddings)."""
    loaded = tiny_loaded[family]
    record, layout, hidden = _generate_path_and_plain_forward(loaded, n=2, poolings=("last_token",))
    b = torch.arange(2)
    layer0 = torch.from_numpy(record.states["last_token"][:, 0])
    torch.testing.assert_close(layer0, hidden[1][b, layout.last_index].float(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(layer0, hidden[0][b, layout.last_index].float(), atol=1e-3)


def test_pitfall_chosen_layers_only_equal_the_same_layers_of_a_full_capture(tiny_loaded):
    """Hooks on chosen decoder layers give exactly those layers of the full capture (no shifted index)."""
    loaded = tiny_loaded["late_fusion"]
    images = [render_scene(make_scene(i)) for i in range(2)]
    full = run_batch(loaded, images, QUESTIONS[:2], max_new_tokens=1)
    chosen = run_batch(loaded, images, QUESTIONS[:2], layers=[-1, 1], max_new_tokens=1)
    assert chosen.layers == [3, 1]
    for pooling in full.states:
        np.testing.assert_allclose(chosen.states[pooling], full.states[pooling][:, [3, 1]], atol=1e-6)


def test_pitfall_off_by_one_last_token_position_on_a_known_prompt(tiny_loaded):
    """On prompts whose tokens we know (LLaVA's 'ASSISTANT:' ends every prompt), the 'last token' of each row of a
    left-padded batch with different lengths is that ':' and the second-last is 'assistant'."""
    loaded = tiny_loaded["late_fusion"]
    questions = ["is there a red circle in the image?", "how many squares are there?"]
    inputs = loaded.adapter.prepare_inputs(loaded.processor, [render_scene(make_scene(i)) for i in range(2)], questions)
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs["attention_mask"], loaded.adapter.image_token_id(loaded.model))
    assert int(inputs["attention_mask"][1].sum()) != int(inputs["attention_mask"][0].sum()), "lengths must differ"
    for row in range(2):
        ids = inputs["input_ids"][row]
        last = int(layout.last_index[row])
        assert loaded.tokenizer.convert_ids_to_tokens([int(ids[last]), int(ids[last - 1])]) == [":", "assistant"]


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_pitfall_image_token_spans_come_from_the_checkpoints_image_token_id(tiny_loaded, family):
    """Image positions are input_ids == config's image token id (ids differ between checkpoints), not a count."""
    loaded = tiny_loaded[family]
    config = loaded.model.config
    configured = getattr(config, "image_token_id", None)
    if configured is None:
        configured = config.image_token_index
    assert loaded.adapter.image_token_id(loaded.model) == configured
    inputs = _inputs(loaded, 2)
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs["attention_mask"], configured)
    assert torch.equal(layout.image_mask, inputs["input_ids"] == configured)
    assert layout.image_token_counts == [int(c) for c in (inputs["input_ids"] == configured).sum(1)]
    shifted = TokenLayout.from_inputs(inputs["input_ids"], inputs["attention_mask"], configured + 1)
    assert shifted.image_token_counts != layout.image_token_counts  # another id finds other positions
