import pytest
import torch

from vlmrel_core.engine.adapters import AdapterError, adapter_for_model_type, supported_model_types
from vlmrel_core.engine.adapters.base import normalize_answer, resolve_attribute_path
from vlmrel_core.data.shapes import make_scene, render_scene


def test_unknown_model_type_lists_supported():
    with pytest.raises(AdapterError) as err:
        adapter_for_model_type("blip_2")
    for name in ("llava", "paligemma"):
        assert name in str(err.value)
    assert {"llava", "paligemma"} <= set(supported_model_types())


def test_attribute_path_error_names_every_candidate():
    with pytest.raises(AdapterError, match="tried: a.b, c"):
        resolve_attribute_path(torch.nn.Linear(2, 2), ["a.b", "c"], "decoder layers")


@pytest.mark.parametrize(
    "text, lenient, strict",
    [
        ("Yes", "yes", "yes"),
        ("yes, there is a red circle.", "yes", "yes there is a red circle"),
        ("No.", "no", "no"),
        ("There is no cat", "no", "there is no cat"),
        ("There is a cat", "yes", "there is a cat"),
        ("Red", "red", "red"),
        ("2", "two", "2"),
        ("", "", ""),
    ],
)
def test_answer_normalisation(text, lenient, strict):
    assert normalize_answer(text, "lenient") == lenient
    assert normalize_answer(text, "strict") == strict


@pytest.mark.parametrize("family, adapter_family, fusion", [("late_fusion", "llava", "late"), ("early_fusion", "paligemma", "early")])
def test_demo_families_resolve_layers_tokens_and_answers(tiny_loaded, family, adapter_family, fusion):
    loaded = tiny_loaded[family]
    assert loaded.adapter.family == adapter_family and loaded.adapter.fusion == fusion
    assert loaded.n_layers == loaded.model.config.get_text_config().num_hidden_layers == 4
    tokens = loaded.adapter.answer_tokens(loaded.tokenizer)
    assert loaded.tokenizer.convert_ids_to_tokens(list(tokens.yes_ids)) == ["yes"]
    assert loaded.tokenizer.convert_ids_to_tokens(list(tokens.no_ids)) == ["no"]
    inputs = loaded.adapter.prepare_inputs(loaded.processor, [render_scene(make_scene(0))] * 2, ["is there a red circle in the image?", "what objects are in the image?"])
    image_id = loaded.adapter.image_token_id(loaded.model)
    assert ((inputs["input_ids"] == image_id).sum(dim=1) == 64).all()
    assert "labels" not in inputs
    assert (inputs["attention_mask"][:, -1] == 1).all(), "batches must be left-padded"
    if family == "early_fusion":
        assert "token_type_ids" in inputs


def test_pitfall_chat_template_last_prompt_position_llava(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    prompt = loaded.adapter.format_prompt(loaded.processor, "is there a red circle in the image?")
    assert prompt == "USER: <image>\nis there a red circle in the image? ASSISTANT:"
    ids = loaded.adapter.prepare_inputs(loaded.processor, [render_scene(make_scene(0))], ["is there a red circle in the image?"])["input_ids"][0]
    assert loaded.tokenizer.convert_ids_to_tokens(ids[-3:].tolist()) == ["?", "assistant", ":"]


def test_pitfall_paligemma_prefix_is_bidirectional_only_with_token_type_ids(tiny_loaded):
    """With token_type_ids the first image token sees the question; without them attention is causal."""
    loaded = tiny_loaded["early_fusion"]
    image = render_scene(make_scene(1))
    layers = loaded.adapter.decoder_layers(loaded.model)

    def first_token_state(question: str, keep_types: bool) -> torch.Tensor:
        inputs = loaded.adapter.prepare_inputs(loaded.processor, [image], [question])
        if not keep_types:
            inputs.pop("token_type_ids")
        grabbed = {}

        def hook(module, args, output):
            grabbed["h"] = (output[0] if isinstance(output, tuple) else output)[0, 0].clone()

        handle = layers[0].register_forward_hook(hook)
        try:
            with torch.no_grad():
                loaded.model(**inputs)
        finally:
            handle.remove()
        return grabbed["h"]

    q1, q2 = "is there a red circle in the image?", "is there a blue square in the image?"
    assert not torch.allclose(first_token_state(q1, True), first_token_state(q2, True))
    assert torch.allclose(first_token_state(q1, False), first_token_state(q2, False))
