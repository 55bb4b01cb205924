"""Reliability signals as pure numpy functions (no torch, no I/O): attention structure, output confidence,
self-consistency."""

from vlmrel_core.signals.attention import (
    attention_entropy,
    attention_features,
    attention_features_batch,
    cluster_count,
    delta_spatial_entropy,
    image_attention_map,
    infer_grid_shape,
    spatial_entropy,
    top_cells_mask,
)
from vlmrel_core.signals.consistency import (
    SelfConsistencyConfig,
    agreement_rate,
    consistency_signals,
    majority_answer,
)
from vlmrel_core.signals.output import mean_token_logprob, output_signals

__all__ = [
    "attention_entropy",
    "attention_features",
    "attention_features_batch",
    "cluster_count",
    "delta_spatial_entropy",
    "image_attention_map",
    "infer_grid_shape",
    "spatial_entropy",
    "top_cells_mask",
    "SelfConsistencyConfig",
    "agreement_rate",
    "consistency_signals",
    "majority_answer",
    "mean_token_logprob",
    "output_signals",
]
