"""Qwen2-VL and Qwen2.5-VL: a ViT with 2-D rotary positions -> patch merger (spatial_merge_size**2 patches into one
token) -> Qwen2 decoder with multimodal rotary positions (M-RoPE).

Early fusion: image tokens sit inside the text stream and the decoder's rotary positions are 3-D (time, row, column)
for them, so the decoder itself sees the image layout. The number of image tokens depends on each image's size
(`image_grid_thw`), so the patch grid is read from the processor's output, never assumed square.

M-RoPE position ids and `rope_deltas` are computed by the model from `input_ids`, `mm_token_type_ids` and
`image_grid_thw`; we never build them by hand. run.py calls `model.generate`, which computes them for the prefill
exactly as the model expects (stale `rope_deltas` across calls were a shipped bug, transformers #40490).

Processor trap: Qwen2VLProcessor has a video processor, and video processors need torchvision. Without torchvision
`AutoProcessor` fails (ImportError/OSError, transformers 5.x) or, with some checkpoint layouts, falls through to a
bare tokenizer. `load_processor` then builds an image-only processor: the same processor class with the PIL image
processor and no video processor, and checks that it really turns an image into `pixel_values`/`image_grid_thw`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from vlmrel_core.engine.adapters.base import AdapterError, VLMAdapter

# Qwen's own chat format for one user turn with an image, then the assistant header (add_generation_prompt=True).
# Used only when the processor has no chat template; the real template also adds a default system turn.
QWEN2_VL_FALLBACK_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)

_PROCESSOR_CLASS_NAMES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


@functools.cache
def image_only_processor_class(parent_name: str) -> type:
    """A subclass of the family processor (`Qwen2VLProcessor` / `Qwen2_5_VLProcessor`) with no video processor.

    `ProcessorMixin` derives a processor's parts from its `__init__` signature and type-checks each one, and
    checking a `video_processor` (even None) needs the video-processor registry that torchvision-less installs do
    not have. Dropping the argument from `__init__` makes the parts image_processor + tokenizer; image processing,
    image-token expansion, `mm_token_type_ids` and the chat template are the parent's own code. `save_pretrained`
    writes the parent's class name, so a full install (with torchvision) loads the folder as the real processor.
    """
    import transformers
    from transformers import ProcessorMixin

    parent = getattr(transformers, parent_name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Same token set-up as the parent's __init__ (transformers 5.x), minus the video processor.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        convert = tokenizer.convert_tokens_to_ids
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or convert(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or convert(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    doc = image_only_processor_class.__doc__
    return subclass_saved_as_parent(parent, f"{parent_name}ImageOnly", {"__init__": __init__}, doc)


def subclass_saved_as_parent(parent: type, name: str, namespace: dict[str, Any], doc: str | None) -> type:
    """Subclass ``parent`` with ``namespace``; `save_pretrained` records the parent's class name (in
    processor_config.json and tokenizer_config.json), so the saved folder is an ordinary checkpoint of ``parent``."""
    parent_name = parent.__name__

    def to_dict(self) -> dict[str, Any]:
        output = parent.to_dict(self)
        output["processor_class"] = parent_name
        return output

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        files = parent.save_pretrained(self, save_directory, *args, **kwargs)
        self.tokenizer._set_processor_class(parent_name)  # the parent save wrote this subclass's name
        self.tokenizer.save_pretrained(save_directory)
        return files

    body = {"to_dict": to_dict, "save_pretrained": save_pretrained, "__module__": __name__, "__doc__": doc}
    return type(name, (parent,), {**body, **namespace})


def check_image_processor(processor: Any, required_keys: tuple[str, ...], family: str, **image_kwargs: Any) -> None:
    """Raise AdapterError unless ``processor`` has a tokenizer that knows its image token and an image processor
    that turns a small RGB image into ``required_keys`` (``image_kwargs`` go to the image processor)."""
    from PIL import Image

    image_processor = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if image_processor is None or tokenizer is None:
        raise AdapterError(
            f"{family}: the processor ({type(processor).__name__}) has no image processor and tokenizer; "
            "it cannot process images"
        )
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is None or image_token_id == getattr(tokenizer, "unk_token_id", None):
        raise AdapterError(
            f"{family}: the tokenizer has no id for the image token {getattr(processor, 'image_token', None)!r}"
        )
    try:
        out = image_processor(images=[Image.new("RGB", (64, 64), (128, 64, 32))], return_tensors="pt", **image_kwargs)
    except Exception as err:  # noqa: BLE001 -- any failure means "cannot process images"; say which
        raise AdapterError(f"{family}: {type(image_processor).__name__} failed on a test image: {err}") from err
    missing = [k for k in required_keys if k not in out]
    if missing:
        raise AdapterError(f"{family}: {type(image_processor).__name__} returned no {missing} for a test image")


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    fusion = "early"
    # transformers >= 4.52 / 5.x: Qwen2VLForConditionalGeneration.model (Qwen2VLModel).language_model (TextModel).
    # 4.4x: Qwen2VLForConditionalGeneration.model (Qwen2VLModel = the text model itself).
    layer_paths = ("model.language_model.layers", "language_model.layers", "model.layers")
    final_norm_paths = ("model.language_model.norm", "language_model.norm", "model.norm")

    # --- model structure -------------------------------------------------------------------------
    def image_grid(self, model: nn.Module, inputs: dict[str, torch.Tensor], sample: int, n_image_tokens: int) -> tuple[int, int]:
        """(rows, cols) of one sample's image tokens after the spatial merge: image_grid_thw / merge_size.

        Assumes one image per sample (what run_batch builds), so row ``sample`` of image_grid_thw is its image.
        """
        grid_thw = inputs.get("image_grid_thw")
        if grid_thw is None:
            raise AdapterError(f"{self.family}: the inputs have no image_grid_thw; was the image processed?")
        if sample >= grid_thw.shape[0]:
            raise AdapterError(f"{self.family}: image_grid_thw has {grid_thw.shape[0]} rows, no row for sample {sample}")
        merge = self._spatial_merge_size(model)
        t, h, w = (int(v) for v in grid_thw[sample])
        if t != 1 or h % merge or w % merge:
            raise AdapterError(f"{self.family}: image_grid_thw {[t, h, w]} is not one frame divisible by merge size {merge}")
        rows, cols = h // merge, w // merge
        if rows * cols != n_image_tokens:
            raise AdapterError(
                f"{self.family}: sample {sample} has {n_image_tokens} image tokens but image_grid_thw {[t, h, w]} "
                f"with merge size {merge} gives a {rows}x{cols} grid"
            )
        return rows, cols

    def _spatial_merge_size(self, model: nn.Module) -> int:
        vision_config = getattr(model.config, "vision_config", None)
        merge = getattr(vision_config, "spatial_merge_size", None)
        if merge is None:
            raise AdapterError(f"{self.family}: config.vision_config has no spatial_merge_size")
        return int(merge)

    # --- processor, prompts and inputs -------------------------------------------------------------
    def load_processor(self, source: str) -> Any:
        """The checkpoint's processor if AutoProcessor gives one that handles images, else an image-only one."""
        from transformers import AutoProcessor

        auto_error: Exception | None = None
        processor: Any = None
        try:
            processor = AutoProcessor.from_pretrained(source)
        except Exception as err:  # noqa: BLE001 -- ImportError (no torchvision), OSError (no video config), ...
            auto_error = err
        if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
            processor = self._image_only_processor(source, auto_error, processor)
        check_image_processor(processor, ("pixel_values", "image_grid_thw"), self.family)
        return processor

    def _image_only_processor(self, source: str, auto_error: Exception | None, auto_result: Any) -> Any:
        from transformers import AutoConfig

        why = f"AutoProcessor failed ({type(auto_error).__name__}: {auto_error})" if auto_error else (
            f"AutoProcessor returned {type(auto_result).__name__}, which has no image processor"
        )
        try:
            model_type = AutoConfig.from_pretrained(source).model_type
        except (OSError, ValueError) as err:
            raise AdapterError(f"{self.family}: {why}, and no config could be read from {source!r}: {err}") from err
        parent_name = _PROCESSOR_CLASS_NAMES.get(model_type)
        if parent_name is None:
            raise AdapterError(f"{self.family}: {why}; no image-only processor for model_type {model_type!r}")
        try:
            return image_only_processor_class(parent_name).from_pretrained(source)
        except Exception as err:  # noqa: BLE001 -- report both failures
            raise AdapterError(
                f"{self.family}: cannot build a processor from {source!r}: {why}; the image-only "
                f"{parent_name} (PIL image processor + tokenizer, no video processor) failed too: "
                f"{type(err).__name__}: {err}"
            ) from err

    def format_prompt(self, processor: Any, question: str) -> str:
        """One user turn (image, then the question) and the assistant header.

        The prompt's last token is the "\\n" that ends "<|im_start|>assistant\\n": the position whose next-token
        distribution is the answer, which is what `last_token` pooling reads (a formatting token, by design).
        """
        if getattr(processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(conversation, add_generation_prompt=True)
        return QWEN2_VL_FALLBACK_PROMPT.format(question=question)
