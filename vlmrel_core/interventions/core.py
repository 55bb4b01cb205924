"""Causal interventions: ablate residual-stream dimensions of one decoder layer, or grey out image patches, and
measure the accuracy change against the unablated run with a paired bootstrap CI (overall and per question type).

Why per-call hooks behind their own ContextVar: a model shared by many threads (the dashboard's cached model) fires
every registered hook in every thread's forward. An ablation hook acts only when its owner is in the *intervention*
owners of the calling thread's context, so a concurrent call in another thread is never ablated. The set is kept
apart from `capture`'s single active owner on purpose: `run_batch` opens a capture inside an ablation block, and
both must act in that one call (the ablation runs first, so the capture records the ablated stream).

Why rank dimensions by |w| of the probe: the probe is a StandardScaler + logistic-regression pipeline, so its
coefficients are per *standardised* feature: |w_j| is the change in log-odds per one standard deviation of
dimension j, which compares dimensions on one scale. Weights fitted on raw features must be multiplied by the
features' standard deviations first (`top_k_dimensions(..., feature_std=...)`).
"""

from __future__ import annotations

import contextvars
import itertools
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from vlmrel_core.engine.adapters.base import AdapterError
from vlmrel_core.engine.capture import resolve_layers
from vlmrel_core.data.loader import VQASample
from vlmrel_core.engine.adapters.base import is_correct
from vlmrel_core.engine.run import run_batch

AblationMode = Literal["zero", "mean"]
MaskWhich = Literal["high", "low", "random"]
ABLATION_MODES: tuple[str, ...] = ("zero", "mean")
MASK_WHICH: tuple[str, ...] = ("high", "low", "random")
#: Neutral grey used to blank a patch (the SigLIP mean; CLIP's mean is within 25 levels of it).
GREY: tuple[int, int, int] = (128, 128, 128)
UNTYPED = "untyped"

__all__ = [
    "ABLATION_MODES",
    "MASK_WHICH",
    "GREY",
    "DimensionAblation",
    "ProbeWeights",
    "TABLE_COLUMNS",
    "ablate_dimensions",
    "ablation_effect",
    "attention_grids",
    "evaluate_accuracy",
    "layer_means",
    "load_probe_weights",
    "mask_image_patches",
    "n_masked_patches",
    "random_dimensions",
    "run_ablation_study",
    "side_by_side",
    "top_k_dimensions",
]

# Owners of the ablations active in the calling thread's context (a new thread starts with the empty set).
_ACTIVE_INTERVENTIONS: contextvars.ContextVar[frozenset] = contextvars.ContextVar(
    "vlmrel_active_interventions", default=frozenset()
)


@contextmanager
def _activate_intervention(owner: object) -> Iterator[None]:
    token = _ACTIVE_INTERVENTIONS.set(_ACTIVE_INTERVENTIONS.get() | {owner})
    try:
        yield
    finally:
        _ACTIVE_INTERVENTIONS.reset(token)


def _intervention_active(owner: object) -> bool:
    return owner in _ACTIVE_INTERVENTIONS.get()


# ------------------------------------------------------------------------------------------ dimension ablation


def _check_dims(dims: Sequence[int] | np.ndarray, hidden_size: int) -> np.ndarray:
    array = np.asarray(dims)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"dims must be a 1-D list of dimension indices, got shape {array.shape}")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"dims must be integer indices, got dtype {array.dtype}")
    bad = array[(array < 0) | (array >= hidden_size)]
    if bad.size:
        raise ValueError(f"dims {bad[:5].tolist()} out of range for hidden size {hidden_size} (valid: 0..{hidden_size - 1})")
    if np.unique(array).size != array.size:
        raise ValueError(f"duplicate dims in {array.tolist()[:20]}")
    return array.astype(np.int64)


