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
from vlmrel_core.engine.capture import PrefixSums, SharedPrefix, TokenLayout, active_intervention_owners, capture
from vlmrel_core.engine.greedy import cache_kwarg, greedy_generate
from vlmrel_core.engine.layers import POOLINGS, resolve_layers
from vlmrel_core.engine.loading import LoadedVLM
from vlmrel_core.engine.prefix_sharing import (
    CachedPrefix, ImagePrefixCache, kept_prefixes, plan_calls, prefix_spans, row_prefixes, select_rows,
    shared_call,
)
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
    prefill: "Prefill | PrefillParts | None" = None  # with keep_prefill: the prompt's KV cache, for gray-zone sampling


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


@dataclass
class PrefillParts:
    """The prompt KV caches of a batch run in several calls (image-prefix sharing): (batch rows, that call's Prefill)."""

    parts: list[tuple[list[int], Prefill]]

    def row(self, index: int) -> Prefill:
        for rows, prefill in self.parts:
            if index in rows:
                return prefill.row(rows.index(index))
        raise IndexError(f"row {index} is in no part of this batch")


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


def batch_inputs(loaded: LoadedVLM, images: Sequence[Image.Image], questions: Sequence[str]) -> dict[str, torch.Tensor]:
    """The model inputs of a batch: validated RGB images, validated questions in the family's prompt, one processor
    call (under the model's processor lock), on the model's device, pixels in its dtype."""
    rgb_images = [_as_rgb(i) for i in images]
    max_tokens = question_token_limit(loaded)
    with loaded.processor_lock:
        # user text is validated and its special-token strings neutralised: it is only ever read as text
        prompts = [prepare_question(q, loaded.processor, max_tokens) for q in questions]
        inputs = loaded.adapter.prepare_inputs(loaded.processor, rgb_images, prompts)
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
    return inputs


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
    prefix_cache: ImagePrefixCache | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> BatchRecord:
    """Greedy answers for a batch plus everything the probes, signals and gate need, from one generate call.

    ``keep_prefill`` keeps the prompt's KV cache in ``record.prefill`` where the adapter allows reusing it
    (`adapter.reusable_prefill`), for gray-zone sampling without a second prefill. ``prefix_cache``: questions
    about an image whose prompt prefix is kept there run only their own tokens (`prefix_sharing`; families with
    `adapter.shareable_image_prefix`); new prefixes are kept for later rows and calls. ``inputs``: this batch's model
    inputs already built from these images and questions (`batch_inputs`), which are then not built again."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    if not questions:
        raise ValueError("empty batch")
    adapter, model = loaded.adapter, loaded.model
    t0 = time.perf_counter()
    if inputs is None:
        inputs = batch_inputs(loaded, images, questions)
    elif inputs["input_ids"].shape[0] != len(questions):
        raise ValueError(f"inputs for {inputs['input_ids'].shape[0]} rows, {len(questions)} questions")
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs.get("attention_mask"), adapter.image_token_id(model))
    preprocess_s = time.perf_counter() - t0
    options = _PassOptions(resolve_layers(loaded.n_layers, layers), tuple(poolings), attentions, logit_lens,
                           max_new_tokens, normalization, keep_prefill)
    # a hooked call (an ablation, a recording) must neither use nor keep prefixes computed by or for plain calls
    shares = (prefix_cache is not None and prefix_cache.max_bytes > 0 and adapter.shareable_image_prefix
              and not active_intervention_owners())
    if not shares:
        record = _run_pass(loaded, inputs, layout, options).record
    else:
        record = _run_sharing(loaded, inputs, layout, options, prefix_cache)
    record.timings["preprocess_s"] = preprocess_s
    return record


@dataclass(frozen=True)
class _PassOptions:
    layers: list[int]
    poolings: tuple[str, ...]
    attentions: bool
    logit_lens: bool
    max_new_tokens: int
    normalization: NormalizationMode
    keep_prefill: bool


@dataclass
class _Pass:
    record: BatchRecord
    cache: Any  # the generate call's KV cache
    prefix_sums: dict[int, torch.Tensor]


def _run_pass(
    loaded: LoadedVLM, inputs: dict[str, torch.Tensor], layout: TokenLayout, options: _PassOptions,
    shared: SharedPrefix | None = None, sums: PrefixSums | None = None, past: Any = None,
) -> _Pass:
    """One captured generate call on prepared inputs (with ``past``/``shared``: only the tokens after a kept prefix)."""
    adapter, model = loaded.adapter, loaded.model
    answer_tokens = loaded.answer_tokens
    t1 = time.perf_counter()
    # inference_mode, not no_grad: no version counters or view tracking on any op (measurably less per-op overhead)
    with torch.inference_mode(), capture(model, adapter, layout, options.layers, options.poolings, options.attentions,
                                         shared=shared, prefix_sums=sums) as captured:
        if loaded.plain_greedy:  # generate's greedy result without its per-call setup (`engine.greedy`)
            generated = greedy_generate(model, inputs, options.max_new_tokens, loaded.tokenizer.pad_token_id, past)
        else:
            generated = model.generate(
                **inputs,
                **({cache_kwarg(): past} if past is not None else {}),
                max_new_tokens=options.max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
    t2 = time.perf_counter()
    prompt_length = inputs["input_ids"].shape[1]
    prefill = None
    generated_cache = _generated_cache(generated)
    cache = generated_cache if options.keep_prefill and adapter.reusable_prefill else None
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
    lens = (_logit_lens(loaded, captured.states["last_token"], answer_tokens, softcap)
            if options.logit_lens and "last_token" in options.poolings else None)
    image_token_counts = layout.image_token_counts
    grids = [_image_grid_or_none(adapter, model, inputs, i, n) for i, n in enumerate(image_token_counts)]
    t3 = time.perf_counter()
    record = BatchRecord(
        answer_text=answer_text,
        answer=[adapter.normalize(t, options.normalization) for t in answer_text],
        answer_strict=[adapter.normalize(t, "strict") for t in answer_text],
        output=output,
        states={p: s.numpy() for p, s in captured.states.items()},
        layers=captured.layers,
        lens_logodds=lens,
        attentions=captured.attentions,
        image_token_counts=image_token_counts,
        image_grids=grids,
        timings={"generate_s": t2 - t1, "postprocess_s": t3 - t2},
        n_forward_calls=captured.n_forward_calls,
        prefill=prefill,
    )
    return _Pass(record, generated_cache, captured.prefix_sums)


def _run_sharing(
    loaded: LoadedVLM, inputs: dict[str, torch.Tensor], layout: TokenLayout, options: _PassOptions,
    prefix_cache: ImagePrefixCache,
) -> BatchRecord:
    """Rows with a new image prefix in one full call (keeping their prefixes), then rows whose prefix is kept in
    calls over their own tokens only; the parts are put back in the batch's order."""
    prefixes = row_prefixes(inputs, layout)
    image_token_id = loaded.adapter.image_token_id(loaded.model)
    parts: list[tuple[list[int], BatchRecord]] = []

    def run_full(rows: list[int]) -> None:
        chosen = select_rows(inputs, rows) if len(rows) < len(prefixes) else inputs
        shift = inputs["input_ids"].shape[1] - chosen["input_ids"].shape[1]
        row_layout = TokenLayout.from_inputs(chosen["input_ids"], chosen.get("attention_mask"), image_token_id)
        chosen_prefixes = [prefixes[r] for r in rows]
        sums = (prefix_spans(row_layout, chosen_prefixes, shift)  # token sums only where a prefix can be kept
                if any(prefix is not None for prefix in chosen_prefixes) else None)
        done = _run_pass(loaded, chosen, row_layout, options, sums=sums)
        for prefix, entry in zip(chosen_prefixes, kept_prefixes(done.cache, chosen_prefixes, shift, done.prefix_sums)):
            if prefix is not None and entry is not None:
                prefix_cache.put(prefix.key, entry)
        parts.append((rows, done.record))

    def run_shared(rows: list[int], entries: list[CachedPrefix]) -> None:
        call = shared_call(loaded.model, inputs, rows, prefixes, entries, image_token_id, options.poolings,
                           loaded.tokenizer.pad_token_id or 0)
        parts.append((rows, _run_pass(loaded, call.inputs, call.layout, options, shared=call.shared, past=call.cache).record))

    plan_calls(prefixes, prefix_cache, options.layers, run_full, run_shared)
    if len(parts) == 1:
        return parts[0][1]
    merged = _merge_records(parts)
    if options.keep_prefill and all(record.prefill is not None for _, record in parts):
        merged.prefill = PrefillParts([(rows, record.prefill) for rows, record in parts])
    return merged


