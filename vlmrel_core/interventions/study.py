"""The intervention study: accuracy with and without an ablation or a patch mask, and the change with a paired CI.

Why paired: each bootstrap resample draws the same questions for the ablated and the unablated run, so the CI
reflects per-question flips, not two independent accuracies. `run_ablation_study` runs every condition for one
model or several side by side and returns one tidy table (`TABLE_COLUMNS`; the CSV that `vlmrel ablate` writes).
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from vlmrel_core.analysis.metrics import bootstrap_replicates, percentile_interval
from vlmrel_core.data.loader import VQASample, load_images
from vlmrel_core.engine.layers import resolve_layers
from vlmrel_core.interventions.ablation import (
    ABLATION_MODES, DimensionAblation, random_dimensions, top_k_dimensions,
)
from vlmrel_core.interventions.masking import MASK_WHICH
from vlmrel_core.interventions.study_passes import AblationBaseline, StudyCondition, evaluate_pass, run_conditions
from vlmrel_core.progress import Progress, report

UNTYPED = "untyped"


# ------------------------------------------------------------------------------------------ evaluation


def _question_type(sample: VQASample) -> str:
    return str(sample.metadata.get("question_type", UNTYPED))


def _as_context(loaded: Any, intervention: Any) -> Callable[[], ContextManager[None]] | None:
    if intervention is None:
        return None
    if isinstance(intervention, DimensionAblation):
        return lambda: intervention(loaded)
    if callable(intervention):
        return intervention
    raise TypeError(f"intervention must be a DimensionAblation or a zero-argument context-manager factory, got {type(intervention).__name__}")


def evaluate_accuracy(
    loaded: Any,
    samples: Sequence[VQASample],
    intervention: DimensionAblation | Callable[[], ContextManager[None]] | None = None,
    images: Sequence[Image.Image] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> np.ndarray:
    """Per-sample correctness (bool array) of the greedy answers, with ``intervention`` active around every call.

    The cheap path the live slider uses: one generate per batch through `run_batch`, capturing only the last
    layer's last token, no attentions and no logit lens. Pass ``images`` (pre-loaded or masked) to skip reading
    PNGs; correctness is `extract.is_correct` on the lenient-normalised answer, as in the extraction cache.
    """
    return evaluate_pass(loaded, samples, images, _as_context(loaded, intervention), batch_size, max_new_tokens).correct


def layer_means(
    loaded: Any,
    samples: Sequence[VQASample],
    layer: int,
    images: Sequence[Image.Image] | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """(hidden_size,) mean of decoder layer ``layer``'s output: mean over each sample's real positions, then over
    samples (the replacement values of mean ablation)."""
    result = evaluate_pass(loaded, samples, images, None, batch_size, max_new_tokens=1, mean_layer=layer)
    return result.state_means


# ------------------------------------------------------------------------------------------ effect and CI


def _as_correct(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if array.dtype != bool:
        if not np.issubdtype(array.dtype, np.number) or not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0/1 or bool")
    return array.astype(np.float64)


def ablation_effect(
    baseline_correct: Any,
    ablated_correct: Any,
    question_types: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Accuracy change (ablated − baseline) in percentage points with a paired bootstrap (1 − alpha) CI.

    Paired: each resample draws the same questions for both runs, so the CI reflects per-question flips, not two
    independent accuracies. One row "all" and one per question type (resampled within the type), with columns
    question_type, n, baseline_acc, ablated_acc, delta_pp, ci_low_pp, ci_high_pp (accuracies in [0, 1]).
    """
    base = _as_correct(baseline_correct, "baseline_correct")
    ablated = _as_correct(ablated_correct, "ablated_correct")
    if base.shape != ablated.shape:
        raise ValueError(f"baseline has {base.size} samples but ablated has {ablated.size}; they must be the same questions")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    groups: list[tuple[str, np.ndarray]] = [("all", np.ones(base.size, dtype=bool))]
    if question_types is not None:
        types = np.asarray([str(t) for t in question_types])
        if types.shape != base.shape:
            raise ValueError(f"{types.size} question types for {base.size} samples")
        groups += [(t, types == t) for t in sorted(set(types.tolist()))]
    rows = []
    for g, (name, selected) in enumerate(groups):
        diff = ablated[selected] - base[selected]
        means = bootstrap_replicates(diff.size, lambda idx: diff[idx].mean(axis=1), n_boot, [seed, g])
        low, high = percentile_interval(means, alpha)
        rows.append({
            "question_type": name,
            "n": int(selected.sum()),
            "baseline_acc": float(base[selected].mean()),
            "ablated_acc": float(ablated[selected].mean()),
            "delta_pp": 100.0 * float(diff.mean()),
            "ci_low_pp": 100.0 * low,
            "ci_high_pp": 100.0 * high,
        })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ the study


