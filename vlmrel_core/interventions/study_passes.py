"""The ablation study's passes over its questions: the unablated pass and one pass per condition.

Why its own module: `study.run_ablation_study` builds the conditions and the table; how their correctness is
computed has two paths with the same numbers:

* full (`fast=False`, and always on tokenizers that are not word-level): each condition is the full masked
  `generate` over every question (`run_batch` under the condition's hook, or on greyed images);
* fast (the default): batch by batch, the unablated pass keeps its batch's processor outputs and every decoder
  layer's prefill output (`live_fast.record_prefill`, the masking slider's machinery), then every condition of that
  batch runs only what it changes, for the first answer token: a dimension ablation at layer L resumes from the
  kept output of layer L (`live_fast.resumed_logits`: layers after L, final norm, unembedding), greyed patches are
  greyed in the kept `pixel_values` and take one prefill (`live_fast.first_token_logits`). Where a row's first token
  does not decide its answer (not end-of-sequence, a yes-word or a no-word), the batch is re-run with the full pass,
  in the same batch as the full path, so its numbers are the full path's by construction. State is kept for one
  batch at a time (peak memory does not grow with the questions); a batch whose residuals exceed
  ``residual_budget`` runs dimension ablations as a hooked prefill instead of resuming.

What that costs per batch: the unablated generate, one prefill per patch mask (the image changed, so the vision
tower and every layer run again: the floor of this path), and for a dimension ablation only the layers after its
own (at the last layer, as the README's probe: the final norm and unembedding). On the README's study (3 dimension
conditions, 3 masks) that is about 4 prefills per question instead of 7 generates: 2.7x less CPU on its 2,400
questions (`benchmarks/bench_ablate.py --full`), same table.

Mean ablation with the baseline's own layer means (no ``means`` given) needs every batch's unablated pass before
its first ablated one, so those conditions take the full path after the batch loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
from PIL import Image

from vlmrel_core.data.loader import VQASample, load_images
from vlmrel_core.engine.answers import is_correct
from vlmrel_core.engine.layers import resolve_layers
from vlmrel_core.engine.run import run_batch
from vlmrel_core.interventions.ablation import DimensionAblation, replacement_values
from vlmrel_core.interventions.live_fast import (
    DEFAULT_RESIDUAL_BUDGET_BYTES, KeptBatch, can_resume, decided_answers, first_token_logits, first_tokens,
    grey_pixel_values, prepare_batch, record_prefill, residual_bytes, resumed_logits, word_level_tokenizer,
)
from vlmrel_core.interventions.masking import attention_grids, grey_cells, mask_image_patches, patch_masks
from vlmrel_core.progress import Progress, report


@dataclass
class AblationBaseline:
    """One pass over the samples: correctness and answers, plus what the unablated pass also records."""

    correct: np.ndarray  # (n,) bool
    answers: list[str]
    attention_maps: list[np.ndarray] | None = None
    grids: list[tuple[int, int]] | None = None
    state_means: np.ndarray | None = None  # (d,) mean over samples of the layer's mean over real positions


@dataclass(frozen=True)
class StudyCondition:
    """One intervention of the study: ``dims`` of the study's layer set to zero or to the layer means
    (``mode``), or (``which`` set: high / low / random) a share of the image patches greyed by attention."""

    dims: tuple[int, ...] = ()
    mode: str = "zero"
    which: str | None = None
    label: str = ""  # the progress stage of its pass


class _Accumulator:
    """The unablated pass's per-question results, gathered batch by batch."""

    def __init__(self, attentions: bool) -> None:
        self.attentions = attentions
        self.correct: list[bool] = []
        self.answers: list[str] = []
        self.maps: list[np.ndarray] = []
        self.grids: list[tuple[int, int]] = []
        self.state_sum: np.ndarray | None = None
        self.n_states = 0

    def result(self) -> AblationBaseline:
        return AblationBaseline(
            correct=np.asarray(self.correct, dtype=bool), answers=self.answers,
            attention_maps=self.maps if self.attentions else None, grids=self.grids if self.attentions else None,
            state_means=self.state_sum / self.n_states if self.state_sum is not None else None)


