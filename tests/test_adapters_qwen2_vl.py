"""Qwen2-VL / Qwen2.5-VL adapter on tiny random-weight models of the real classes, saved and loaded like a checkpoint.

The tiny tokenizer is word-level (deterministic ids, no network) with Qwen's special tokens; the chat template is
Qwen2-VL's own. Images of different sizes give different `image_grid_thw`, so the per-sample image-token counts
differ inside one batch (the case a fixed count or a square grid gets wrong).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import greedy_generation, save_checkpoint, word_level_tokenizer
from vlmrel_core.engine.adapters import AdapterError, adapter_for_model_type, supported_model_types
from vlmrel_core.engine.adapters.qwen2_vl import QWEN2_VL_FALLBACK_PROMPT, Qwen2VLAdapter, image_only_processor_class
from vlmrel_core.engine.capture import POOLINGS
from vlmrel_core.engine.loading import load_vlm
from vlmrel_core.engine.run import run_batch

HIDDEN = 32
N_LAYERS = 2
PATCH = 4
MERGE = 2
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
]

# Qwen2-VL-Instruct's chat template (chat_template.json of the released checkpoints).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# 32x32 -> 8x8 patches -> 4x4 tokens; 48x24 (w x h) is resized to 40x16 (max_pixels) -> 4x10 patches -> 2x5 tokens
IMAGE_SIZES = [(32, 32), (48, 24)]  # PIL (width, height)
QUESTIONS = ["is there a red circle in the image?", "how many blue squares are there?"]


def build_qwen_tokenizer():
    return word_level_tokenizer(["system", "you", "helpful"] + QWEN_SPECIAL, special=QWEN_SPECIAL[1:],
                                eos="<|im_end|>", pad="<|endoftext|>")


def build_tiny_qwen(model_type: str, seed: int = 0):
    """Tiny random Qwen2-VL / Qwen2.5-VL model of the real class + an image-only processor of the real class."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = build_qwen_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=32 * 32
    )
    parent = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[model_type]
    processor = image_only_processor_class(parent)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    text_config = dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},  # head_dim 8
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(depth=2, hidden_size=HIDDEN, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
                         temporal_patch_size=2, in_channels=3)
    if model_type == "qwen2_vl":
        vision_config.update(embed_dim=HIDDEN, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision_config.update(intermediate_size=2 * HIDDEN, out_hidden_size=HIDDEN, window_size=16,
                             fullatt_block_indexes=[1])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    config = config_cls(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    greedy_generation(model, tokenizer)
    return model, processor


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen_dir(request, tmp_path_factory) -> Path:
    model, processor = build_tiny_qwen(request.param)
    return save_checkpoint(model, processor, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def loaded(qwen_dir):
    return load_vlm(qwen_dir)


def _images():
    return [Image.new("RGB", size, colour) for size, colour in zip(IMAGE_SIZES, ["red", "blue"])]


def test_saved_folder_is_an_ordinary_checkpoint_of_the_family_processor(qwen_dir):
    processor_config = json.loads((qwen_dir / "processor_config.json").read_text())
    tokenizer_config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    assert processor_config["processor_class"] in {"Qwen2VLProcessor", "Qwen2_5_VLProcessor"}
    assert tokenizer_config["processor_class"] == processor_config["processor_class"]


def test_adapter_chosen_by_model_type_and_layers_resolved(loaded):
    assert isinstance(loaded.adapter, Qwen2VLAdapter)
    assert loaded.model.config.model_type in Qwen2VLAdapter.model_types
    assert loaded.adapter.fusion == "early"
    layers = loaded.adapter.decoder_layers(loaded.model)
    assert layers is loaded.model.model.language_model.layers  # transformers 5.x module tree
    assert len(layers) == N_LAYERS == loaded.n_layers
    assert loaded.adapter.final_norm(loaded.model) is loaded.model.model.language_model.norm
    assert loaded.adapter.image_token_id(loaded.model) == loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_load_processor_processes_images_without_torchvision(loaded, qwen_dir):
    processor = loaded.processor
    assert processor.image_processor is not None and not hasattr(processor, "video_processor")
    out = processor(images=_images()[:1], text=[loaded.adapter.format_prompt(processor, "is there a circle?")],
                    return_tensors="pt")
    assert "pixel_values" in out and "image_grid_thw" in out and "mm_token_type_ids" in out
    assert processor.chat_template == QWEN2_VL_CHAT_TEMPLATE


def test_load_processor_when_auto_processor_returns_only_the_tokenizer(qwen_dir, monkeypatch):
    """The known trap: AutoProcessor silently falling back to a bare tokenizer must not reach the pipeline."""
    import transformers

    tokenizer_only = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: tokenizer_only))
    processor = Qwen2VLAdapter().load_processor(str(qwen_dir))
    assert processor.image_processor is not None
    assert "pixel_values" in processor.image_processor(images=_images()[:1], return_tensors="pt")


def test_load_processor_from_a_hub_style_folder(qwen_dir, tmp_path):
    """Released checkpoints keep the image processor in preprocessor_config.json, the template in
    chat_template.json, and ship video_preprocessor_config.json (whose class needs torchvision)."""
    hub = tmp_path / "hub_layout"
    hub.mkdir()
    for item in qwen_dir.iterdir():
        if item.name not in {"processor_config.json", "chat_template.jinja"}:
            (hub / item.name).symlink_to(item)
    processor_config = json.loads((qwen_dir / "processor_config.json").read_text())
    image_config = {**processor_config["image_processor"], "processor_class": processor_config["processor_class"]}
    (hub / "preprocessor_config.json").write_text(json.dumps(image_config))
    video_config = {k: v for k, v in image_config.items() if k != "image_processor_type"}
    video_config["video_processor_type"] = "Qwen2VLVideoProcessor"
    (hub / "video_preprocessor_config.json").write_text(json.dumps(video_config))
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    processor = Qwen2VLAdapter().load_processor(str(hub))
    assert processor.image_processor.patch_size == PATCH and processor.image_processor.merge_size == MERGE
    assert processor.chat_template == QWEN2_VL_CHAT_TEMPLATE
    assert "image_grid_thw" in processor.image_processor(images=_images()[:1], return_tensors="pt")


def test_load_processor_raises_when_no_image_processor_can_be_built(qwen_dir, tmp_path):
    broken = tmp_path / "no_image_processor"
    broken.mkdir()
    for item in qwen_dir.iterdir():
        if item.name != "processor_config.json":  # the only place the image processor config lives
            (broken / item.name).symlink_to(item)
    with pytest.raises(AdapterError, match="processor"):
        Qwen2VLAdapter().load_processor(str(broken))


def test_pitfall_image_token_count_follows_image_grid_thw_never_a_fixed_count(loaded):
    adapter, processor = loaded.adapter, loaded.processor
    inputs = adapter.prepare_inputs(processor, _images(), QUESTIONS)
    grid_thw = inputs["image_grid_thw"]
    assert grid_thw.shape == (2, 3)
    expected = (grid_thw.prod(dim=-1) // MERGE**2).tolist()
    assert expected[0] != expected[1]  # different sizes really give different counts
    image_mask = inputs["input_ids"] == loaded.model.config.image_token_id
    assert image_mask.sum(dim=1).tolist() == expected
    # one contiguous span per sample, right after <|vision_start|>
    vision_start = loaded.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    for row, mask in zip(inputs["input_ids"], image_mask):
        positions = mask.nonzero().flatten()
        assert (positions.diff() == 1).all()
        assert row[positions[0] - 1] == vision_start
    grids = [adapter.image_grid(loaded.model, inputs, i, n) for i, n in enumerate(expected)]
    assert grids == [(int(t[1]) // MERGE, int(t[2]) // MERGE) for t in grid_thw]
    with pytest.raises(AdapterError, match="image_grid_thw"):
        adapter.image_grid(loaded.model, inputs, 0, expected[0] + 1)


def test_pitfall_chat_template_last_prompt_position_is_the_assistant_header_newline(loaded):
    inputs = loaded.adapter.prepare_inputs(loaded.processor, _images(), QUESTIONS)
    tokens = [loaded.tokenizer.convert_ids_to_tokens(row.tolist()) for row in inputs["input_ids"]]
    for row, mask in zip(tokens, inputs["attention_mask"]):
        assert mask[-1] == 1  # left padding: the last column is real for every sample
        assert row[-3:] == ["<|im_start|>", "assistant", "\n"]


def test_fallback_prompt_without_chat_template(loaded):
    processor = loaded.processor
    saved = processor.chat_template
    try:
        processor.chat_template = None
        prompt = loaded.adapter.format_prompt(processor, "is there a red circle?")
    finally:
        processor.chat_template = saved
    assert prompt == QWEN2_VL_FALLBACK_PROMPT.format(question="is there a red circle?")
    out = processor(images=_images()[1:], text=[prompt], return_tensors="pt")
    n_image = int((out["input_ids"] == loaded.model.config.image_token_id).sum())
    assert n_image == int(out["image_grid_thw"][0].prod()) // MERGE**2


def test_run_batch_states_attentions_and_grids(loaded):
    record = run_batch(loaded, _images(), QUESTIONS, attentions=True, max_new_tokens=2)
    assert set(record.states) == set(POOLINGS)
    for pooling, states in record.states.items():
        assert states.shape == (2, N_LAYERS, HIDDEN), pooling
        assert np.isfinite(states).all(), pooling
    counts = record.image_token_counts
    assert counts[0] != counts[1]
    assert [a.shape for a in record.attentions] == [(N_LAYERS, n) for n in counts]
    assert [r * c for r, c in record.image_grids] == counts
    assert record.image_grids == [(4, 4), (2, 5)]  # a wide image gives fewer rows than columns
    assert record.lens_logodds.shape == (2, N_LAYERS)


def test_pitfall_batched_equals_single_with_left_padding(loaded):
    batched = run_batch(loaded, _images(), QUESTIONS, max_new_tokens=2, logit_lens=False)
    for i, (image, question) in enumerate(zip(_images(), QUESTIONS)):
        single = run_batch(loaded, [image], [question], max_new_tokens=2, logit_lens=False)
        for pooling in POOLINGS:
            np.testing.assert_allclose(batched.states[pooling][i], single.states[pooling][0], atol=1e-4, rtol=1e-4,
                                       err_msg=pooling)
        assert batched.answer_text[i] == single.answer_text[0]
        assert batched.image_grids[i] == single.image_grids[0]


def test_unknown_model_type_lists_supported_ones():
    with pytest.raises(AdapterError) as excinfo:
        adapter_for_model_type("not_a_vlm")
    message = str(excinfo.value)
    assert "not_a_vlm" in message
    for model_type in ("llava", "paligemma", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"):
        assert model_type in supported_model_types()
        assert model_type in message


def test_pitfall_mrope_states_equal_a_plain_forward_after_another_call(loaded):
    """M-RoPE: calling the model as generate does (no hand-built position ids) and a stale rope_deltas from an
    earlier call of another shape must not change the states: run_batch after a different batch equals a fresh
    plain forward's output_hidden_states (layers before the last, which carries the final norm)."""
    from vlmrel_core.engine.capture import TokenLayout

    run_batch(loaded, [Image.new("RGB", (24, 40), "green")], ["is there a cat?"], max_new_tokens=2, logit_lens=False)
    record = run_batch(loaded, _images(), QUESTIONS, max_new_tokens=2, logit_lens=False, poolings=("last_token",))
    inputs = loaded.adapter.prepare_inputs(loaded.processor, _images(), QUESTIONS)
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs["attention_mask"], loaded.adapter.image_token_id(loaded.model))
    with torch.no_grad():
        hidden = loaded.model(**inputs, output_hidden_states=True).hidden_states
    rows = torch.arange(len(QUESTIONS))
    for layer in range(N_LAYERS - 1):
        np.testing.assert_allclose(record.states["last_token"][:, layer], hidden[layer + 1][rows, layout.last_index].float().numpy(),
                                   atol=1e-5, rtol=1e-4)
