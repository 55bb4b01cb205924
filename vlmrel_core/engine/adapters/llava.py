"""LLaVA family (LLaVA-1.5, the embedded late-fusion model): vision tower -> projector -> decoder.

Late fusion: image features enter only as a prefix of input embeddings; the decoder is an ordinary causal LM.
"""

from __future__ import annotations

from typing import Any

from vlmrel_core.engine.adapters.base import VLMAdapter

LLAVA_FALLBACK_PROMPT = "USER: <image>\n{question} ASSISTANT:"


class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_types = ("llava",)
    fusion = "late"
    # transformers >= 4.52 nests the LM under model.model.language_model; older releases under language_model.model.
    layer_paths = ("model.language_model.layers", "language_model.model.layers", "model.language_model.model.layers")
    final_norm_paths = ("model.language_model.norm", "language_model.model.norm", "model.language_model.model.norm")
    reusable_prefill = True
    shareable_image_prefix = True
    plain_greedy_steps = True

    def format_prompt(self, processor: Any, question: str) -> str:
        if getattr(processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(conversation, add_generation_prompt=True)
        return LLAVA_FALLBACK_PROMPT.format(question=question)
