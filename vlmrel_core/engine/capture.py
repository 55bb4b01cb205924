"""Per-call capture of decoder-layer hidden states (and attentions) during ONE prefill pass.

Why hooks that pool inside the call: pooling in the hook means a 7B model never holds L x seq x d activations,
and reading the layer outputs ourselves gives the same pre-final-norm residual stream for every layer (the last
entry of `output_hidden_states` has the final norm applied, the others do not).

Why a ContextVar guard: a model shared by many threads (Streamlit's `st.cache_resource`) fires every registered
hook in every thread's forward. Each hook checks that the capture it belongs to is the one active in the calling
thread's context, so concurrent calls never see each other's activations. Hooks are removed when the call ends.
"""

from __future__ import annotations

import contextvars
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from vlmrel_core.engine.adapters.base import AdapterError, VLMAdapter
from vlmrel_core.engine.layers import POOLINGS, resolve_layers

Pooling = Literal["last_token", "mean_all", "mean_image", "mean_text"]

_ACTIVE: contextvars.ContextVar[object | None] = contextvars.ContextVar("vlmrel_active_hook_owner", default=None)


@contextmanager
def activate(owner: object) -> Iterator[None]:
    """Mark ``owner`` as the hook owner for the calling thread's context (used by capture and interventions)."""
    token = _ACTIVE.set(owner)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def is_active(owner: object) -> bool:
    return _ACTIVE.get() is owner


# Owners of the interventions (ablation hooks, recording hooks) active in the calling thread's context; a new thread
# starts with the empty set. Kept here so the engine can tell a hooked call from a plain one.
_INTERVENTIONS: contextvars.ContextVar[frozenset] = contextvars.ContextVar("vlmrel_active_interventions", default=frozenset())


@contextmanager
def activate_intervention_owner(owner: object) -> Iterator[None]:
    """Mark ``owner``'s intervention as active for the calling thread's context for the block."""
    token = _INTERVENTIONS.set(_INTERVENTIONS.get() | {owner})
    try:
        yield
    finally:
        _INTERVENTIONS.reset(token)


def active_intervention_owners() -> frozenset:
    """The interventions active in the calling thread's context (empty: the model runs as loaded)."""
    return _INTERVENTIONS.get()


def intervention_active(owner: object) -> bool:
    """Whether ``owner``'s intervention is active in the calling thread's context (its hooks act only then)."""
    return owner in _INTERVENTIONS.get()


@dataclass(frozen=True)
class TokenLayout:
    """Where things are in a (left- or right-) padded batch, derived from input_ids, never from fixed counts."""

    attention_mask: torch.Tensor  # (b, s) bool: real tokens
    image_mask: torch.Tensor  # (b, s) bool: image-token positions
    last_index: torch.Tensor  # (b,) index of the last real prompt token

    @classmethod
    def from_inputs(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int) -> "TokenLayout":
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_index = torch.where(mask, positions, -1).amax(dim=1)
        if bool((last_index < 0).any()):
            raise ValueError("a sample in the batch has no real tokens (attention mask all zero)")
        return cls(attention_mask=mask, image_mask=(input_ids == image_token_id) & mask, last_index=last_index)

    @property
    def image_token_counts(self) -> list[int]:
        return self.image_mask.sum(dim=1).tolist()


@dataclass
class CaptureResult:
    """Filled during the call: pooled states per pooling, (b, n_layers, d) float32 on CPU, in `layers` order."""

    layers: list[int]
    poolings: tuple[str, ...]
    states: dict[str, torch.Tensor] = field(default_factory=dict)
    attentions: list[np.ndarray] | None = None  # per sample: (n_layers, n_image_tokens), head-averaged
    prefix_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # with PrefixSums: layer -> (b, 3, d)
    n_forward_calls: int = 0  # top-level model calls made inside the block (prefill + decode steps)


