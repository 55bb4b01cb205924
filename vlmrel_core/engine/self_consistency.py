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
from vlmrel_core.engine.run import _as_rgb
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


def sample_answers(
    loaded: LoadedVLM,
    image: Image.Image,
    question: str,
    config: SelfConsistencyConfig = SelfConsistencyConfig(),
    max_new_tokens: int = 8,
    normalization: NormalizationMode = "lenient",
) -> SelfConsistencyResult:
    """Draw K answers with temperature / nucleus sampling in one generate call and measure their agreement."""
    if not question or not question.strip():
        raise ValueError("question is empty")
    seed = item_seed(config.seed, _as_rgb(image), question)
    t0 = time.perf_counter()
    inputs = _prepare(loaded, image, question)
    model = loaded.model
    devices = [loaded.device.index or 0] if loaded.device.type == "cuda" else []
    with _SAMPLING_LOCK, torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        with count_forward_calls(model) as counter:
            sequences = model.generate(
                **inputs,
                do_sample=True,
                temperature=float(config.temperature),
                top_p=float(config.top_p),
                top_k=0,
                num_return_sequences=int(config.k),
                max_new_tokens=max_new_tokens,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
    new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
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
