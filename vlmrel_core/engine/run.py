"""Run a VLM on (image, question) pairs: ONE generate call whose prefill is captured, giving the answer,
the answer-position logits summary, pooled states for every chosen layer, attentions and the logit lens.

Why generate and not a separate forward: the probe must read the very pass that produces the answer (zero extra
forward passes), and calling the model as `generate` does keeps position ids, M-RoPE deltas and PaliGemma's
token_type_ids exactly as the model expects them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from vlmrel_core.engine.adapters.base import AnswerTokens, ImageGridUnavailable
from vlmrel_core.engine.answers import NormalizationMode
from vlmrel_core.engine.capture import TokenLayout, capture
from vlmrel_core.engine.layers import POOLINGS
from vlmrel_core.engine.loading import LoadedVLM
from vlmrel_core.signals.output import output_signals
from vlmrel_core.validation.images import load_image
from vlmrel_core.validation.questions import prepare_question, question_token_limit


@dataclass
class BatchRecord:
    """Everything one batch produced; arrays are numpy, first axis = sample."""

    answer_text: list[str]
    answer: list[str]  # lenient-normalised
    answer_strict: list[str]
    output: dict[str, np.ndarray]  # p_yes, p_no, max_answer_prob, margins, entropy, mean_token_logprob ...
    states: dict[str, np.ndarray]  # pooling -> (b, n_layers, d) float32
    layers: list[int]
    lens_logodds: np.ndarray | None  # (b, n_layers) yes-vs-no log-odds through final norm + unembedding
    attentions: list[np.ndarray] | None  # per sample (n_layers, n_image_tokens)
    image_token_counts: list[int]
    image_grids: list[tuple[int, int] | None]  # None: the adapter cannot lay the image tokens on one grid (tiles)
    timings: dict[str, float] = field(default_factory=dict)
    n_forward_calls: int = 0
    prefill: "Prefill | None" = None  # with keep_prefill: the prompt's KV cache, for gray-zone sampling


@dataclass
class Prefill:
    """A batch's prompt KV cache (cropped to the prompt), its model inputs and first-answer-token logits.

    Why kept: the gate's gray zone samples K answers to the same prompt; starting them from the greedy pass's own
    prefill (`self_consistency.sample_answers(prefill=...)`) saves a second pass over the prompt and image.
    """

    cache: Any
    inputs: dict[str, torch.Tensor]
    first_logits: torch.Tensor  # (b, V) the generate call's raw logits of the first answer token

    def row(self, index: int) -> "Prefill":
        """One row's own copy (the sampler extends the cache in place); the batch's cache is left as it was."""
        import copy

        cache = copy.deepcopy(self.cache)
        if self.first_logits.shape[0] > 1:
            cache.batch_select_indices(torch.tensor([index], device=self.first_logits.device))
        return Prefill(cache, {k: v[index : index + 1] for k, v in self.inputs.items() if k != "pixel_values"},
                       self.first_logits[index : index + 1])


def _as_rgb(image: Any) -> Image.Image:
    """A validated RGB image (pixel cap, aspect, mode conversion): `validation.images`."""
    if isinstance(image, Image.Image):
        return load_image(image).image
    raise TypeError(f"expected a PIL image, got {type(image).__name__}")


def _logit_lens(
    loaded: LoadedVLM, last_token_states: torch.Tensor, answer_tokens: AnswerTokens, softcap: float | None
) -> np.ndarray:
    """Yes-vs-no log-odds per layer: final norm then unembedding on each layer's (pre-norm) last-token state."""
    norm = loaded.adapter.final_norm(loaded.model)
    head = loaded.adapter.unembedding(loaded.model)
    b, n_layers, d = last_token_states.shape
    param = next(head.parameters())
    with torch.no_grad():
        flat = last_token_states.reshape(b * n_layers, d).to(param.device, param.dtype)
        logits = _soft_capped(head(norm(flat)).float(), softcap)
        yes, no = _answer_logsumexps(logits, answer_tokens)
    return (yes - no).reshape(b, n_layers).cpu().numpy()


