"""Per-call ablation of residual-stream dimensions of one decoder layer, and choosing which dimensions to ablate.

Why per-call hooks behind their own ContextVar: a model shared by many threads (the dashboard's cached model) fires
every registered hook in every thread's forward. An ablation hook acts only when its owner is in the *intervention*
owners of the calling thread's context, so a concurrent call in another thread is never ablated. The set is kept
apart from `capture`'s single active owner on purpose: `run_batch` opens a capture inside an ablation block, and
both must act in that one call (the ablation runs first, so the capture records the ablated stream).

Why rank dimensions by |w| of the probe: the probe is a StandardScaler + logistic-regression pipeline, so its
coefficients are per *standardised* feature: |w_j| is the change in log-odds per one standard deviation of
dimension j, which compares dimensions on one scale. Weights fitted on raw features must be multiplied by the
features' standard deviations first (`top_k_dimensions(..., feature_std=...)`).

Probes are read only through `analysis.probes.load_probe` (`load_ablation_probe` adds the single-layer check).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from vlmrel_core.analysis.probes import PROBE_TENSORS, Probe, ProbeError, load_probe
from vlmrel_core.engine.adapters.base import AdapterError
from vlmrel_core.engine.capture import activate_intervention_owner, intervention_active
from vlmrel_core.engine.layers import resolve_layers

AblationMode = Literal["zero", "mean"]
ABLATION_MODES: tuple[str, ...] = ("zero", "mean")

# Owners of the interventions active in the calling thread's context live in `engine.capture` (the engine must know
# when a call is hooked: `run_batch` then neither reads nor keeps image prefixes).


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


#: The replacement values of a mean ablation, aligned with its dims (`study_passes` resumes with them).
replacement_values = _check_means


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
        if not intervention_active(owner) or dim_index.numel() == 0:
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
        with activate_intervention_owner(owner):
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




# ------------------------------------------------------------------------------------------ the probe to follow


@dataclass(frozen=True)
class AblationProbe:
    """A single-layer probe as an ablation needs it: its standardised coefficients and the layer it reads."""

    probe: Probe
    path: Path

    @property
    def weights(self) -> np.ndarray:
        """(hidden_size,) coefficients on standardised features (rank with `top_k_dimensions`)."""
        return np.asarray(self.probe.coef, dtype=np.float64)

    @property
    def layer(self) -> int:
        return int(self.probe.info.layers[0])


def load_ablation_probe(path: str | Path, loaded: Any | None = None) -> AblationProbe:
    """A probe saved by `Probe.save` (its directory or its probe.safetensors), checked by `load_probe` against
    ``loaded``'s fingerprint and hidden size; a multi-layer probe is refused (its coefficients do not map onto one
    layer's dimensions). Raises ProbeError (a ValueError) naming the problem."""
    path = Path(path)
    directory = path.parent if path.name == PROBE_TENSORS else path
    if path.is_file() and path.name != PROBE_TENSORS:
        raise ProbeError(f"{path}: give a probe directory saved by vlmrel (probe.json + {PROBE_TENSORS}); "
                         "bare weight files (.npy, pickle, other safetensors) are not read")
    probe = load_probe(directory, loaded.fingerprint if loaded is not None else None,
                       _hidden_size(loaded) if loaded is not None else None)
    if probe.info.kind != "single_layer" or len(probe.info.layers) != 1 or probe.coef.shape[0] != probe.info.hidden_size:
        raise ProbeError(f"{directory}: a {probe.info.kind} probe with {probe.coef.shape[0]} features over layers "
                         f"{probe.info.layers}; ablation needs a single-layer probe of the hidden state")
    return AblationProbe(probe, directory)


def ablation_layers(
    probes: Mapping[str, AblationProbe], n_layers: Mapping[str, int], given: Sequence[int] = ()
) -> tuple[dict[str, int], list[str]]:
    """Which layer to ablate per model: the probe's own layer, unless ``given`` (once for all, or once per model in
    ``probes`` order) overrides it. Returns (layer per model, warnings for overrides that differ from the probe's
    layer, compared after resolving negative indices against ``n_layers``)."""
    names = list(probes)
    given = list(given)
    if len(given) not in (0, 1, len(names)):
        raise ValueError(f"give the layer once, once per model, or not at all (read from the probe); got {len(given)} "
                         f"for {len(names)} models")
    layers: dict[str, int] = {}
    warnings: list[str] = []
    for i, name in enumerate(names):
        probe = probes[name]
        if not given:
            layers[name] = probe.layer
            continue
        layer = given[0] if len(given) == 1 else given[i]
        if resolve_layers(n_layers[name], [probe.layer]) != resolve_layers(n_layers[name], [layer]):
            warnings.append(f"{probe.path} is a probe of layer {probe.layer}, ablating layer {layer}")
        layers[name] = layer
    return layers, warnings