def _check_means(means: Any, dims: np.ndarray, hidden_size: int) -> np.ndarray:
    """Replacement values aligned with ``dims``: a full (hidden_size,) vector is indexed by dimension number,
    anything else must have one value per entry of ``dims``."""
    if means is None:
        raise ValueError("mode='mean' needs the per-dimension means (e.g. from layer_means(loaded, samples, layer))")
    values = np.asarray(means.detach().cpu() if isinstance(means, torch.Tensor) else means, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"means must be 1-D, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("means contain NaN or infinite values")
    if values.shape[0] == hidden_size:
        return values[dims]
    if values.shape[0] == dims.shape[0]:
        return values
    raise ValueError(f"means has {values.shape[0]} values; expected {hidden_size} (one per dimension) or {dims.shape[0]} (one per ablated dim)")


def _hidden_size(loaded: Any) -> int:
    return int(loaded.hidden_size)


@contextmanager
def ablate_dimensions(
    loaded: Any,
    layer: int,
    dims: Sequence[int] | np.ndarray,
    mode: AblationMode = "zero",
    means: Sequence[float] | np.ndarray | torch.Tensor | None = None,
) -> Iterator[None]:
    """Inside the block, calls made *by this thread* see decoder layer ``layer``'s output (the residual stream)
    with ``dims`` set to 0 (``mode="zero"``) or to ``means`` (``mode="mean"``), at every position, in the prefill
    and every decode step. Other threads using the same model are untouched; the hook is removed on exit.

    ``layer`` is 0-based (negative counts from the end). ``means`` is a (hidden_size,) vector indexed by dimension
    or one value per entry of ``dims``. An empty ``dims`` is a no-op. Nested blocks (several layers) compose.
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; expected one of {ABLATION_MODES}")
    decoder_layers = loaded.adapter.decoder_layers(loaded.model)
    (index,) = resolve_layers(len(decoder_layers), [layer])
    hidden_size = _hidden_size(loaded)
    dim_array = _check_dims(dims, hidden_size)
    values = _check_means(means, dim_array, hidden_size) if mode == "mean" else None
    dim_index = torch.from_numpy(dim_array)
    value_tensor = torch.from_numpy(values) if values is not None else None
    owner = object()

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not _intervention_active(owner) or dim_index.numel() == 0:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor):
            raise AdapterError(f"decoder layer {index} returned {type(hidden).__name__}, not a hidden-state tensor")
        if hidden.shape[-1] != hidden_size:
            raise AdapterError(f"decoder layer {index} output has width {hidden.shape[-1]}, expected hidden size {hidden_size}")
        ablated = hidden.clone()
        where = dim_index.to(hidden.device)
        if value_tensor is None:
            ablated[..., where] = 0
        else:
            ablated[..., where] = value_tensor.to(hidden.device, hidden.dtype)
        return (ablated, *output[1:]) if isinstance(output, tuple) else ablated

    # prepend: the ablation runs before any capture hook on the same layer, so captures see the ablated stream.
    handle = decoder_layers[index].register_forward_hook(hook, prepend=True)
    try:
        with _activate_intervention(owner):
            yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class DimensionAblation:
    """A picklable description of an ablation, entered around every call of `evaluate_accuracy`."""

    layer: int
    dims: tuple[int, ...]
    mode: AblationMode = "zero"
    means: tuple[float, ...] | None = None

    def __call__(self, loaded: Any) -> ContextManager[None]:
        return ablate_dimensions(loaded, self.layer, list(self.dims), self.mode, self.means)


# ------------------------------------------------------------------------------------------ choosing dimensions


def top_k_dimensions(weights: np.ndarray, k: int, feature_std: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` dimensions with the largest |w|, largest first (ties: lower index first).

    ``weights`` are the probe's coefficients on standardised features, shape (hidden_size,). If they were fitted
    on raw features pass ``feature_std`` (per-dimension standard deviations) to put them on that scale first.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 2 and 1 in w.shape:
        w = w.reshape(-1)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty (hidden_size,) vector, got shape {np.shape(weights)}")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or infinite values")
    if feature_std is not None:
        std = np.asarray(feature_std, dtype=np.float64)
        if std.shape != w.shape:
            raise ValueError(f"feature_std has shape {std.shape}, weights {w.shape}")
        w = w * std
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= w.size:
        raise ValueError(f"k must be an integer in 0..{w.size}, got {k!r}")
    order = np.argsort(-np.abs(w), kind="stable")
    return order[: int(k)].astype(np.int64)


def random_dimensions(
    hidden_size: int,
    k: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    exclude: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """A seeded random control: ``k`` dimensions, or ``round(fraction * hidden_size)`` of them (sorted), drawn
    without replacement from those not in ``exclude`` (e.g. the top-k, so "random-k" never ablates a top dim)."""
    if (k is None) == (fraction is None):
        raise ValueError("give exactly one of k or fraction")
    excluded = set(int(i) for i in (exclude if exclude is not None else []))
    pool = np.asarray([i for i in range(hidden_size) if i not in excluded], dtype=np.int64)
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        k = max(1, int(math.floor(fraction * hidden_size + 0.5)))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= pool.size:
        raise ValueError(f"k must be an integer in 0..{pool.size} (hidden size {hidden_size}, {len(excluded)} excluded), got {k!r}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=int(k), replace=False)).astype(np.int64)


# ------------------------------------------------------------------------------------------ image-patch masking


def n_masked_patches(n_cells: int, fraction: float) -> int:
    """round(fraction * n_cells), half up, at least 1: 30% of 576 -> 173, of 256 -> 77, of 64 -> 19."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(n_cells, max(1, int(math.floor(fraction * n_cells + 0.5))))


def _grid_for(grid: Any, i: int, n: int) -> tuple[int, int]:
    if isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(v, (int, np.integer)) for v in grid):
        g = grid
    else:
        grids = list(grid)
        if len(grids) != n:
            raise ValueError(f"{len(grids)} grids for {n} images")
        g = grids[i]
    rows, cols = (int(v) for v in g)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid must be a pair of positive ints (rows, cols), got {g!r}")
    return rows, cols