def _answer_logsumexps(logits: torch.Tensor, answer_tokens: AnswerTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp of the yes columns and of the no columns (index_select on one small index tensor per call: the same
    values as indexing with a Python list, without its per-element conversion)."""
    yes_ids = torch.tensor(answer_tokens.yes_ids, device=logits.device)
    no_ids = torch.tensor(answer_tokens.no_ids, device=logits.device)
    return torch.logsumexp(logits.index_select(-1, yes_ids), dim=-1), torch.logsumexp(logits.index_select(-1, no_ids), dim=-1)


def _final_logit_softcap(loaded: LoadedVLM) -> float | None:
    """The text config's final logit soft-cap (read once per batch: `get_text_config` costs ~15 us a call)."""
    return getattr(loaded.model.config.get_text_config(), "final_logit_softcapping", None)


def _soft_capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2-style final logit soft-capping, when the text config asks for it."""
    return torch.tanh(logits / cap) * cap if cap else logits


def run_batch(
    loaded: LoadedVLM,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    layers: Sequence[int] | None = None,
    poolings: Sequence[str] = POOLINGS,
    attentions: bool = False,
    logit_lens: bool = True,
    max_new_tokens: int = 8,
    normalization: NormalizationMode = "lenient",
    keep_prefill: bool = False,
    inputs: dict[str, torch.Tensor] | None = None,
) -> BatchRecord:
    """Greedy answers for a batch plus everything the probes, signals and gate need, from one generate call.

    ``keep_prefill`` keeps the prompt's KV cache in ``record.prefill`` where the adapter allows reusing it
    (`adapter.reusable_prefill`), for gray-zone sampling without a second prefill. ``inputs``: this batch's model
    inputs already built from these images and questions (`interventions.live_fast.prepare_batch`: the same
    validation, prompt and processor call), which are then not built again."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    if not questions:
        raise ValueError("empty batch")
    adapter, model = loaded.adapter, loaded.model
    t0 = time.perf_counter()
    if inputs is None:
        rgb_images = [_as_rgb(i) for i in images]
        max_tokens = question_token_limit(loaded)
        with loaded.processor_lock:
            # user text is validated and its special-token strings neutralised: it is only ever read as text
            prompts = [prepare_question(q, loaded.processor, max_tokens) for q in questions]
            inputs = adapter.prepare_inputs(loaded.processor, rgb_images, prompts)
        inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
    elif inputs["input_ids"].shape[0] != len(questions):
        raise ValueError(f"inputs for {inputs['input_ids'].shape[0]} rows, {len(questions)} questions")
    answer_tokens = loaded.answer_tokens
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs.get("attention_mask"), adapter.image_token_id(model))
    t1 = time.perf_counter()
    # inference_mode, not no_grad: no version counters or view tracking on any op (measurably less per-op overhead)
    with torch.inference_mode(), capture(model, adapter, layout, layers, poolings, attentions) as captured:
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    t2 = time.perf_counter()
    prompt_length = inputs["input_ids"].shape[1]
    prefill = None
    cache = _generated_cache(generated) if keep_prefill and adapter.reusable_prefill else None
    if cache is not None and getattr(cache, "is_croppable", True):  # sliding-window caches cannot be cut back
        excess = int(cache.get_seq_length()) - prompt_length
        if excess > 0:
            cache.crop(-excess)  # a negative count removes the answer's tokens (old and new transformers alike)
        prefill = Prefill(cache, inputs, generated.logits[0])
    new_tokens = generated.sequences[:, prompt_length:]
    with loaded.processor_lock:
        answer_text = [t.strip() for t in loaded.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    softcap = _final_logit_softcap(loaded)
    step_logits = _soft_capped(torch.stack([l.float() for l in generated.logits], dim=1), softcap)  # (b, T, V)
    answer_logits = step_logits[:, 0].cpu().numpy()
    output = output_signals(answer_logits, answer_tokens.yes_ids, answer_tokens.no_ids)
    output["mean_token_logprob"] = _mean_token_logprob(step_logits, new_tokens, loaded.tokenizer)
    lens = _logit_lens(loaded, captured.states["last_token"], answer_tokens, softcap) if logit_lens and "last_token" in poolings else None
    image_token_counts = layout.image_token_counts
    grids = [_image_grid_or_none(adapter, model, inputs, i, n) for i, n in enumerate(image_token_counts)]
    t3 = time.perf_counter()
    return BatchRecord(
        answer_text=answer_text,
        answer=[adapter.normalize(t, normalization) for t in answer_text],
        answer_strict=[adapter.normalize(t, "strict") for t in answer_text],
        output=output,
        states={p: s.numpy() for p, s in captured.states.items()},
        layers=captured.layers,
        lens_logodds=lens,
        attentions=captured.attentions,
        image_token_counts=image_token_counts,
        image_grids=grids,
        timings={"preprocess_s": t1 - t0, "generate_s": t2 - t1, "postprocess_s": t3 - t2},
        n_forward_calls=captured.n_forward_calls,
        prefill=prefill,
    )


def _generated_cache(generated: Any) -> Any:
    """The generate output's KV cache (`cache` in newer transformers, `past_key_values` before)."""
    cache = getattr(generated, "cache", None)
    return cache if cache is not None else getattr(generated, "past_key_values", None)


def _image_grid_or_none(
    adapter: Any, model: Any, inputs: dict[str, torch.Tensor], sample: int, n: int
) -> tuple[int, int] | None:
    """The sample's patch grid, or None when its image tokens form no single grid (Idefics3/SmolVLM tiles): states,
    output signals and per-token attentions do not need one, so only the grid is missing, not the batch."""
    try:
        return adapter.image_grid(model, inputs, sample, n)
    except ImageGridUnavailable:
        return None


def _mean_token_logprob(step_logits: torch.Tensor, new_tokens: torch.Tensor, tokenizer: Any) -> np.ndarray:
    """Mean log-probability of each sample's generated tokens, up to and including the first EOS."""
    logprobs = torch.log_softmax(step_logits, dim=-1)
    n_steps = step_logits.shape[1]
    chosen = logprobs.gather(-1, new_tokens[:, :n_steps].unsqueeze(-1).to(logprobs.device)).squeeze(-1)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    means = []
    for row_tokens, row_lp in zip(new_tokens.tolist(), chosen.tolist()):
        values = []
        for token, lp in zip(row_tokens, row_lp):
            if token == pad and token != eos and values:
                break
            values.append(lp)
            if token == eos:
                break
        means.append(float(np.mean(values)) if values else float("nan"))
    return np.asarray(means)
