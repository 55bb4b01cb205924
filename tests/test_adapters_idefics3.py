"""Idefics3 / SmolVLM adapter on tiny random-weight models of the real classes, saved and loaded like a checkpoint.

Two processor settings: one view per image (`do_image_splitting=False`: a square grid of `image_seq_len` tokens)
and the checkpoints' default tiling (rows x cols tiles + a global view: no single grid, but states still work).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import greedy_generation, save_checkpoint, word_level_tokenizer
from vlmrel_core.engine.adapters import AdapterError, adapter_for_model_type
from vlmrel_core.engine.adapters.base import ImageGridUnavailable
from vlmrel_core.engine.adapters.idefics3 import IDEFICS3_FALLBACK_PROMPT, Idefics3Adapter, smolvlm_image_only_processor_class
from vlmrel_core.engine.capture import POOLINGS
from vlmrel_core.engine.loading import load_vlm
from vlmrel_core.engine.run import run_batch

HIDDEN = 32
N_LAYERS = 2
TILE = 32  # vision image_size = max_image_size: one tile
PATCH = 4
SCALE = 2
TOKENS_PER_TILE = ((TILE // PATCH) // SCALE) ** 2  # 16 = 4x4
BOS = "<|begin_of_text|>"
SPECIAL = ["<pad>", BOS, "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<|im_start|>"] + [
    f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)
]

# HuggingFaceM4/Idefics3-8B-Llama3's chat template (it writes BOS itself; the Llama-3 tokenizer adds one too).
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

IMAGE_SIZES = [(32, 32), (80, 40)]  # PIL (width, height); tiled (longest edge 64): 2x2 and 1x2 tiles + a global view
QUESTIONS = ["is there a red circle in the image?", "how many blue squares are there?"]


def build_idefics3_tokenizer():
    return word_level_tokenizer(SPECIAL, special=SPECIAL[2:], eos="<end_of_utterance>", pad="<pad>", bos=BOS,
                                bos_on_every_text=True)


def build_tiny_idefics3(model_type: str, seed: int = 0):
    """Tiny random Idefics3 / SmolVLM model of the real class + its processor (image-only for SmolVLM)."""
    import transformers
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE as SMOLVLM_CHAT_TEMPLATE

    tokenizer = build_idefics3_tokenizer()
    image_kwargs = dict(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE}, do_image_splitting=False)
    if model_type == "idefics3":
        image_processor = transformers.Idefics3ImageProcessorPil(**image_kwargs)
        processor = transformers.Idefics3Processor(image_processor, tokenizer, image_seq_len=TOKENS_PER_TILE,
                                                   chat_template=IDEFICS3_CHAT_TEMPLATE)
        config_cls, model_cls = transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration
    else:
        image_processor = transformers.SmolVLMImageProcessorPil(**image_kwargs)
        processor = smolvlm_image_only_processor_class()(image_processor, tokenizer, image_seq_len=TOKENS_PER_TILE,
                                                         chat_template=SMOLVLM_CHAT_TEMPLATE)
        config_cls, model_cls = transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration
    config = config_cls(
        vision_config=dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="llama", hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_id=processor.image_token_id,
        scale_factor=SCALE,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    greedy_generation(model, tokenizer)
    return model, processor


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def model_dir(request, tmp_path_factory) -> Path:
    model, processor = build_tiny_idefics3(request.param)
    return save_checkpoint(model, processor, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_vlm(model_dir)


@pytest.fixture()
def tiled(loaded):
    """The same loaded model with the checkpoints' default image splitting switched on for one test."""
    image_processor = loaded.processor.image_processor
    image_processor.do_image_splitting = True
    yield loaded
    image_processor.do_image_splitting = False


def _images():
    return [Image.new("RGB", size, colour) for size, colour in zip(IMAGE_SIZES, ["red", "blue"])]


def test_adapter_chosen_by_model_type_and_layers_resolved(loaded, model_dir):
    assert isinstance(loaded.adapter, Idefics3Adapter)
    assert loaded.model.config.model_type == json.loads((model_dir / "config.json").read_text())["model_type"]
    assert isinstance(adapter_for_model_type(loaded.model.config.model_type), Idefics3Adapter)
    assert loaded.adapter.fusion == "late"
    layers = loaded.adapter.decoder_layers(loaded.model)
    assert layers is loaded.model.model.text_model.layers  # transformers 5.x module tree
    assert len(layers) == N_LAYERS == loaded.n_layers
    assert loaded.adapter.final_norm(loaded.model) is loaded.model.model.text_model.norm
    assert loaded.adapter.tokens_per_tile(loaded.model) == TOKENS_PER_TILE


def test_load_processor_processes_images(loaded, model_dir):
    processor = loaded.processor
    assert not hasattr(processor, "video_processor")  # SmolVLM: the image-only processor (no torchvision here)
    saved = json.loads((model_dir / "processor_config.json").read_text())["processor_class"]
    assert saved in {"Idefics3Processor", "SmolVLMProcessor"}
    prompt = loaded.adapter.format_prompt(processor, "is there a circle?")
    out = processor(images=_images()[:1], text=[prompt], return_tensors="pt")
    assert "pixel_values" in out and "pixel_attention_mask" in out