def _batch_pass(loaded: Any, batch: Sequence[VQASample], images: list[Image.Image], into: _Accumulator,
                max_new_tokens: int, mean_index: int | None, inputs: dict[str, Any] | None = None) -> None:
    """One batch through `run_batch` (the full generate), its results appended to ``into`` (``inputs``: the
    batch's model inputs, already built)."""
    if mean_index is not None:
        layers: list[int] | None = [mean_index]
        poolings: tuple[str, ...] = ("mean_all",)
    else:
        layers, poolings = [-1], ("last_token",)
    if into.attentions:
        layers = None  # the attention map is averaged over every layer
    record = run_batch(loaded, images, [s.question for s in batch], layers=layers, poolings=poolings,
                       attentions=into.attentions, logit_lens=False, max_new_tokens=max_new_tokens, inputs=inputs)
    into.answers += record.answer
    into.correct += [is_correct(a, s.label) for a, s in zip(record.answer, batch)]
    if into.attentions:
        into.maps += attention_grids(record.attentions, record.image_grids)
        into.grids += record.image_grids
    if mean_index is not None:
        states = record.states["mean_all"][:, record.layers.index(mean_index)].astype(np.float64)
        into.state_sum = states.sum(axis=0) if into.state_sum is None else into.state_sum + states.sum(axis=0)
        into.n_states += states.shape[0]