TABLE_COLUMNS = [
    "model", "fusion", "layer", "condition", "mode", "k", "n_dims", "fraction", "draw", "question_type", "n",
    "baseline_acc", "ablated_acc", "delta_pp", "ci_low_pp", "ci_high_pp",
]


def _per_model(value: Any, names: list[str], what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{what} has no entry for {missing}")
        return {n: value[n] for n in names}
    return {n: value for n in names}


def run_ablation_study(
    loaded: Any,
    samples: Sequence[VQASample],
    layer: int | Mapping[str, int],
    weights: np.ndarray | Mapping[str, np.ndarray],
    ks: Sequence[int] = (5,),
    random_fraction: float | None = 0.5,
    modes: Sequence[str] = ("zero",),
    means: np.ndarray | Mapping[str, np.ndarray] | None = None,
    mask_fraction: float | None = 0.3,
    n_random_draws: int = 1,
    n_boot: int = 2000,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    images: Sequence[Image.Image] | None = None,
    progress: Progress | None = None,
    baselines: Mapping[str, AblationBaseline] | None = None,
    fast: bool = True,
) -> pd.DataFrame:
    """Accuracy change vs the unablated run for every intervention, as one tidy table.

    ``loaded`` is one model or a mapping name -> model (e.g. {"late_fusion": ..., "early_fusion": ...}) run on the
    same ``samples`` side by side; ``layer``, ``weights`` (and ``means``) are then one value for all or a mapping
    with the same names. Conditions per model: ``top_k`` (each k, each mode), ``random_k`` (zero, drawn outside the
    top-k, ``n_random_draws`` seeds), ``random_fraction`` (zero that share of the layer's dims, None to skip) and
    ``mask_high`` / ``mask_low`` / ``mask_random`` (grey ``mask_fraction`` of the patches by the answer position's
    layer-averaged attention; needs eager attention; None to skip). Mean ablation uses ``means`` or, if absent,
    the layer's mean over these samples from the baseline pass. Rows: one "all" and one per question type.
    ``progress`` counts passes over the samples (baseline + one per condition, per model), staged
    "<model>: baseline", "<model>: top_k k=5 zero"... (``fast``: "<model>: batch 3 of 75, 7 passes").

    The unablated pass runs once per model and every condition is paired with it. ``baselines`` (model name ->
    `ablation_baseline` of the same samples, images, batch size and max_new_tokens) shares it across calls too, e.g.
    one call per k or per batch of conditions: that model's baseline pass is then skipped.

    ``fast`` (word-level tokenizers, e.g. the embedded models): each batch's conditions start from what its unablated
    pass kept and read the answer's first token (`study_passes`); the correctness, and so the table, equals the
    full masked `generate` per condition (``fast=False``).
    """
    models = dict(loaded) if isinstance(loaded, Mapping) else {"model": loaded}
    names = list(models)
    layers = _per_model(layer, names, "layer")
    weight_map = _per_model(weights, names, "weights")
    mean_map = _per_model(means, names, "means") if means is not None else {n: None for n in names}
    for mode in modes:
        if mode not in ABLATION_MODES:
            raise ValueError(f"unknown ablation mode {mode!r}; expected one of {ABLATION_MODES}")
    if mask_fraction is not None and not 0.0 < mask_fraction <= 1.0:
        raise ValueError(f"mask_fraction must be in (0, 1], got {mask_fraction}")
    if random_fraction is not None and not 0.0 < random_fraction <= 1.0:
        raise ValueError(f"random_fraction must be in (0, 1], got {random_fraction}")
    samples = list(samples)
    images = list(images) if images is not None else load_images(samples)
    types = [_question_type(s) for s in samples]
    # every model's conditions first: a bad k or weight vector of the second model fails before the first's passes
    plans = {name: _conditions(name, models[name], layers[name], weight_map[name], ks, modes, n_random_draws,
                               random_fraction, mask_fraction, seed) for name in names}
    for name in names:
        given = (baselines or {}).get(name)
        if given is not None:
            _check_baseline(given, name, len(samples), mask_fraction is not None,
                            "mean" in modes and mean_map[name] is None)
    passes = 1 + len(next(iter(plans.values()))[1])  # the same conditions for every model
    total = passes * len(names)
    report(progress, 0, total, f"{names[0]}: baseline")
    frames = []
    for m_index, name in enumerate(names):
        model = models[name]
        layer_index, rows = plans[name]
        given = (baselines or {}).get(name)

        def step(done: int, _total: int, stage: str = "", offset: int = m_index * passes, model_name: str = name) -> None:
            report(progress, offset + done, total, f"{model_name}: {stage}")

        base, correct = run_conditions(
            model, samples, images, layer_index, [condition for condition, _ in rows], means=mean_map[name],
            mask_fraction=mask_fraction, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
            baseline=given, fast=fast, progress=step)
        fusion = getattr(model.adapter, "fusion", "")
        for salt, ((_, keys), ablated) in enumerate(zip(rows, correct), start=m_index * 10_000):
            effect = ablation_effect(base.correct, ablated, types, n_boot=n_boot, seed=seed * 1_000_003 + salt)
            for column, value in reversed(list(zip(("condition", "mode", "k", "n_dims", "fraction", "draw", "layer"), keys))):
                effect.insert(0, column, value)
            effect.insert(0, "fusion", fusion)
            effect.insert(0, "model", name)
            frames.append(effect)
    table = pd.concat(frames, ignore_index=True)[TABLE_COLUMNS]
    for column in ("layer", "k", "n_dims", "draw"):
        table[column] = table[column].astype("Int64")
    table["fraction"] = table["fraction"].astype(float)
    return table


def _conditions(
    name: str, model: Any, layer: int, weights: np.ndarray, ks: Sequence[int], modes: Sequence[str], n_random_draws: int,
    random_fraction: float | None, mask_fraction: float | None, seed: int,
) -> tuple[int, list[tuple[StudyCondition, tuple[Any, ...]]]]:
    """One model's resolved layer and its conditions in the table's order, each with its table keys (condition,
    mode, k, n_dims, fraction, draw, layer)."""
    hidden = int(model.hidden_size)
    (layer_index,) = resolve_layers(model.n_layers, [layer])
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != hidden:
        raise ValueError(f"{name}: {w.shape[0]} probe weights for hidden size {hidden}")
    rows: list[tuple[StudyCondition, tuple[Any, ...]]] = []
    for k in ks:
        top = top_k_dimensions(w, k)
        for mode in modes:
            rows.append((_dims(top, mode, f"top_k k={k} {mode}"), ("top_k", mode, int(k), int(k), None, None, layer_index)))
        for draw in range(n_random_draws):
            dims = random_dimensions(hidden, k=int(k), seed=seed + 7919 * draw + 1, exclude=top)
            rows.append((_dims(dims, "zero", f"random_k k={k} zero"), ("random_k", "zero", int(k), int(k), None, draw, layer_index)))
    if random_fraction is not None:
        dims = random_dimensions(hidden, fraction=random_fraction, seed=seed + 104729)
        rows.append((_dims(dims, "zero", "random_fraction zero"),
                     ("random_fraction", "zero", None, int(dims.size), float(random_fraction), None, layer_index)))
    if mask_fraction is not None:
        for which in MASK_WHICH:
            rows.append((StudyCondition(which=which, label=f"mask_{which} grey"),
                         (f"mask_{which}", "grey", None, None, float(mask_fraction), None, None)))
    return layer_index, rows


def ablation_baseline(
    loaded: Any,
    samples: Sequence[VQASample],
    layer: int,
    images: Sequence[Image.Image] | None = None,
    *,
    attentions: bool = True,
    means: bool = False,
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> AblationBaseline:
    """The unablated pass every condition of `run_ablation_study` is paired with: per-question correctness, and
    (``attentions``) the answer position's attention maps that rank patches for masking, and (``means``) decoder
    layer ``layer``'s mean state for mean ablation. Compute it once and pass it as ``baselines`` to share it."""
    (layer_index,) = resolve_layers(loaded.n_layers, [layer])
    images = list(images) if images is not None else load_images(samples)
    return evaluate_pass(loaded, samples, images, None, batch_size, max_new_tokens, attentions=attentions,
                         mean_layer=layer_index if means else None)


def _dims(dims: np.ndarray, mode: str, label: str) -> StudyCondition:
    return StudyCondition(dims=tuple(int(d) for d in dims), mode=mode, label=label)


def _check_baseline(base: AblationBaseline, name: str, n: int, attentions: bool, means: bool) -> None:
    if base.correct.shape != (n,):
        raise ValueError(f"{name}: the given baseline has {base.correct.size} questions, the study {n}")
    if attentions and base.attention_maps is None:
        raise ValueError(f"{name}: masking needs the baseline's attention maps (ablation_baseline(..., attentions=True))")
    if means and base.state_means is None:
        raise ValueError(f"{name}: mean ablation needs the baseline's layer means (ablation_baseline(..., means=True))")


def side_by_side(table: pd.DataFrame, decimals: int = 1) -> pd.DataFrame:
    """Wide view for the report: one row per (condition, mode, k, draw, question type), one column per model,
    each cell "Δ pp [low, high]"."""
    keys = ["condition", "mode", "k", "draw", "question_type"]
    wide = table[keys].astype(object).where(table[keys].notna(), "")
    wide["cell"] = [
        f"{d:+.{decimals}f} [{lo:+.{decimals}f}, {hi:+.{decimals}f}]"
        for d, lo, hi in zip(table["delta_pp"], table["ci_low_pp"], table["ci_high_pp"])
    ]
    wide["model"] = table["model"].to_numpy()
    out = wide.pivot(index=keys, columns="model", values="cell")
    out = out.reindex(pd.MultiIndex.from_frame(wide[keys].drop_duplicates()))[list(dict.fromkeys(table["model"]))]
    out.columns.name = None
    return out.reset_index()
