"""Greedy decoding without `generate`'s per-call setup, for decoders whose steps are plain causal steps (LLaVA).

Why: `generate` spends ~1.7 ms per call before its first forward (copying and merging the generation config,
validating keyword arguments through `inspect.signature`, building logits processors and stopping criteria). On the
embedded model a question costs ~16 ms, so that setup was the margin by which vlmrel's batch-1 capture (Inspect, the
gate) lost to a user's plain `generate` loop. When the adapter declares plain steps (`adapter.plain_greedy_steps`:
position ids from the attention mask, image inputs only in the prefill, no per-step model state) and the model's
generation config adds nothing to greedy search (no repetition penalty, forced or suppressed tokens, ...), this loop
does what greedy `generate` does: the same position ids, the same padding of finished rows, the same stop at EOS or
``max_new_tokens``; tests check tokens and logits against `generate` itself. Anything else goes through `generate`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

# generation-config fields that do not change greedy search's tokens (sampling knobs are ignored without sampling)
_NEUTRAL_FIELDS = frozenset({
    "max_new_tokens", "max_length", "do_sample", "use_cache", "output_attentions", "output_hidden_states",
    "output_scores", "output_logits", "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id",
    "decoder_start_token_id", "temperature", "top_k", "top_p", "typical_p", "min_p", "_from_model_config",
    "transformers_version",
})


@functools.cache
def cache_kwarg() -> str:
    """The model's and `generate`'s keyword for a KV cache to continue from: `cache` where transformers renamed it
    (its outputs carry a `cache` field), `past_key_values` before. Asked on first use, not at import: importing
    transformers' generation code takes seconds, and `engine.loading` answers a bad path before that."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in getattr(GenerateDecoderOnlyOutput, "__dataclass_fields__", {}) else "past_key_values"


@dataclass
class GreedyOutput:
    """What the capture needs from a greedy `generate(return_dict_in_generate=True, output_logits=True)`."""

    sequences: torch.Tensor  # (b, prompt + steps): the prompt, then the new tokens (pad after a row's EOS)
    logits: tuple[torch.Tensor, ...]  # per step: (b, V) float32 raw logits
    cache: Any  # the KV cache after the last step


def plain_greedy_supported(model: Any, adapter: Any) -> bool:
    """Whether `greedy_generate` gives `generate`'s greedy result for this model (else use `generate`)."""
    if not getattr(adapter, "plain_greedy_steps", False):
        return False
    config = getattr(model, "generation_config", None)
    if config is None or getattr(config, "cache_implementation", None) not in (None, "dynamic"):
        return False
    return set(config.to_diff_dict()) <= _NEUTRAL_FIELDS


def _eos_ids(model: Any, device: torch.device) -> torch.Tensor | None:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device)


def greedy_generate(
    model: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int, pad_token_id: int | None, cache: Any = None
) -> GreedyOutput:
    """Greedy answers for a (left- or mid-padded) batch; ``cache`` may already hold a prefix of the prompt (then
    only the tokens after it are run, as `generate` does with a passed cache)."""
    from transformers import DynamicCache

    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if cache is None:
        cache = DynamicCache(config=model.config)
    past = int(cache.get_seq_length())
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    step_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    step_inputs.update(input_ids=input_ids[:, past:], position_ids=position_ids[:, past:])
    eos = _eos_ids(model, input_ids.device)
    if pad_token_id is None:  # as `generate`: finished rows are padded with the first end-of-sequence id
        pad_token_id = int(eos[0]) if eos is not None else 0
    pad = torch.tensor(pad_token_id, device=input_ids.device)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    sequences, logits = input_ids, []
    for step in range(max_new_tokens):
        outputs = model(**step_inputs, attention_mask=mask, use_cache=True, logits_to_keep=1, **{cache_kwarg(): cache})
        step_logits = outputs.logits[:, -1].to(dtype=torch.float32, copy=True)
        logits.append(step_logits)
        tokens = torch.where(unfinished, step_logits.argmax(dim=-1), pad)
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        if eos is not None:
            unfinished &= ~torch.isin(tokens, eos)
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        position_ids = position_ids[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        step_inputs = {"input_ids": tokens[:, None], "position_ids": position_ids}
    return GreedyOutput(sequences, tuple(logits), cache)