def evaluate_pass(
    loaded: Any,
    samples: Sequence[VQASample],
    images: Sequence[Image.Image] | None,
    context: Callable[[], ContextManager[None]] | None,
    batch_size: int,
    max_new_tokens: int,
    attentions: bool = False,
    mean_layer: int | None = None,
) -> AblationBaseline:
    """Every sample through the full generate in batches of ``batch_size``, with ``context`` around the pass."""
    if not samples:
        raise ValueError("no samples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images is not None and len(images) != len(samples):
        raise ValueError(f"{len(images)} images for {len(samples)} samples")
    mean_index = resolve_layers(loaded.n_layers, [mean_layer])[0] if mean_layer is not None else None
    into = _Accumulator(attentions)
    with context() if context is not None else nullcontext():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            batch_images = list(images[start : start + batch_size]) if images is not None else load_images(batch)
            _batch_pass(loaded, batch, batch_images, into, max_new_tokens, mean_index)
    return into.result()


# ------------------------------------------------------------------------------------------ every condition


def _ablation(condition: StudyCondition, layer_index: int, means: np.ndarray | None) -> DimensionAblation:
    values = tuple(float(v) for v in np.asarray(means)) if condition.mode == "mean" else None
    return DimensionAblation(layer_index, condition.dims, condition.mode, values)  # type: ignore[arg-type]


def run_conditions(
    loaded: Any,
    samples: list[VQASample],
    images: list[Image.Image],
    layer_index: int,
    conditions: Sequence[StudyCondition],
    *,
    means: np.ndarray | None,
    mask_fraction: float | None,
    seed: int,
    batch_size: int,
    max_new_tokens: int,
    baseline: AblationBaseline | None = None,
    fast: bool = True,
    residual_budget: int = DEFAULT_RESIDUAL_BUDGET_BYTES,
    progress: Progress | None = None,
) -> tuple[AblationBaseline, list[np.ndarray]]:
    """The unablated pass (or the given ``baseline``) and each condition's per-question correctness, in order.

    ``means``: the layer means of mean ablation (None: the baseline's own, which it then records). ``progress``
    gets ``done`` in [0, 1 + len(conditions)] passes over the questions. ``fast=False`` runs every condition as the
    full masked `generate`; the fast path (word-level tokenizers only) gives the same correctness."""
    if not samples:
        raise ValueError("no samples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    attentions = any(c.which is not None for c in conditions)
    if means is None and baseline is not None:
        means = baseline.state_means
    need_means = means is None and any(c.mode == "mean" for c in conditions)
    passes = 1 + len(conditions)
    if not (fast and word_level_tokenizer(loaded.tokenizer)):
        return _full_path(loaded, samples, images, layer_index, conditions, means, mask_fraction, seed, batch_size,
                          max_new_tokens, baseline, attentions, need_means, progress)
    deferred = [i for i, c in enumerate(conditions) if c.mode == "mean" and need_means]
    in_loop = [i for i in range(len(conditions)) if i not in deferred]
    correct: list[list[bool]] = [[] for _ in conditions]
    into = _Accumulator(attentions)
    rngs = {i: np.random.default_rng(seed) for i in in_loop}  # random patches: one draw sequence over all questions
    need_residuals = any(conditions[i].which is None for i in in_loop)
    n_loop = 1 + len(in_loop)
    for start in range(0, len(samples), batch_size):
        stop = min(start + batch_size, len(samples))
        batch, batch_images = samples[start:stop], images[start:stop]
        kept = KeptBatch(prepare_batch(loaded, batch_images, [s.question for s in batch]))
        keep_outputs = need_residuals and residual_bytes(kept.inputs, loaded) <= residual_budget
        if baseline is None:
            with record_prefill(loaded, kept, keep_outputs):
                _batch_pass(loaded, batch, batch_images, into, max_new_tokens,
                            layer_index if need_means else None, kept.inputs)
            maps, grids = into.maps[start:stop], into.grids[start:stop]
        else:
            if keep_outputs:
                with record_prefill(loaded, kept, keep_outputs=True):
                    first_token_logits(loaded, kept.inputs)
            maps = baseline.attention_maps[start:stop] if baseline.attention_maps is not None else None
            grids = baseline.grids[start:stop] if baseline.grids is not None else None
        for i in in_loop:
            correct[i] += _fast_condition(loaded, kept, batch, batch_images, layer_index, conditions[i], means, maps,
                                          grids, mask_fraction, rngs[i], max_new_tokens)
        report(progress, int(n_loop * stop / len(samples)), passes, f"batch {start // batch_size + 1} of "
               f"{-(-len(samples) // batch_size)}, {n_loop} passes")
    base = baseline if baseline is not None else into.result()
    for done, i in enumerate(deferred, start=n_loop + 1):
        spec = _ablation(conditions[i], layer_index, base.state_means)
        correct[i] = evaluate_pass(loaded, samples, images, lambda: spec(loaded), batch_size,
                                   max_new_tokens).correct.tolist()
        report(progress, done, passes, conditions[i].label)
    return base, [np.asarray(c, dtype=bool) for c in correct]


def _fast_condition(
    loaded: Any, kept: KeptBatch, batch: list[VQASample], images: list[Image.Image], layer_index: int,
    condition: StudyCondition, means: np.ndarray | None, maps: list[np.ndarray] | None,
    grids: list[tuple[int, int]] | None, mask_fraction: float | None, rng: np.random.Generator, max_new_tokens: int,
) -> list[bool]:
    """One condition on one batch from the kept state, first answer token only; the batch's full pass where a
    first token does not decide its row's answer."""
    context: Callable[[], ContextManager[None]] | None = None
    if condition.which is None:
        spec = _ablation(condition, layer_index, means)
        context = lambda: spec(loaded)  # noqa: E731
        if can_resume(loaded, kept):
            dims = np.asarray(condition.dims, dtype=np.int64)
            values = replacement_values(spec.means, dims, int(loaded.hidden_size)) if condition.mode == "mean" else None
            tokens = first_tokens(resumed_logits(loaded, kept, layer_index, dims, values))
        else:
            with spec(loaded):
                _, tokens = first_token_logits(loaded, kept.inputs)
    else:
        masks = patch_masks(len(batch), maps, grids, mask_fraction, condition.which, rng)  # type: ignore[arg-type]
        pixels = grey_pixel_values(loaded, kept, images, masks)
        _, tokens = first_token_logits(loaded, {**kept.inputs, "pixel_values": pixels})
    answers = decided_answers(loaded, tokens)
    if any(answer is None for answer in answers):
        if condition.which is not None:
            images = [grey_cells(image, mask) for image, mask in zip(images, masks)]
        return evaluate_pass(loaded, batch, images, context, len(batch), max_new_tokens).correct.tolist()
    return [is_correct(loaded.adapter.normalize(a), s.label) for a, s in zip(answers, batch)]


def _full_path(
    loaded: Any, samples: list[VQASample], images: list[Image.Image], layer_index: int,
    conditions: Sequence[StudyCondition], means: np.ndarray | None, mask_fraction: float | None, seed: int,
    batch_size: int, max_new_tokens: int, baseline: AblationBaseline | None, attentions: bool, need_means: bool,
    progress: Progress | None,
) -> tuple[AblationBaseline, list[np.ndarray]]:
    """Every condition as the full masked generate over all questions (one pass each, after the baseline's)."""
    passes = 1 + len(conditions)
    base = baseline if baseline is not None else evaluate_pass(
        loaded, samples, images, None, batch_size, max_new_tokens, attentions=attentions,
        mean_layer=layer_index if need_means else None)
    report(progress, 1, passes, "baseline")
    layer_means = means if means is not None else base.state_means
    out = []
    for done, condition in enumerate(conditions, start=2):
        if condition.which is None:
            spec = _ablation(condition, layer_index, layer_means)
            out.append(evaluate_pass(loaded, samples, images, lambda: spec(loaded), batch_size, max_new_tokens).correct)
        else:
            masked, _ = mask_image_patches(images, base.attention_maps, base.grids, mask_fraction,  # type: ignore[arg-type]
                                           condition.which, seed=seed)  # type: ignore[arg-type]
            out.append(evaluate_pass(loaded, samples, masked, None, batch_size, max_new_tokens).correct)
        report(progress, done, passes, condition.label)
    return base, out


__all__ = ["AblationBaseline", "StudyCondition", "evaluate_pass", "run_conditions"]