def _pool(hidden: torch.Tensor, layout: TokenLayout, pooling: str) -> torch.Tensor:
    """One pooling of one layer's (b, s, d) output (reference form; `capture` pools all poolings in one product)."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    weights = _pooling_weights(layout, (pooling,), hidden.device)
    return torch.bmm(weights, hidden.float()).squeeze(1)


def _pooling_weights(layout: TokenLayout, poolings: Sequence[str], device: torch.device) -> torch.Tensor:
    """(b, P, s) float32: row p of sample i averages (or picks, for last_token) the tokens pooling p reads.

    Why one matrix: every pooling of a layer becomes ONE batched matmul instead of a mask/sum/divide per pooling,
    built once per call instead of once per layer (the per-op overhead dominated batch-1 capture)."""
    weights = _pooling_rows(layout, poolings)  # one normalisation for every pooling (elementwise: the same values)
    return (weights / weights.sum(dim=2, keepdim=True).clamp_min(1.0)).to(device)


def pooling_counts(layout: TokenLayout, poolings: Sequence[str]) -> torch.Tensor:
    """(b, P) how many tokens each pooling of each sample averages (the divisor of `_pooling_weights`)."""
    return _pooling_rows(layout, poolings).sum(dim=2).clamp_min(1.0)


#: The token sets whose prefix sums a shared image prefix keeps (mean poolings; last_token is never in the prefix).
PREFIX_SETS: tuple[str, ...] = ("mean_all", "mean_image", "mean_text")


def _pooling_rows(layout: TokenLayout, poolings: Sequence[str]) -> torch.Tensor:
    """(b, P, s) float32 0/1: which tokens pooling p reads for sample i."""
    real = layout.attention_mask.cpu()
    image = layout.image_mask.cpu()
    rows = []
    for pooling in poolings:
        if pooling == "last_token":
            rows.append(torch.arange(real.shape[1]) == layout.last_index.cpu()[:, None])
        elif pooling == "mean_all":
            rows.append(real)
        elif pooling == "mean_image":
            rows.append(image)
        elif pooling == "mean_text":
            rows.append(real & ~image)
        else:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    return torch.stack(rows, dim=1).float()


@dataclass(frozen=True)
class SharedPrefix:
    """Rows whose first ``length`` prompt tokens are already in the KV cache (image-prefix sharing): the model is
    called on the rest only, and each pooling's part from the prefix positions is given, per captured layer, as
    (b, P, d) float32 (the prefix's kept token sums over the pooling's divisor)."""

    length: int
    pooled: dict[int, torch.Tensor]


@dataclass(frozen=True)
class PrefixSums:
    """Ask `capture` to also sum each row's prefix tokens, per token set of `PREFIX_SETS`: ``spans`` (b, 3, s) 0/1
    marks them (zeros for a row whose prefix is not kept); the sums land in `CaptureResult.prefix_sums`."""

    spans: torch.Tensor


_EAGER_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _check_eager(model: nn.Module) -> None:
    """Refuse attention capture without eager attention; checked once per model (reading the configs costs ms)."""
    if _EAGER_CHECKED.get(model):
        return
    configs = [model.config, getattr(model.config, "get_text_config", lambda: model.config)()]
    impls = {getattr(c, "_attn_implementation", None) for c in configs}
    if not impls & {"eager"}:
        raise AdapterError(
            f"attention maps need eager attention, but the model runs {sorted(str(i) for i in impls)}; "
            "load it with attn_implementation='eager' (SDPA/FlashAttention return no weights)"
        )
    _EAGER_CHECKED[model] = True


@contextmanager
def capture(
    model: nn.Module,
    adapter: VLMAdapter,
    layout: TokenLayout,
    layers: Sequence[int] | None = None,
    poolings: Sequence[str] = POOLINGS,
    attentions: bool = False,
    shared: SharedPrefix | None = None,
    prefix_sums: PrefixSums | None = None,
) -> Iterator[CaptureResult]:
    """Capture the first forward call (the prefill) made inside the block; later decode steps are ignored.

    With ``shared`` the prefill covers only the tokens after the cached prefix: poolings add the given prefix parts,
    attention rows are read at the last token's place in the shorter query. ``prefix_sums`` records each row's
    prefix token sums for later sharing."""
    decoder_layers = adapter.decoder_layers(model)
    chosen = resolve_layers(len(decoder_layers), layers)
    for pooling in poolings:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    if attentions:
        _check_eager(model)
    result = CaptureResult(layers=chosen, poolings=tuple(poolings))
    offset = shared.length if shared is not None else 0
    query_length = layout.attention_mask.shape[1] - offset  # the prefill's sequence length
    if shared is not None and (missing_parts := [i for i in chosen if i not in shared.pooled]):
        raise ValueError(f"the shared prefix has no pooled part for layers {missing_parts}")
    if shared is not None and bool((layout.last_index < offset).any()):
        raise ValueError("a row's last prompt token lies inside the shared prefix; nothing would be left to run")
    pooled: dict[int, torch.Tensor] = {}  # layer -> (b, P, d), still on the layer's device
    weights_on: dict[torch.device, torch.Tensor] = {}  # pooling weights per device (device_map may split layers)
    attn_rows: dict[int, torch.Tensor] = {}
    owner = object()
    handles = []

    def layer_hook(layer_index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not is_active(owner) or layer_index in pooled:
                return
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] != query_length:
                return  # not the prefill of this batch (a decode step)
            if weights_on.get(hidden.device) is None:
                weights_on[hidden.device] = _pooling_weights(layout, poolings, hidden.device)[:, :, offset:]
            states = hidden.detach().float()
            pooled[layer_index] = torch.bmm(weights_on[hidden.device], states)  # (b, P, d)
            if shared is not None:
                pooled[layer_index] += shared.pooled[layer_index].to(hidden.device)
            if prefix_sums is not None:
                result.prefix_sums[layer_index] = torch.bmm(prefix_sums.spans.to(hidden.device), states).cpu()

        return hook

    def attention_hook(layer_index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not is_active(owner) or layer_index in attn_rows:
                return
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise AdapterError("the attention module returned no weights; load the model with attn_implementation='eager'")
            if weights.shape[-2] != query_length:
                return
            b = weights.shape[0]
            rows = weights[torch.arange(b, device=weights.device), :, (layout.last_index - offset).to(weights.device), :]
            attn_rows[layer_index] = rows.float().mean(dim=1).detach()  # (b, keys), head-averaged; CPU copy at the end

        return hook

    def count_hook(module: nn.Module, args: Any) -> None:
        if is_active(owner):
            result.n_forward_calls += 1

    try:
        handles.append(model.register_forward_pre_hook(count_hook))
        for index in chosen:
            handles.append(decoder_layers[index].register_forward_hook(layer_hook(index)))
            if attentions:
                attention = adapter.attention_module(decoder_layers[index])
                handles.append(attention.register_forward_hook(attention_hook(index)))
        with activate(owner):
            yield result
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in chosen if i not in pooled]
    if missing:
        raise AdapterError(f"no prefill output was captured for layers {missing}; was the model called inside capture()?")
    stacked = torch.stack([pooled[i].cpu() for i in chosen], dim=2)  # (b, P, n_layers, d): one copy per layer
    result.states = {p: stacked[:, j].contiguous() for j, p in enumerate(poolings)}
    if attentions:
        image_mask = layout.image_mask.cpu()
        rows = torch.stack([attn_rows[i].cpu() for i in chosen], dim=1).numpy()  # (b, n_layers, keys)
        per_sample = [rows[b][:, image_mask[b].numpy()] for b in range(image_mask.shape[0])]
        result.attentions = per_sample