def _merge_records(parts: list[tuple[list[int], BatchRecord]]) -> BatchRecord:
    """One record in batch order from records of row subsets (``parts``: (batch rows, record))."""
    order = [row for rows, _ in parts for row in rows]
    back = np.argsort(np.asarray(order))  # position in the concatenation of each batch row
    records = [record for _, record in parts]

    def stacked(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)[back]

    def listed(values: list[list]) -> list:
        flat = [v for part in values for v in part]
        return [flat[i] for i in back]

    first = records[0]
    return BatchRecord(
        answer_text=listed([r.answer_text for r in records]),
        answer=listed([r.answer for r in records]),
        answer_strict=listed([r.answer_strict for r in records]),
        output={k: stacked([r.output[k] for r in records]) for k in first.output},
        states={k: stacked([r.states[k] for r in records]) for k in first.states},
        layers=first.layers,
        lens_logodds=stacked([r.lens_logodds for r in records]) if first.lens_logodds is not None else None,
        attentions=listed([r.attentions for r in records]) if first.attentions is not None else None,
        image_token_counts=listed([r.image_token_counts for r in records]),
        image_grids=listed([r.image_grids for r in records]),
        timings={k: sum(r.timings.get(k, 0.0) for r in records) for k in first.timings},
        n_forward_calls=sum(r.n_forward_calls for r in records),
    )


def _generated_cache(generated: Any) -> Any:
    """The generate (or `GreedyOutput`) output's KV cache (`cache` in newer transformers, `past_key_values` before)."""
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
