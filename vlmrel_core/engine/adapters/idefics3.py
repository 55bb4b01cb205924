"""Idefics3 and SmolVLM (SmolVLM-Instruct is model_type "idefics3"; SmolVLM2 is "smolvlm"): SigLIP-style tower ->
connector (pixel shuffle by `scale_factor`, then a linear projection) -> Llama-style decoder under `text_model`.

Late fusion: image features replace `<image>` placeholder tokens in the text stream; the decoder is an ordinary
causal LM (no special positions or masks for image tokens).

Image tiles: with `do_image_splitting` (the checkpoints' default) an image becomes rows x cols tiles plus a
downscaled global view, each `image_seq_len` tokens, separated by `<fake_token_around_image>`/`<row_i_col_j>`
tokens. Those tokens do not form one 2-D grid, so `image_grid` answers only for a single view (the whole image as
one tile: `do_image_splitting=False`) and raises `ImageGridUnavailable` (an AdapterError) for tiled images: laying
their attention out as a map needs the tile layout (rows, cols from the image processor), which this adapter does
not reconstruct. A token count that is a perfect square is not enough (4 tiles of 8x8 = 256 = 16x16 is no 16x16
grid), so the check is "exactly one tile's worth of tokens". run_batch records grid None for tiled samples; hidden
states, output signals and the per-token attention vectors do not need a grid and work either way.

Processor trap (model_type "smolvlm"): SmolVLMProcessor needs a video processor (torchvision) and num2words,
even for images. Without them `load_processor` builds an image-only SmolVLMProcessor (same image-token expansion
code, no video processor). Idefics3Processor has no video part and loads through AutoProcessor as is.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import nn

from vlmrel_core.engine.adapters.base import AdapterError, ImageGridUnavailable, VLMAdapter
from vlmrel_core.engine.adapters.qwen2_vl import check_image_processor, subclass_saved_as_parent

# The common core of the Idefics3/SmolVLM chat templates (one user turn with the image first, then the assistant
# header). Used only when the processor has no chat template; checkpoints prepend their own start token.
IDEFICS3_FALLBACK_PROMPT = "User:<image>{question}<end_of_utterance>\nAssistant:"


@functools.cache
def smolvlm_image_only_processor_class() -> type:
    """SmolVLMProcessor without its video processor (and without the num2words check, used only for videos).

    The parts of a processor come from its `__init__` signature, so leaving `video_processor` out makes them
    image_processor + tokenizer; image-token expansion (`replace_image_token`), `rows`/`cols` handling and the
    chat template are the parent's own code. `apply_chat_template` skips the parent's override, which reads
    video-frame defaults from the (absent) video processor. Saved, it writes "SmolVLMProcessor".
    """
    from transformers import ProcessorMixin, SmolVLMProcessor

    def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None, **kwargs):
        # Same token set-up as SmolVLMProcessor.__init__ (transformers 5.x), minus the video processor.
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    namespace = {"__init__": __init__, "apply_chat_template": apply_chat_template, "__module__": __name__}
    doc = smolvlm_image_only_processor_class.__doc__
    return subclass_saved_as_parent(SmolVLMProcessor, "SmolVLMProcessorImageOnly", namespace, doc)


class Idefics3Adapter(VLMAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    fusion = "late"
    # transformers 5.x: Idefics3ForConditionalGeneration.model (Idefics3Model).text_model (e.g. LlamaModel).
    layer_paths = ("model.text_model.layers", "text_model.layers", "model.text_model.model.layers")
    final_norm_paths = ("model.text_model.norm", "text_model.norm", "model.text_model.model.norm")

    # --- model structure -------------------------------------------------------------------------
    def tokens_per_tile(self, model: nn.Module) -> int:
        """Image tokens per tile: (image_size / patch_size)**2 / scale_factor**2 (the processor's image_seq_len)."""
        config = model.config
        vision = getattr(config, "vision_config", None)
        try:
            patches_per_side = int(vision.image_size) // int(vision.patch_size)
            scale = int(config.scale_factor)
        except (AttributeError, TypeError) as err:
            raise AdapterError(f"{self.family}: config lacks vision_config.image_size/patch_size or scale_factor") from err
        if patches_per_side % scale:
            raise AdapterError(f"{self.family}: {patches_per_side} patches per side do not divide by scale_factor {scale}")
        return (patches_per_side // scale) ** 2

    def image_grid(self, model: nn.Module, inputs: dict[str, torch.Tensor], sample: int, n_image_tokens: int) -> tuple[int, int]:
        """Square grid of one tile when the image is a single view; ImageGridUnavailable for tiles (see module doc)."""
        per_tile = self.tokens_per_tile(model)
        if n_image_tokens == per_tile:
            side = int(round(per_tile**0.5))
            return side, side
        if n_image_tokens > 0 and n_image_tokens % per_tile == 0:
            raise ImageGridUnavailable(
                f"{self.family}: sample {sample} has {n_image_tokens} image tokens = {n_image_tokens // per_tile} views "
                f"(image tiles + global view) of {per_tile} tokens; attention maps need the tile layout, which this "
                "adapter does not reconstruct. Load the processor with do_image_splitting=False for one-view images "
                "if you need maps; hidden states and output signals do not need a grid"
            )
        raise AdapterError(f"{self.family}: {n_image_tokens} image tokens are not a whole number of {per_tile}-token tiles")

    # --- processor, prompts and inputs -------------------------------------------------------------
    def load_processor(self, source: str) -> Any:
        """AutoProcessor (Idefics3Processor needs no torchvision); image-only SmolVLMProcessor when that fails."""
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(source)
        except Exception as err:  # noqa: BLE001 -- ImportError (torchvision/num2words), OSError (no video config)
            processor = self._image_only_processor(source, f"AutoProcessor failed ({type(err).__name__}: {err})")
        else:
            if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
                processor = self._image_only_processor(
                    source, f"AutoProcessor returned {type(processor).__name__}, which has no image processor"
                )
        # one view is enough to show that images get processed (a split 64px image would be upscaled to 16 tiles)
        check_image_processor(processor, ("pixel_values",), self.family, do_image_splitting=False)
        return processor

    def _image_only_processor(self, source: str, why: str) -> Any:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(source).model_type
        except (OSError, ValueError) as err:
            raise AdapterError(f"{self.family}: {why}, and no config could be read from {source!r}: {err}") from err
        if model_type != "smolvlm":
            raise AdapterError(f"{self.family}: cannot load the processor of {source!r}: {why}")
        try:
            return smolvlm_image_only_processor_class().from_pretrained(source)
        except Exception as err:  # noqa: BLE001 -- report both failures
            raise AdapterError(
                f"{self.family}: cannot build a processor from {source!r}: {why}; the image-only SmolVLMProcessor "
                f"(image processor + tokenizer, no video processor) failed too: {type(err).__name__}: {err}"
            ) from err

    def prepare_inputs(self, processor: Any, images: Sequence[Any], questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """One image per prompt, passed nested ([[img], [img], ...]): SmolVLMProcessor reads a flat list as all the
        images of ONE prompt (then fails: "1 <image> tokens and 2 images"); Idefics3Processor accepts both."""
        return super().prepare_inputs(processor, [[image] for image in images], questions)

    def format_prompt(self, processor: Any, question: str) -> str:
        """One user turn (image first, then the question) and the "Assistant:" header.

        The prompt's last token is the ":" of "Assistant:", the position whose next-token distribution is the
        answer (what `last_token` pooling reads). A template that writes the BOS token itself (Idefics3-8B's
        "<|begin_of_text|>...") would get a second one from a tokenizer that adds BOS, so it is dropped here.
        """
        if getattr(processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        else:
            prompt = IDEFICS3_FALLBACK_PROMPT.format(question=question)
        return _drop_duplicate_bos(getattr(processor, "tokenizer", processor), prompt)


def _drop_duplicate_bos(tokenizer: Any, prompt: str) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None or not prompt.startswith(bos):
        return prompt
    if bos_id in tokenizer("", add_special_tokens=True)["input_ids"]:
        return prompt[len(bos):]
    return prompt
