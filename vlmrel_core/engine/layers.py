"""Which decoder layers and poolings a capture reads: names and index arithmetic only, no torch.

Why a module of its own: the gate config, probes and result loaders need these names to validate and read a run,
and importing them from `engine.capture` pulled torch into every page of the dashboard (seconds per cold start).
"""

from __future__ import annotations

from typing import Sequence

POOLINGS: tuple[str, ...] = ("last_token", "mean_all", "mean_image", "mean_text")

def resolve_layers(n_layers: int, layers: Sequence[int] | None) -> list[int]:
    """Decoder-layer indices (0-based, negative allowed); None means every layer."""
    if layers is None:
        return list(range(n_layers))
    resolved = []
    for layer in layers:
        index = layer + n_layers if layer < 0 else layer
        if not 0 <= index < n_layers:
            raise ValueError(f"layer {layer} out of range for a decoder with {n_layers} layers")
        resolved.append(index)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"duplicate layers in {list(layers)}")
    return resolved
