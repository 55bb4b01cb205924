"""Self-consistency on a live model: K sampled answers to one (image, question), their agreement and their cost.

Why one generate call with ``num_return_sequences=K``: the K samples share one batched prefill and one decode
loop, which is the cheapest honest way to draw them; the cost is still K sequences' worth of compute, so it is
reported both as model calls made and as sequence-forward passes (calls × K), next to the paper's K× unit
(`SelfConsistencyConfig.cost_multiplier`). Sampling is nucleus-only (``top_k=0`` turns off transformers' default
top-k of 50, which the paper's T=0.7 / top-p 0.9 setting does not use).

Seeding: the sample draw is seeded from (config.seed, image bytes, question), so the same input gives the same K
answers in any order or batch, and the global torch RNG is restored afterwards (``torch.random.fork_rng``). A lock
serialises sampling calls, because fork_rng/manual_seed act on the process-wide RNG.
"""

from __future__ import annotations

import contextvars
import hashlib
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlmrel_core.engine.answers import NormalizationMode
from vlmrel_core.engine.loading import LoadedVLM
from vlmrel_core.engine.greedy import cache_kwarg
from vlmrel_core.engine.run import Prefill, _as_rgb, _generated_cache
from vlmrel_core.signals.consistency import SelfConsistencyConfig, agreement_rate, majority_answer

__all__ = ["SelfConsistencyResult", "ForwardCounter", "count_forward_calls", "item_seed", "sample_answers"]

_SAMPLING_LOCK = threading.Lock()




@dataclass
class ForwardCounter:
    calls: int = 0


_COUNTING: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("vlmrel_forward_counters", default=frozenset())


@contextmanager
def count_forward_calls(model: nn.Module) -> Iterator[ForwardCounter]:
    """Count top-level ``model`` forward calls made by the calling thread's context inside the block.

    The hook is removed on exit. Its own ContextVar (not `capture.activate`, whose owner is the innermost block
    only) keeps other threads' calls out while letting counters nest and run around a capture.
    """
    counter = ForwardCounter()
    key = id(counter)

    def pre_hook(module: nn.Module, args: Any) -> None:
        if key in _COUNTING.get():
            counter.calls += 1

    handle = model.register_forward_pre_hook(pre_hook)
    token = _COUNTING.set(_COUNTING.get() | {key})
    try:
        yield counter
    finally:
        _COUNTING.reset(token)
        handle.remove()


def item_seed(base_seed: int, image: Image.Image, question: str) -> int:
    """A 63-bit seed from the base seed, the image's pixels and the question: stable across runs and batches."""
    digest = hashlib.sha256(f"{int(base_seed)}|{question}|{image.size}|".encode())
    digest.update(np.asarray(_as_rgb(image)).tobytes())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


@dataclass
class SelfConsistencyResult:
    """K normalised samples, their agreement rate and majority, and what drawing them cost."""

    samples_text: list[str]
    samples: list[str]  # normalised by the adapter (the mode given), compared exactly
    agreement: float
    majority_answer: str
    k: int
    temperature: float
    top_p: float
    seed: int  # the per-item seed actually used
    n_forward_calls: int  # model calls made (one batched prefill of K rows + decode steps)
    sequence_forward_passes: int  # n_forward_calls × K: each call carries K sequences
    cost_multiplier: int  # K: full generations relative to one greedy answer (the paper's unit)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prepare(loaded: LoadedVLM, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
    from vlmrel_core.validation.questions import prepare_question, question_token_limit

    rgb = _as_rgb(image)
    with loaded.processor_lock:  # user text validated and neutralised, exactly as run_batch does
        prompt = prepare_question(question, loaded.processor, question_token_limit(loaded))
        inputs = loaded.adapter.prepare_inputs(loaded.processor, [rgb], [prompt])
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
    return inputs


