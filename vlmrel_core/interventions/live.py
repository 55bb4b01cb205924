"""Live masking for the dashboard's sliders: one unmasked pass per model kept (answers, correctness, confidence,
the attention maps that rank patches), then each slider change re-runs the same questions with the mask and gives
accuracy and confidence against the unmasked pass with paired bootstrap CIs.

Why its own module: `study.run_ablation_study` runs a fixed grid of conditions for the shipped tables; a slider
needs the pieces apart — a cached baseline, one combined condition (top-k probe dimensions + a random share of
dimensions + greyed patches at once), the answer confidence beside correctness, and one example before/after.
The masking itself is the library's (`ablation.DimensionAblation`, `masking.mask_image_patches`); a change re-runs
only what the mask alters (`live_fast`: kept processor outputs and residual stream, first answer token only), and
`run_masked(..., fast=False)` is the full masked `generate` it equals.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from vlmrel_core.analysis.metrics import bootstrap_replicates, percentile_interval
from vlmrel_core.data.loader import VQASample, load_images
from vlmrel_core.engine.answers import is_correct
from vlmrel_core.engine.run import run_batch
from vlmrel_core.interventions.ablation import DimensionAblation, random_dimensions, top_k_dimensions
from vlmrel_core.interventions.live_fast import (
    DEFAULT_RESIDUAL_BUDGET_BYTES, KeptBatch, answer_confidence, can_resume, decided_answers, first_token_logits,
    first_tokens, grey_pixel_values, prepare_batch, record_prefill, residual_bytes, resumed_logits,
)
from vlmrel_core.interventions.masking import MASK_WHICH, attention_grids, grey_cells, mask_image_patches, patch_masks
from vlmrel_core.progress import Progress, report

EFFECT_COLUMNS = ("metric", "n", "unmasked", "masked", "delta", "ci_low", "ci_high")


@dataclass(frozen=True)
class MaskSettings:
    """One slider position: zero the top-k probe dimensions and a random share of the others at ``layer``, and
    grey a share of the image patches ranked by the unmasked pass's attention ('high' = most attended)."""

    layer: int
    top_k: int = 0
    random_fraction: float = 0.0
    patch_fraction: float = 0.0
    patch_which: str = "high"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.random_fraction < 1.0:
            raise ValueError(f"random_fraction must be in [0, 1), got {self.random_fraction}")
        if not 0.0 <= self.patch_fraction <= 1.0:
            raise ValueError(f"patch_fraction must be in [0, 1], got {self.patch_fraction}")
        if self.patch_which not in MASK_WHICH:
            raise ValueError(f"patch_which must be one of {MASK_WHICH}, got {self.patch_which!r}")

    @property
    def is_identity(self) -> bool:
        return self.top_k == 0 and self.random_fraction == 0.0 and self.patch_fraction == 0.0


@dataclass(frozen=True)
class PassResult:
    """Per question: the greedy answer, whether it is right, and its confidence (max answer-token probability).

    A fast masked pass (`run_masked`) keeps only the answer's first word where that word decides it ("no" for
    "no no no"): correctness and confidence are those of the full answer; `masked_answer` gives one full text."""

    answers: list[str]
    correct: np.ndarray
    confidence: np.ndarray


@dataclass(frozen=True)
class LiveBaseline:
    """The unmasked pass over fixed questions, with their images in memory and the attention maps that rank patches."""

    samples: list[VQASample]
    images: list[Image.Image]
    result: PassResult
    attention_maps: list[np.ndarray]
    grids: list[tuple[int, int]]
    hidden_size: int
    batch_size: int = 64
    kept: list[KeptBatch] | None = None  # per batch: inputs and prefill residual stream (`live_fast`); None: full passes


def _pass(
    loaded: Any, samples: Sequence[VQASample], images: Sequence[Image.Image], context: ContextManager[None],
    batch_size: int, max_new_tokens: int, attentions: bool, progress: Progress | None, stage: str,
    kept: list[KeptBatch] | None = None, residual_budget: int = 0,
) -> tuple[PassResult, list[np.ndarray], list[tuple[int, int]]]:
    """Full passes (`run_batch`); with ``kept`` a list, each batch's inputs and prefill are kept there as well."""
    answers, correct, confidence, maps, grids = [], [], [], [], []
    total = len(samples)
    with context:
        for start in range(0, total, batch_size):
            batch = samples[start : start + batch_size]
            batch_images, questions = list(images[start : start + batch_size]), [s.question for s in batch]
            recorder: ContextManager[None] = nullcontext()
            if kept is not None:
                kept.append(KeptBatch(prepare_batch(loaded, batch_images, questions)))
                residual_budget -= residual_bytes(kept[-1].inputs, loaded)
                recorder = record_prefill(loaded, kept[-1], keep_outputs=residual_budget >= 0)
            with recorder:
                record = run_batch(loaded, batch_images, questions, layers=None if attentions else [-1],
                                   poolings=("last_token",), attentions=attentions, logit_lens=False,
                                   max_new_tokens=max_new_tokens)
            answers += record.answer_text
            correct += [is_correct(a, s.label) for a, s in zip(record.answer, batch)]
            confidence += np.asarray(record.output["max_answer_prob"], dtype=np.float64).tolist()
            if attentions:
                maps += attention_grids(record.attentions, record.image_grids)
                grids += record.image_grids
            report(progress, min(start + batch_size, total), total, stage)
    return PassResult(answers, np.asarray(correct, dtype=bool), np.asarray(confidence)), maps, grids