def mask_image_patches(
    images: Sequence[Image.Image],
    attention_maps: Sequence[np.ndarray] | None,
    grid: tuple[int, int] | Sequence[tuple[int, int]],
    fraction: float = 0.3,
    which: MaskWhich = "high",
    seed: int = 0,
    fill: tuple[int, int, int] = GREY,
) -> tuple[list[Image.Image], list[np.ndarray]]:
    """Grey out the image-space squares of the patch grid with the highest / lowest / random ``fraction`` of the
    answer position's attention; returns (masked copies, boolean (rows, cols) masks).

    ``attention_maps``: per image a (rows, cols) grid or a row-major vector over the image tokens (not needed for
    ``which="random"``). ``grid``: one (rows, cols) for all images or one per image. The grid is laid over the whole
    image, which is exact for processors that resize to a square (the embedded models, PaliGemma) and for square
    images under LLaVA's resize + centre crop. Ties are broken by lower cell index; random draws use one
    generator seeded with ``seed`` over the images in order.
    """
    if which not in MASK_WHICH:
        raise ValueError(f"unknown masking {which!r}; expected one of {MASK_WHICH}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    images = list(images)
    if which != "random":
        if attention_maps is None:
            raise ValueError(f"which={which!r} needs attention maps")
        attention_maps = list(attention_maps)
        if len(attention_maps) != len(images):
            raise ValueError(f"{len(attention_maps)} attention maps for {len(images)} images")
    rng = np.random.default_rng(seed)
    masked_images, masks = [], []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL images, got {type(image).__name__} at index {i}")
        rows, cols = _grid_for(grid, i, len(images))
        n_cells = rows * cols
        n_mask = n_masked_patches(n_cells, fraction)
        if which == "random":
            chosen = rng.choice(n_cells, size=n_mask, replace=False)
        else:
            attn = np.asarray(attention_maps[i], dtype=np.float64)
            if attn.size != n_cells or (attn.ndim == 2 and attn.shape != (rows, cols)) or attn.ndim > 2:
                raise ValueError(f"attention map {i} has shape {attn.shape}; expected ({rows}, {cols}) or ({n_cells},)")
            if not np.isfinite(attn).all():
                raise ValueError(f"attention map {i} contains NaN or infinite values")
            flat = attn.reshape(-1)
            order = np.argsort(-flat if which == "high" else flat, kind="stable")
            chosen = order[:n_mask]
        mask = np.zeros(n_cells, dtype=bool)
        mask[chosen] = True
        mask = mask.reshape(rows, cols)
        rgb = image.convert("RGB")
        pixels = np.array(rgb)
        height, width = pixels.shape[:2]
        ys = np.floor(np.arange(rows + 1) * height / rows + 0.5).astype(int)
        xs = np.floor(np.arange(cols + 1) * width / cols + 0.5).astype(int)
        for r, c in zip(*np.nonzero(mask)):
            pixels[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = fill
        masked_images.append(Image.fromarray(pixels))
        masks.append(mask)
    return masked_images, masks


def attention_grids(attentions: Sequence[np.ndarray], grids: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Per sample: the answer position's attention over image tokens, L1-normalised per layer, averaged over the
    captured layers (the paper's pooled map), laid out row-major on the patch grid."""
    out = []
    for i, (attn, grid) in enumerate(zip(attentions, grids)):
        if grid is None:
            raise ValueError(f"sample {i}: the model's image tokens form no single patch grid (tiled images), "
                             "so patches cannot be masked by attention")
        rows, cols = grid
        attn = np.asarray(attn, dtype=np.float64)
        if attn.ndim == 1:
            attn = attn[None]
        if attn.shape[1] != rows * cols:
            raise ValueError(f"{attn.shape[1]} image tokens do not fill a {rows}x{cols} grid")
        mass = attn.sum(axis=1, keepdims=True)
        if (mass <= 0).any():
            raise ValueError("an attention row over image tokens has zero mass")
        out.append((attn / mass).mean(axis=0).reshape(rows, cols))
    return out


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class _EvalResult:
    correct: np.ndarray  # (n,) bool
    answers: list[str]
    attention_maps: list[np.ndarray] | None = None
    grids: list[tuple[int, int]] | None = None
    state_means: np.ndarray | None = None  # (d,) mean over samples of the layer's mean over real positions


def _question_type(sample: VQASample) -> str:
    return str(sample.metadata.get("question_type", UNTYPED))


def _evaluate(
    loaded: Any,
    samples: Sequence[VQASample],
    images: Sequence[Image.Image] | None,
    context: Callable[[], ContextManager[None]] | None,
    batch_size: int,
    max_new_tokens: int,
    attentions: bool = False,
    mean_layer: int | None = None,
) -> _EvalResult:
    if not samples:
        raise ValueError("no samples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images is not None and len(images) != len(samples):
        raise ValueError(f"{len(images)} images for {len(samples)} samples")
    if mean_layer is not None:
        mean_index = resolve_layers(loaded.n_layers, [mean_layer])[0]
        layers: list[int] | None = [mean_index]
        poolings: tuple[str, ...] = ("mean_all",)
    else:
        layers, poolings = [-1], ("last_token",)
    if attentions:
        layers = None  # the attention map is averaged over every layer
        poolings = ("mean_all",) if mean_layer is not None else ("last_token",)
    correct, answers, maps, grids = [], [], [], []
    state_sum, n_states = None, 0
    with context() if context is not None else nullcontext():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            batch_images = list(images[start : start + batch_size]) if images is not None else [s.load_image() for s in batch]
            record = run_batch(loaded, batch_images, [s.question for s in batch], layers=layers, poolings=poolings,
                               attentions=attentions, logit_lens=False, max_new_tokens=max_new_tokens)
            answers += record.answer
            correct += [is_correct(a, s.label) for a, s in zip(record.answer, batch)]
            if attentions:
                maps += attention_grids(record.attentions, record.image_grids)
                grids += record.image_grids
            if mean_layer is not None:
                position = record.layers.index(mean_index)
                states = record.states["mean_all"][:, position].astype(np.float64)
                state_sum = states.sum(axis=0) if state_sum is None else state_sum + states.sum(axis=0)
                n_states += states.shape[0]
    return _EvalResult(
        correct=np.asarray(correct, dtype=bool),
        answers=answers,
        attention_maps=maps if attentions else None,
        grids=grids if attentions else None,
        state_means=state_sum / n_states if state_sum is not None else None,
    )


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
    return _evaluate(loaded, samples, images, _as_context(loaded, intervention), batch_size, max_new_tokens).correct


def layer_means(
    loaded: Any,
    samples: Sequence[VQASample],
    layer: int,
    images: Sequence[Image.Image] | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """(hidden_size,) mean of decoder layer ``layer``'s output: mean over each sample's real positions, then over
    samples (the replacement values of mean ablation)."""
    result = _evaluate(loaded, samples, images, None, batch_size, max_new_tokens=1, mean_layer=layer)
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


def _paired_bootstrap(diff: np.ndarray, n_boot: int, rng: np.random.Generator, alpha: float) -> tuple[float, float]:
    n = diff.size
    block = max(1, min(n_boot, 2_000_000 // max(n, 1)))
    means = []
    drawn = 0
    while drawn < n_boot:
        size = min(block, n_boot - drawn)
        means.append(diff[rng.integers(0, n, size=(size, n))].mean(axis=1))
        drawn += size
    low, high = np.quantile(np.concatenate(means), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


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
        low, high = _paired_bootstrap(diff, n_boot, np.random.default_rng([seed, g]), alpha)
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


# ------------------------------------------------------------------------------------------ probe weights


@dataclass(frozen=True)
class ProbeWeights:
    weights: np.ndarray  # (hidden_size,) coefficients on standardised features
    layer: int | None
    metadata: dict[str, Any]
    path: Path


def _saved_probe_dir(path: Path) -> Path | None:
    """The directory of a probe saved by `probes.Probe.save` (probe.json + probe.safetensors), if ``path`` is one."""
    directory = path if path.is_dir() else path.parent
    if (directory / "probe.json").is_file() and (directory / "probe.safetensors").is_file():
        if path.is_dir() or path.name == "probe.safetensors":
            return directory
    return None


def _find_probe_file(path: Path) -> Path:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: probe weights are read from safetensors only (no pickle / .npy)")
        return path
    if not path.is_dir():
        raise ValueError(f"probe weights not found: {path}")
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        names = ", ".join(f.name for f in files) or "none"
        raise ValueError(f"{path}: expected exactly one .safetensors probe file, found {names}")
    return files[0]


def _probe_metadata(file: Path) -> dict[str, Any]:
    import json

    from safetensors import safe_open

    meta: dict[str, Any] = {}
    with safe_open(str(file), framework="numpy") as handle:
        meta.update(handle.metadata() or {})
    json_path = file.with_suffix(".json")
    if json_path.is_file():
        try:
            loaded = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{json_path}: not valid JSON ({err.msg})") from err
        if isinstance(loaded, dict):
            meta.update(loaded)
    return meta


def _single_layer(layers: Any, layer: Any, where: Path) -> int | None:
    if isinstance(layers, list) and layers:
        if len(layers) != 1:
            raise ValueError(f"{where}: the probe reads {len(layers)} layers {layers}; ablation needs a single-layer probe")
        return int(layers[0])
    try:
        return int(layer) if layer is not None else None
    except (TypeError, ValueError):
        return None


def load_probe_weights(path: str | Path, loaded: Any | None = None) -> ProbeWeights:
    """The probe's coefficient vector on standardised features, and the layer it reads.

    ``path``: a probe directory written by `probes.Probe.save` (loaded through `probes.load_probe`, which checks the
    checksum and, given ``loaded``, the model fingerprint and hidden size), or any safetensors file / directory
    holding one, whose tensor ``coef`` is read (metadata from a same-named .json beside it, if any). Never pickle.
    A multi-layer probe is refused: its coefficients do not map onto one layer's dimensions.
    """
    path = Path(path)
    saved = _saved_probe_dir(path)
    if saved is not None:
        from vlmrel_core.analysis.probes import load_probe

        probe = load_probe(saved, loaded.fingerprint if loaded is not None else None,
                           _hidden_size(loaded) if loaded is not None else None)
        info = probe.info.model_dump()
        if probe.info.kind != "single_layer" or probe.coef.shape[0] != probe.info.hidden_size:
            raise ValueError(f"{saved}: a {probe.info.kind} probe with {probe.coef.shape[0]} features over layers "
                             f"{probe.info.layers}; ablation needs a single-layer probe of the hidden state")
        return ProbeWeights(weights=np.asarray(probe.coef, dtype=np.float64), layer=_single_layer(probe.info.layers, None, saved),
                            metadata=info, path=saved / "probe.safetensors")

    from safetensors.numpy import load_file

    file = _find_probe_file(path)
    try:
        tensors = load_file(str(file))
    except Exception as err:  # safetensors raises several types for damaged files
        raise ValueError(f"cannot read {file}: damaged or not a safetensors file ({err})") from err
    if "coef" not in tensors:
        raise ValueError(f"{file}: no 'coef' tensor (found {sorted(tensors)})")
    coef = np.asarray(tensors["coef"], dtype=np.float64)
    if coef.ndim == 2 and coef.shape[0] == 1:
        coef = coef[0]
    if coef.ndim != 1:
        raise ValueError(f"{file}: 'coef' has shape {coef.shape}; expected one binary probe's (hidden_size,) vector")
    if not np.isfinite(coef).all():
        raise ValueError(f"{file}: 'coef' holds NaN or infinite values")
    meta = _probe_metadata(file)
    layer = _single_layer(meta.get("layers"), meta.get("layer"), file)
    if loaded is not None:
        fingerprint = meta.get("model_fingerprint", meta.get("fingerprint"))
        if fingerprint and str(fingerprint) != str(loaded.fingerprint):
            raise ValueError(f"{file}: model fingerprint mismatch: the probe was trained on model {fingerprint!r}, "
                             f"this model is {loaded.fingerprint!r}")
        hidden = _hidden_size(loaded)
        if coef.shape[0] != hidden:
            raise ValueError(f"{file}: probe has {coef.shape[0]} weights but the model's hidden size is {hidden} "
                             "(a multi-layer probe, or a probe of another model)")
    return ProbeWeights(weights=coef, layer=layer, metadata=meta, path=file)


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
) -> pd.DataFrame:
    """Accuracy change vs the unablated run for every intervention, as one tidy table.

    ``loaded`` is one model or a mapping name -> model (e.g. {"late_fusion": ..., "early_fusion": ...}) run on the
    same ``samples`` side by side; ``layer``, ``weights`` (and ``means``) are then one value for all or a mapping
    with the same names. Conditions per model: ``top_k`` (each k, each mode), ``random_k`` (zero, drawn outside the
    top-k, ``n_random_draws`` seeds), ``random_fraction`` (zero that share of the layer's dims, None to skip) and
    ``mask_high`` / ``mask_low`` / ``mask_random`` (grey ``mask_fraction`` of the patches by the answer position's
    layer-averaged attention; needs eager attention; None to skip). Mean ablation uses ``means`` or, if absent,
    the layer's mean over these samples from the baseline pass. Rows: one "all" and one per question type.
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
    if images is None:
        images = [s.load_image() for s in samples]
    types = [_question_type(s) for s in samples]
    frames = []
    for m_index, name in enumerate(names):
        model = models[name]
        hidden = _hidden_size(model)
        (layer_index,) = resolve_layers(model.n_layers, [layers[name]])
        w = np.asarray(weight_map[name], dtype=np.float64).reshape(-1)
        if w.shape[0] != hidden:
            raise ValueError(f"{name}: {w.shape[0]} probe weights for hidden size {hidden}")
        for k in ks:
            top_k_dimensions(w, k)  # validate every k before the expensive passes
        need_means = "mean" in modes and mean_map[name] is None
        base = _evaluate(model, samples, images, None, batch_size, max_new_tokens,
                         attentions=mask_fraction is not None, mean_layer=layer_index if need_means else None)
        layer_mean = mean_map[name] if mean_map[name] is not None else base.state_means
        fusion = getattr(model.adapter, "fusion", "")

        def add(condition: str, mode: str, correct: np.ndarray, k: int | None, n_dims: int | None,
                fraction: float | None, draw: int | None, at_layer: int | None, salt: int) -> None:
            effect = ablation_effect(base.correct, correct, types, n_boot=n_boot, seed=seed * 1_000_003 + salt)
            effect.insert(0, "draw", draw)
            effect.insert(0, "fraction", fraction)
            effect.insert(0, "n_dims", n_dims)
            effect.insert(0, "k", k)
            effect.insert(0, "mode", mode)
            effect.insert(0, "condition", condition)
            effect.insert(0, "layer", at_layer)
            effect.insert(0, "fusion", fusion)
            effect.insert(0, "model", name)
            frames.append(effect)

        def ablated(dims: np.ndarray, mode: str) -> np.ndarray:
            spec = DimensionAblation(layer_index, tuple(int(d) for d in dims), mode,
                                     tuple(float(v) for v in np.asarray(layer_mean)) if mode == "mean" else None)
            return _evaluate(model, samples, images, lambda: spec(model), batch_size, max_new_tokens).correct

        salt = itertools.count(m_index * 10_000)
        for k in ks:
            top = top_k_dimensions(w, k)
            for mode in modes:
                add("top_k", mode, ablated(top, mode), int(k), int(k), None, None, layer_index, next(salt))
            for draw in range(n_random_draws):
                dims = random_dimensions(hidden, k=int(k), seed=seed + 7919 * draw + 1, exclude=top)
                add("random_k", "zero", ablated(dims, "zero"), int(k), int(k), None, draw, layer_index, next(salt))
        if random_fraction is not None:
            dims = random_dimensions(hidden, fraction=random_fraction, seed=seed + 104729)
            add("random_fraction", "zero", ablated(dims, "zero"), None, int(dims.size), float(random_fraction), None,
                layer_index, next(salt))
        if mask_fraction is not None:
            for which in MASK_WHICH:
                masked, _ = mask_image_patches(images, base.attention_maps, base.grids, mask_fraction, which, seed=seed)
                correct = _evaluate(model, samples, masked, None, batch_size, max_new_tokens).correct
                add(f"mask_{which}", "grey", correct, None, None, float(mask_fraction), None, None, next(salt))
    table = pd.concat(frames, ignore_index=True)[TABLE_COLUMNS]
    for column in ("layer", "k", "n_dims", "draw"):
        table[column] = table[column].astype("Int64")
    table["fraction"] = table["fraction"].astype(float)
    return table


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
