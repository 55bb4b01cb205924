"""PaliGemma family (PaliGemma 1/2, the embedded early-fusion model).

Early fusion: image tokens and the text prefix form one block that attends bidirectionally, which the model
only does when `token_type_ids` (0 = prefix) reach it; the processor returns them and we always pass them.
"""

from __future__ import annotations

from typing import Any

from vlmrel_core.engine.adapters.base import VLMAdapter


class PaliGemmaAdapter(VLMAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    fusion = "early"
    layer_paths = ("model.language_model.layers", "language_model.model.layers", "model.language_model.model.layers")
    final_norm_paths = ("model.language_model.norm", "language_model.model.norm", "model.language_model.model.norm")
    reusable_prefill = True

    def format_prompt(self, processor: Any, question: str) -> str:
        # The mix checkpoints were trained on "answer en <question>"; the processor prepends the image tokens
        # and <bos> and appends the "\n" that ends the prefix.
        return f"<image>answer en {question}"