def _first_token_probs(logits: torch.Tensor, config: SelfConsistencyConfig) -> torch.Tensor:
    """The sampling distribution of the first answer token: transformers' own temperature and top-p warpers,
    exactly as `generate(do_sample=True, temperature, top_p, top_k=0)` applies them."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(float(config.temperature))(None, logits.float())
    scores = TopPLogitsWarper(float(config.top_p))(None, scores)
    return torch.softmax(scores, dim=-1)


def _sample_with_shared_prefill(
    loaded: LoadedVLM, inputs: dict[str, torch.Tensor], config: SelfConsistencyConfig, max_new_tokens: int,
    prefill: Prefill | None = None,
) -> torch.Tensor:
    """(K, <= max_new_tokens) sampled tokens; the prompt (image included) is prefilled ONCE, not K times.

    Why: `num_return_sequences=K` copies the prompt K times before the prefill, so the vision tower and the whole
    prefill ran K times. Here one greedy-free prefill gives the first-token logits and the KV cache; K first tokens
    are drawn from transformers' own warped distribution, the cache is repeated K times, and the K continuations
    are sampled in one decode loop. Each sample has the same distribution as before (independent draws).
    With ``prefill`` (the gate's greedy pass kept its prompt cache) there is no prefill here at all."""
    model, tokenizer, k = loaded.model, loaded.tokenizer, int(config.k)
    if prefill is None:
        first = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        first_logits, cache = first.logits[0], _generated_cache(first)
    else:
        first_logits, cache = prefill.first_logits, prefill.cache
    probs = _first_token_probs(first_logits, config)[0]  # (V,): the one prompt's first-token distribution
    first_tokens = torch.multinomial(probs, k, replacement=True).to(inputs["input_ids"].device)
    if max_new_tokens == 1:
        return first_tokens[:, None]
    cache.batch_repeat_interleave(k)
    ones = torch.ones(k, 1, dtype=inputs["attention_mask"].dtype, device=first_tokens.device)
    step_inputs = {
        "input_ids": torch.cat([inputs["input_ids"].repeat(k, 1), first_tokens[:, None]], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"].repeat(k, 1), ones], dim=1),
    }
    if "token_type_ids" in inputs:  # PaliGemma: generated tokens are suffix (type 1)
        step_inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"].repeat(k, 1), ones.to(inputs["token_type_ids"].dtype)], dim=1)
    rest = model.generate(**step_inputs, **{cache_kwarg(): cache}, do_sample=True, temperature=float(config.temperature),
                          top_p=float(config.top_p), top_k=0, max_new_tokens=max_new_tokens - 1,
                          pad_token_id=tokenizer.pad_token_id)
    tokens = rest[:, inputs["input_ids"].shape[1]:]
    eos = tokenizer.eos_token_id
    if eos is not None:  # a sample whose first token ended it stops there (the decode loop kept it running)
        ended = (tokens == eos).int().cumsum(dim=1)
        after_end = (ended - (tokens == eos).int()) > 0
        tokens = tokens.masked_fill(after_end, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    return tokens


def sample_answers(
    loaded: LoadedVLM,
    image: Image.Image,
    question: str,
    config: SelfConsistencyConfig = SelfConsistencyConfig(),
    max_new_tokens: int = 8,
    normalization: NormalizationMode = "lenient",
    prefill: Prefill | None = None,
) -> SelfConsistencyResult:
    """Draw K answers with temperature / nucleus sampling from one shared prefill and measure their agreement.

    ``prefill``: this (image, question)'s prompt cache from the greedy pass (`Prefill.row`), used instead of a
    prefill of its own; it must come from the same image and question (the caller's contract)."""
    if not question or not question.strip():
        raise ValueError("question is empty")
    seed = item_seed(config.seed, _as_rgb(image), question)
    t0 = time.perf_counter()
    inputs = _prepare(loaded, image, question) if prefill is None else prefill.inputs
    model = loaded.model
    devices = [loaded.device.index or 0] if loaded.device.type == "cuda" else []
    with _SAMPLING_LOCK, torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        with count_forward_calls(model) as counter:
            new_tokens = _sample_with_shared_prefill(loaded, inputs, config, max_new_tokens, prefill)
    with loaded.processor_lock:
        texts = [t.strip() for t in loaded.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    samples = [loaded.adapter.normalize(t, normalization) for t in texts]
    return SelfConsistencyResult(
        samples_text=texts,
        samples=samples,
        agreement=agreement_rate(samples),
        majority_answer=majority_answer(samples),
        k=int(config.k),
        temperature=float(config.temperature),
        top_p=float(config.top_p),
        seed=seed,
        n_forward_calls=counter.calls,
        sequence_forward_passes=counter.calls * int(config.k),
        cost_multiplier=config.cost_multiplier,
        seconds=time.perf_counter() - t0,
    )
