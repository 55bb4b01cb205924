"""What every VLM family adapter answers: where the decoder layers live, which tokens are image tokens,
how a question becomes a prompt, which tokens count as "yes"/"no", and how answers are normalised.

Why adapters: module paths, image-token layouts and prompt formats differ per family and move between
transformers releases; keeping that knowledge in one file per family keeps the rest of vlmrel generic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import nn

from vlmrel_core.engine.answers import NormalizationMode, normalize_answer

Fusion = Literal["late", "early"]



class AdapterError(RuntimeError):
    """Raised when a model does not have the structure its family adapter expects."""


class ImageGridUnavailable(AdapterError):
    """The image tokens are consistent but do not form one 2-D grid (e.g. Idefics3/SmolVLM image tiles)."""


@dataclass(frozen=True)
class AnswerTokens:
    """The fixed answer-token set used for yes/no probabilities (recorded in every run manifest)."""

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]
    yes_tokens: tuple[str, ...]
    no_tokens: tuple[str, ...]

    def to_dict(self) -> dict[str, list]:
        return {
            "yes_ids": list(self.yes_ids),
            "no_ids": list(self.no_ids),
            "yes_tokens": list(self.yes_tokens),
            "no_tokens": list(self.no_tokens),
        }


def resolve_attribute_path(root: nn.Module, candidates: Sequence[str], what: str) -> Any:
    """Return the first dotted attribute path that exists on ``root``; fail naming every path tried."""
    for path in candidates:
        obj: Any = root
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise AdapterError(
        f"could not find the {what} of {type(root).__name__}; tried: {', '.join(candidates)}. "
        "Is this transformers version supported (>=5.0)?"
    )




class VLMAdapter:
    """Base class: subclasses set the class attributes and override what their family does differently."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    fusion: ClassVar[Fusion]
    layer_paths: ClassVar[tuple[str, ...]]
    final_norm_paths: ClassVar[tuple[str, ...]]
    yes_variants: ClassVar[tuple[str, ...]] = ("yes", "Yes", " yes", " Yes", "YES")
    no_variants: ClassVar[tuple[str, ...]] = ("no", "No", " no", " No", "NO")
    # the greedy pass's prompt KV cache can seed gray-zone sampling (no per-batch state outside the cache,
    # unlike Qwen2-VL's M-RoPE deltas, which the model keeps for the whole batch)
    reusable_prefill: ClassVar[bool] = False
    # questions about one image may share the prompt's KV cache through the last image token (`prefix_sharing`):
    # causal attention, image features only in that prefix, positions independent of the later tokens
    shareable_image_prefix: ClassVar[bool] = False
    # each decode step is a plain causal step (position ids from the attention mask, images only in the prefill,
    # no per-step model state), so `engine.greedy` may decode instead of `generate`
    plain_greedy_steps: ClassVar[bool] = False

    # --- model structure -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        layers = resolve_attribute_path(model, self.layer_paths, "decoder layers")
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise AdapterError(f"{self.family}: decoder layers resolved to {type(layers).__name__}, not a ModuleList")
        return layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return resolve_attribute_path(model, self.final_norm_paths, "final norm")

    def unembedding(self, model: nn.Module) -> nn.Module:
        head = model.get_output_embeddings()
        if head is None:
            raise AdapterError(f"{self.family}: model has no output embeddings (lm_head)")
        return head

    def attention_module(self, layer: nn.Module) -> nn.Module:
        for name in ("self_attn", "attention", "attn"):
            if hasattr(layer, name):
                return getattr(layer, name)
        raise AdapterError(f"{self.family}: decoder layer {type(layer).__name__} has no self-attention module")

    def image_token_id(self, model: nn.Module) -> int:
        config = model.config
        for key in ("image_token_id", "image_token_index"):
            value = getattr(config, key, None)
            if value is not None:
                return int(value)
        raise AdapterError(f"{self.family}: config has neither image_token_id nor image_token_index")

    def image_grid(self, model: nn.Module, inputs: dict[str, torch.Tensor], sample: int, n_image_tokens: int) -> tuple[int, int]:
        """Patch-grid shape of one sample's image tokens (square by default)."""
        side = int(round(n_image_tokens**0.5))
        if side * side != n_image_tokens:
            raise AdapterError(f"{self.family}: {n_image_tokens} image tokens do not form a square grid")
        return side, side

    # --- processor, prompts and inputs -------------------------------------------------------------
    def load_processor(self, source: str) -> Any:
        """The family's processor (image processor + tokenizer) saved beside the model."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise AdapterError(f"cannot load a processor from {source!r}: {err}") from err

    def format_prompt(self, processor: Any, question: str) -> str:
        raise NotImplementedError

    def prepare_inputs(self, processor: Any, images: Sequence[Any], questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Processor call for a batch, left-padded (decoder-only batches need it), training-only keys dropped."""
        prompts = [self.format_prompt(processor, q) for q in questions]
        encoded = processor(images=list(images), text=prompts, return_tensors="pt", padding=True, padding_side="left")
        return {k: v for k, v in encoded.items() if k != "labels"}

    # --- answers -----------------------------------------------------------------------------------
    def answer_tokens(self, tokenizer: Any) -> AnswerTokens:
        """Single-token spellings of yes/no that exist in this vocabulary (the answer-token set)."""

        def collect(variants: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
            ids: dict[int, str] = {}
            for v in variants:
                encoded = tokenizer.encode(v, add_special_tokens=False)
                if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id:
                    ids.setdefault(int(encoded[0]), v)
            return tuple(ids), tuple(ids.values())

        yes_ids, yes_tokens = collect(self.yes_variants)
        no_ids, no_tokens = collect(self.no_variants)
        if not yes_ids or not no_ids:
            raise AdapterError(f"{self.family}: no single-token yes/no answers in this tokenizer")
        return AnswerTokens(yes_ids, no_ids, yes_tokens, no_tokens)

    def normalize(self, text: str, mode: NormalizationMode = "lenient") -> str:
        return normalize_answer(text, mode)

