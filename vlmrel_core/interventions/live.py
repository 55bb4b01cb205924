"""Live masking for the dashboard's sliders: one unmasked pass per model kept (answers, correctness, confidence,
the attention maps that rank patches), then each slider change re-runs the same questions with the mask and gives
accuracy and confidence against the unmasked pass with paired bootstrap CIs.

Why its own module: `study.run_ablation_study` runs a fixed grid of conditions for the shipped tables; a slider
needs the pieces apart — a cached baseline, one combined condition (top-k probe dimensions + a random share of
dimensions + greyed patches at once), the answer confidence beside correctness, and one example before/after.
The masking itself is the library's (`ablation.DimensionAblation`, `masking.mask_image_patches`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from vlmrel_core.analysis.metrics import bootstrap_replicates, percentile_interval
from vlmrel_core.data.loader import VQASample
from vlmrel_core.engine.answers import is_correct
from vlmrel_core.engine.run import run_batch
from vlmrel_core.interventions.ablation import DimensionAblation, random_dimensions, top_k_dimensions
from vlmrel_core.interventions.masking import MASK_WHICH, attention_grids, mask_image_patches
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
    """Per question: the greedy answer, whether it is right, and its confidence (max answer-token probability)."""

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


def _pass(
    loaded: Any, samples: Sequence[VQASample], images: Sequence[Image.Image], context: ContextManager[None],
    batch_size: int, max_new_tokens: int, attentions: bool, progress: Progress | None, stage: str,
) -> tuple[PassResult, list[np.ndarray], list[tuple[int, int]]]:
    answers, correct, confidence, maps, grids = [], [], [], [], []
    total = len(samples)
    with context:
        for start in range(0, total, batch_size):
            batch = samples[start : start + batch_size]
            record = run_batch(loaded, list(images[start : start + batch_size]), [s.question for s in batch],
                               layers=None if attentions else [-1], poolings=("last_token",), attentions=attentions,
                               logit_lens=False, max_new_tokens=max_new_tokens)
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
    progress: Progress | None = None,
) -> LiveBaseline:
    """The unmasked pass (with attention, eager) that every slider position is compared with; cache it per model."""
    samples = list(samples)
    if not samples:
        raise ValueError("no questions to run")
    images = [s.load_image() for s in samples]
    result, maps, grids = _pass(loaded, samples, images, nullcontext(), batch_size, max_new_tokens, True, progress,
                                "unmasked pass")
    return LiveBaseline(samples, images, result, maps, grids, int(loaded.hidden_size))


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
    max_new_tokens: int = 8, progress: Progress | None = None,
) -> PassResult:
    """The baseline's questions again with ``settings`` applied (the unmasked result itself when nothing is masked)."""
    if settings.is_identity:
        return baseline.result
    images = baseline.images
    if settings.patch_fraction > 0:
        images, _ = mask_image_patches(images, baseline.attention_maps, baseline.grids, settings.patch_fraction,
                                       settings.patch_which, settings.seed)  # type: ignore[arg-type]
    dims = masked_dimensions(settings, probe_weights, baseline.hidden_size)
    context = DimensionAblation(settings.layer, tuple(int(d) for d in dims))(loaded) if dims.size else nullcontext()
    result, _, _ = _pass(loaded, baseline.samples, images, context, batch_size, max_new_tokens, False, progress,
                         "masked pass")
    return result


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


__all__ = ["EFFECT_COLUMNS", "LiveBaseline", "MaskSettings", "PassResult", "live_baseline", "masked_dimensions",
           "paired_effect", "run_masked"]
