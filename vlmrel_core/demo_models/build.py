"""Tiny VLMs of real transformers classes, built from config, with processors saved beside them.

Why real classes: the embedded default must be loaded by exactly the code path a real checkpoint uses
(`AutoModelForImageTextToText` + `AutoProcessor`), so every adapter, hook and cache is exercised for real.
"""

from __future__ import annotations

from typing import Literal

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from vlmrel_core.data.shapes import COLOURS, NUMBER_WORDS, SHAPE_PLURALS, SHAPES

DemoFamily = Literal["late_fusion", "early_fusion"]
IMAGE_SIZE = 64
PATCH_SIZE = 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
HIDDEN = 128
N_LAYERS = 4

# LLaVA-1.5's own chat template shape ("USER: <image>\n... ASSISTANT:"), so the adapter's chat path is real.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PROMPT_WORDS = (
    "user assistant answer en is there a an in the image what objects are colour color how many and of "
    "yes no describe which shape any picture this it do does see"
).split()
PUNCTUATION = ["?", ":", ",", ".", "!", "'"]


def demo_vocabulary() -> list[str]:
    """Every word the generator and the prompt templates can produce, in a fixed order."""
    words = list(PROMPT_WORDS) + list(COLOURS) + list(SHAPES) + list(SHAPE_PLURALS.values()) + list(NUMBER_WORDS)
    seen: dict[str, None] = {}
    for w in SPECIAL_TOKENS + ["\n"] + PUNCTUATION + words:
        seen.setdefault(w, None)
    return list(seen)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer built with `tokenizers` (no network, deterministic ids)."""
    vocab = {w: i for i, w in enumerate(demo_vocabulary())}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    # "\n" is kept as a real token: PaliGemma uses it to end the prefix, LLaVA's template after <image>.
    tokenizer.add_tokens(["\n"], special_tokens=False)
    return tokenizer


def _vision_sizes() -> dict[str, int]:
    """The vision tower both families share: 2 layers on 64x64 images in 8x8 patches (64 image tokens)."""
    return {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}


def _text_sizes(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> dict[str, int]:
    """The decoder sizes and special-token ids both families share."""
    return {"hidden_size": HIDDEN, "intermediate_size": 3 * HIDDEN, "num_hidden_layers": N_LAYERS,
            "num_attention_heads": 4, "vocab_size": vocab_size, "max_position_embeddings": 256,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def build_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Late fusion: CLIP-style tower -> MLP projector -> Llama decoder (image tokens are just a prefix)."""
    import torch

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_sizes(), projection_dim=HIDDEN),
        text_config=LlamaConfig(**_text_sizes(tokenizer, len(tokenizer)), num_key_value_heads=4),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=N_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    set_generation_defaults(model, tokenizer)
    return model, processor


def build_paligemma(seed: int = 0) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """Early fusion: SigLIP-style tower -> linear projector -> Gemma decoder; image + prefix attend bidirectionally."""
    import torch

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = N_IMAGE_TOKENS
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab_size = len(processor.tokenizer)  # the processor adds ~1,150 <loc>/<seg> tokens
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_vision_sizes(), vision_use_head=False),
        text_config=GemmaConfig(**_text_sizes(tokenizer, vocab_size), num_key_value_heads=1, head_dim=HIDDEN // 4),
        image_token_index=processor.image_token_id,
        vocab_size=vocab_size,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    set_generation_defaults(model, processor.tokenizer)
    return model, processor


def build_demo_model(family: DemoFamily, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    if family == "late_fusion":
        return build_llava(seed)
    if family == "early_fusion":
        return build_paligemma(seed)
    raise ValueError(f"unknown demo family {family!r}; expected 'late_fusion' or 'early_fusion'")


def set_generation_defaults(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.max_new_tokens = 8
    model.generation_config.do_sample = False