def live_baseline(
    loaded: Any, samples: Sequence[VQASample], batch_size: int = 64, max_new_tokens: int = 8,
    progress: Progress | None = None, residual_budget: int = DEFAULT_RESIDUAL_BUDGET_BYTES,
) -> LiveBaseline:
    """The unmasked pass (with attention, eager) that every slider position is compared with; cache it per model.
    It also keeps each batch's model inputs and, while within ``residual_budget`` bytes, every decoder layer's
    prefill output, which the fast masked passes start from."""
    samples = list(samples)
    if not samples:
        raise ValueError("no questions to run")
    images = load_images(samples)
    kept: list[KeptBatch] = []
    result, maps, grids = _pass(loaded, samples, images, nullcontext(), batch_size, max_new_tokens, True, progress,
                                "unmasked pass", kept, residual_budget)
    return LiveBaseline(samples, images, result, maps, grids, int(loaded.hidden_size), batch_size, kept)


def masked_dimensions(settings: MaskSettings, probe_weights: np.ndarray, hidden_size: int) -> np.ndarray:
    """The dimensions zeroed: the top-k by |probe weight|, plus a random share of the remaining ones (sorted)."""
    top = top_k_dimensions(probe_weights, settings.top_k) if settings.top_k else np.zeros(0, dtype=np.int64)
    if settings.random_fraction > 0:
        n_random = int(np.floor(settings.random_fraction * hidden_size + 0.5))
        n_random = min(max(n_random, 1), hidden_size - top.size)
        extra = random_dimensions(hidden_size, k=n_random, seed=settings.seed, exclude=top)
    else:
        extra = np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([top, extra])).astype(np.int64)


def run_masked(
    loaded: Any, baseline: LiveBaseline, settings: MaskSettings, probe_weights: np.ndarray, batch_size: int = 64,
    max_new_tokens: int = 8, progress: Progress | None = None, fast: bool = True,
) -> PassResult:
    """The baseline's questions again with ``settings`` applied (the unmasked result itself when nothing is masked).

    ``fast`` (when the baseline kept its inputs): only what the mask changes is re-run, for the first answer token
    (`live_fast`); rows whose first token does not decide the answer get the full pass. ``fast=False``: the full
    masked `generate` of every question (what the fast pass equals; ``batch_size`` applies to it only)."""
    if settings.is_identity:
        return baseline.result
    if fast and baseline.kept:
        return _fast_masked(loaded, baseline, settings, probe_weights, max_new_tokens, progress)
    images = baseline.images
    if settings.patch_fraction > 0:
        images, _ = mask_image_patches(images, baseline.attention_maps, baseline.grids, settings.patch_fraction,
                                       settings.patch_which, settings.seed)  # type: ignore[arg-type]
    dims = masked_dimensions(settings, probe_weights, baseline.hidden_size)
    context = DimensionAblation(settings.layer, tuple(int(d) for d in dims))(loaded) if dims.size else nullcontext()
    result, _, _ = _pass(loaded, baseline.samples, images, context, batch_size, max_new_tokens, False, progress,
                         "masked pass")
    return result