def test_pitfall_chat_template_prompt_has_one_bos_and_ends_with_the_assistant_header(loaded):
    inputs = loaded.adapter.prepare_inputs(loaded.processor, _images(), QUESTIONS)
    bos = loaded.tokenizer.bos_token_id
    for row, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        real = row[mask.bool()]
        assert int((real == bos).sum()) == 1 and real[0] == bos
        assert loaded.tokenizer.convert_ids_to_tokens(real[-2:].tolist()) == ["assistant", ":"]


def test_single_view_image_tokens_form_a_square_grid(loaded):
    adapter = loaded.adapter
    inputs = adapter.prepare_inputs(loaded.processor, _images(), QUESTIONS)
    counts = (inputs["input_ids"] == loaded.model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [TOKENS_PER_TILE] * 2
    side = int(TOKENS_PER_TILE**0.5)
    assert [adapter.image_grid(loaded.model, inputs, i, n) for i, n in enumerate(counts)] == [(side, side)] * 2


def test_tiled_image_tokens_raise_a_clear_grid_error(tiled):
    adapter = tiled.adapter
    inputs = adapter.prepare_inputs(tiled.processor, _images(), QUESTIONS)
    counts = (inputs["input_ids"] == tiled.model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [TOKENS_PER_TILE * 5, TOKENS_PER_TILE * 3]  # 2x2 tiles + global; 1x2 tiles + global
    with pytest.raises(ImageGridUnavailable, match="tile layout"):
        adapter.image_grid(tiled.model, inputs, 0, counts[0])
    # 4 tiles' worth would be a perfect square (64 = 8x8) and still no 8x8 grid
    with pytest.raises(ImageGridUnavailable):
        adapter.image_grid(tiled.model, inputs, 0, TOKENS_PER_TILE * 4)
    with pytest.raises(AdapterError, match="whole number"):
        adapter.image_grid(tiled.model, inputs, 0, TOKENS_PER_TILE + 1)


def test_run_batch_states_attentions_and_grids(loaded):
    record = run_batch(loaded, _images(), QUESTIONS, attentions=True, max_new_tokens=2)
    assert set(record.states) == set(POOLINGS)
    for pooling, states in record.states.items():
        assert states.shape == (2, N_LAYERS, HIDDEN), pooling
        assert np.isfinite(states).all(), pooling
    assert record.image_token_counts == [TOKENS_PER_TILE] * 2
    assert [a.shape for a in record.attentions] == [(N_LAYERS, TOKENS_PER_TILE)] * 2
    assert record.image_grids == [(4, 4)] * 2
    assert record.lens_logodds.shape == (2, N_LAYERS)


def test_run_batch_on_tiled_images_captures_states_without_a_grid(tiled):
    record = run_batch(tiled, _images(), QUESTIONS, attentions=True, max_new_tokens=2)
    assert record.image_token_counts == [TOKENS_PER_TILE * 5, TOKENS_PER_TILE * 3]
    assert record.image_grids == [None, None]
    for pooling, states in record.states.items():
        assert states.shape == (2, N_LAYERS, HIDDEN), pooling
    assert [a.shape for a in record.attentions] == [(N_LAYERS, n) for n in record.image_token_counts]


@pytest.mark.parametrize("splitting", [False, True], ids=["one_view", "tiled"])
def test_pitfall_batched_equals_single_with_left_padding(loaded, splitting):
    loaded.processor.image_processor.do_image_splitting = splitting
    try:
        batched = run_batch(loaded, _images(), QUESTIONS, max_new_tokens=2, logit_lens=False)
        for i, (image, question) in enumerate(zip(_images(), QUESTIONS)):
            single = run_batch(loaded, [image], [question], max_new_tokens=2, logit_lens=False)
            for pooling in POOLINGS:
                np.testing.assert_allclose(batched.states[pooling][i], single.states[pooling][0], atol=1e-4,
                                           rtol=1e-4, err_msg=pooling)
            assert batched.answer_text[i] == single.answer_text[0]
            assert batched.image_token_counts[i] == single.image_token_counts[0]
    finally:
        loaded.processor.image_processor.do_image_splitting = False


def test_fallback_prompt_without_chat_template(loaded):
    processor = loaded.processor
    saved = processor.chat_template
    try:
        processor.chat_template = None
        prompt = loaded.adapter.format_prompt(processor, "is there a red circle?")
    finally:
        processor.chat_template = saved
    assert prompt == IDEFICS3_FALLBACK_PROMPT.format(question="is there a red circle?")
    out = processor(images=_images()[:1], text=[prompt], return_tensors="pt")
    assert int((out["input_ids"] == loaded.model.config.image_token_id).sum()) == TOKENS_PER_TILE


def test_load_processor_raises_when_no_image_processor_can_be_built(model_dir, tmp_path):
    broken = tmp_path / "no_image_processor"
    broken.mkdir()
    for item in model_dir.iterdir():
        if item.name != "processor_config.json":  # the only place the image processor config lives
            (broken / item.name).symlink_to(item)
    with pytest.raises(AdapterError):
        Idefics3Adapter().load_processor(str(broken))