def _fast_masked(
    loaded: Any, baseline: LiveBaseline, settings: MaskSettings, probe_weights: np.ndarray, max_new_tokens: int,
    progress: Progress | None,
) -> PassResult:
    dims = masked_dimensions(settings, probe_weights, baseline.hidden_size)
    masks = (patch_masks(len(baseline.images), baseline.attention_maps, baseline.grids, settings.patch_fraction,
                         settings.patch_which, settings.seed)  # type: ignore[arg-type]
             if settings.patch_fraction > 0 else None)
    ablation = DimensionAblation(settings.layer, tuple(int(d) for d in dims)) if dims.size else None
    size, total = baseline.batch_size, len(baseline.samples)
    answers: list[str | None] = []
    confidence: list[np.ndarray] = []
    for b, kept in enumerate(baseline.kept or []):
        rows = slice(b * size, min((b + 1) * size, total))
        if masks is None and can_resume(loaded, kept):
            logits = resumed_logits(loaded, kept, settings.layer, dims)
            tokens = first_tokens(logits)
        else:
            inputs = dict(kept.inputs)
            if masks is not None:
                inputs["pixel_values"] = grey_pixel_values(loaded, kept, baseline.images[rows], masks[rows])
            with ablation(loaded) if ablation is not None else nullcontext():
                logits, tokens = first_token_logits(loaded, inputs)
        answers += decided_answers(loaded, tokens)
        confidence.append(answer_confidence(loaded, logits))
        report(progress, rows.stop, total, "masked pass")
    scores = np.concatenate(confidence)
    undecided = [i for i, a in enumerate(answers) if a is None]
    if undecided:  # the first token does not settle the answer: the full masked generate for those rows
        images = [grey_cells(baseline.images[i], masks[i]) if masks is not None else baseline.images[i]
                  for i in undecided]
        full, _, _ = _pass(loaded, [baseline.samples[i] for i in undecided], images,
                           ablation(loaded) if ablation is not None else nullcontext(), size, max_new_tokens, False,
                           None, "masked pass")
        for j, i in enumerate(undecided):
            answers[i] = full.answers[j]
            scores[i] = full.confidence[j]
    texts = [str(a) for a in answers]
    correct = np.asarray([is_correct(loaded.adapter.normalize(t), s.label) for t, s in zip(texts, baseline.samples)],
                         dtype=bool)
    return PassResult(texts, correct, scores)


def run_masked_in_parallel(
    jobs: Mapping[str, tuple[Any, LiveBaseline, MaskSettings, np.ndarray]],
) -> dict[str, PassResult]:
    """`run_masked` for several models (label -> (loaded, baseline, settings, probe weights)), each in its own
    thread: the page compares two models per change, and two small models side by side keep two cores busy where
    one model's intra-op threads do not (measured on the shared 2-core machine: ~1.7x less wall time than one
    after the other). Safe on shared models: ablation hooks act only in the thread that opened them."""
    if len(jobs) <= 1:
        return {label: run_masked(*job) for label, job in jobs.items()}
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="vlmrel-masking") as pool:
        futures = {label: pool.submit(run_masked, *job) for label, job in jobs.items()}
        return {label: future.result() for label, future in futures.items()}


def masked_answer(
    loaded: Any, baseline: LiveBaseline, settings: MaskSettings, probe_weights: np.ndarray, index: int,
    max_new_tokens: int = 8,
) -> tuple[str, float]:
    """One question's full masked answer text and confidence (the page's before/after example): the same mask as
    `run_masked` (the patch draws are made over all questions, as there), one full `generate`."""
    if settings.is_identity:
        return baseline.result.answers[index], float(baseline.result.confidence[index])
    image = baseline.images[index]
    if settings.patch_fraction > 0:
        masks = patch_masks(len(baseline.images), baseline.attention_maps, baseline.grids, settings.patch_fraction,
                            settings.patch_which, settings.seed)  # type: ignore[arg-type]
        image = grey_cells(image, masks[index])
    dims = masked_dimensions(settings, probe_weights, baseline.hidden_size)
    context = DimensionAblation(settings.layer, tuple(int(d) for d in dims))(loaded) if dims.size else nullcontext()
    result, _, _ = _pass(loaded, [baseline.samples[index]], [image], context, 1, max_new_tokens, False, None,
                         "masked example")
    return result.answers[0], float(result.confidence[0])


def paired_effect(unmasked: PassResult, masked: PassResult, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> pd.DataFrame:
    """Accuracy and mean confidence, unmasked vs masked, and their change with a paired bootstrap (1 − alpha) CI
    (each resample draws the same questions for both passes)."""
    if unmasked.correct.shape != masked.correct.shape:
        raise ValueError(f"{unmasked.correct.size} unmasked vs {masked.correct.size} masked answers: not the same questions")
    rows = []
    for g, (metric, before, after) in enumerate((
        ("accuracy", unmasked.correct.astype(float), masked.correct.astype(float)),
        ("confidence", unmasked.confidence, masked.confidence),
    )):
        diff = after - before
        replicates = bootstrap_replicates(diff.size, lambda idx: diff[idx].mean(axis=1), n_boot, [seed, g])
        low, high = percentile_interval(replicates, alpha)
        rows.append({"metric": metric, "n": int(diff.size), "unmasked": float(before.mean()), "masked": float(after.mean()),
                     "delta": float(diff.mean()), "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))


__all__ = ["EFFECT_COLUMNS", "LiveBaseline", "MaskSettings", "PassResult", "live_baseline", "masked_answer", "masked_dimensions",
           "paired_effect", "run_masked", "run_masked_in_parallel"]
