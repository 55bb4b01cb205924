"""Attention signals against the gate's probe score on the gate's held-out (test) rows, with each signal's AUROC and
point-biserial R_pb (bootstrap CIs): the data of the dashboard's "attention vs hidden state" view.

Why the gate's test rows: the probe score is the shipped gate probe's, and only rows it was neither trained nor
calibrated on say how well it predicts correctness. Attention features come from `analysis.layer_signals`
(the report's own computation); orientation follows its `ATTENTION_SIGNS` (focused attention counts as "correct").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmrel_core.analysis.layer_signals import ATTENTION_NAMES, ATTENTION_SIGNS, attention_signal_arrays
from vlmrel_core.analysis.metrics import Estimate, auroc_ci, point_biserial
from vlmrel_core.results.files import ResultsError
from vlmrel_core.results.gate_splits import GateSplitScores
from vlmrel_core.results.runs import RunResults

ATTENTION_SIGNAL_KEYS: tuple[str, ...] = ("entropy", "spatial_entropy", "cluster_count", "delta_spatial_entropy")
MEAN_MAP = None  # layer=None: the head- and layer-averaged map (ΔH_s: the last layer), as in the report's Table 7


@dataclass(frozen=True)
class SignalAssociation:
    """How well one signal (oriented so higher = predicted correct) separates correct from wrong rows."""

    auroc: Estimate
    r_pb: Estimate
    n: int


@dataclass(frozen=True)
class AttentionProbeRows:
    """Per test row: run row index, gate probe score (raw P(correct)), correctness, and attention features per layer."""

    rows: np.ndarray
    probe_score: np.ndarray
    correct: np.ndarray
    features: dict[str, np.ndarray]
    layers: tuple[int, ...]
    note: str

    def signal(self, key: str, layer: int | None = MEAN_MAP) -> np.ndarray:
        """Raw values (not oriented) of one attention signal; ``layer`` a decoder layer or None for the mean map.
        ΔH_s at layer l is H_s(l) − H_s(previous extracted layer), so the first layer has none."""
        if key not in ATTENTION_SIGNAL_KEYS:
            raise ResultsError(f"unknown attention signal {key!r}; expected one of {list(ATTENTION_SIGNAL_KEYS)}")
        if layer is None:
            return self.features["delta_spatial_entropy"][:, -1] if key == "delta_spatial_entropy" \
                else self.features[f"mean_map.{key}"]
        if layer not in self.layers:
            raise ResultsError(f"layer {layer} was not extracted; the run has {list(self.layers)}")
        position = self.layers.index(layer)
        if key == "delta_spatial_entropy":
            if position == 0:
                raise ResultsError(f"ΔH_s needs a previous layer; layer {layer} is the first extracted")
            return self.features[key][:, position - 1]
        return self.features[key][:, position]

    def association(self, key: str, layer: int | None = MEAN_MAP, n_boot: int = 1000, seed: int = 0) -> SignalAssociation:
        """AUROC and R_pb of the oriented signal (rows where it is finite), or of the probe for ``key='probe'``."""
        values = self.probe_score if key == "probe" else ATTENTION_SIGNS[key] * self.signal(key, layer)
        keep = np.isfinite(values)
        y, v = self.correct[keep], values[keep]
        return SignalAssociation(auroc_ci(y, v, n_boot=n_boot, seed=seed), point_biserial(y, v, n_boot=n_boot, seed=seed),
                                 int(keep.sum()))


def signal_label(key: str, layer: int | None = MEAN_MAP) -> str:
    """Words for a signal at a layer, e.g. 'H_s (layer 2)' or 'H_s (layer-mean map)'."""
    if key == "probe":
        return "probe score"
    where = ("last layer" if key == "delta_spatial_entropy" else "layer-mean map") if layer is None else f"layer {layer}"
    return f"{ATTENTION_NAMES[key]} ({where})"


def attention_probe_rows(run: RunResults, scores: GateSplitScores) -> AttentionProbeRows:
    """Attention features and gate probe scores on the gate's test rows of ``run`` (the gate's training run)."""
    if scores.run_dir.resolve() != run.run_dir.resolve():
        raise ResultsError(f"the split scores are of {scores.run_dir}, not of {run.run_dir}")
    test = np.asarray(scores.test)
    computed = attention_signal_arrays(run.reader, test)
    if computed is None:
        raise ResultsError(f"{run.run_dir} was extracted without attentions (--no-attentions)")
    features, note = computed
    return AttentionProbeRows(test, scores.raw[test], scores.correct[test].astype(np.int64), features,
                              tuple(run.manifest.layers), note)


__all__ = ["ATTENTION_SIGNAL_KEYS", "AttentionProbeRows", "MEAN_MAP", "SignalAssociation", "attention_probe_rows",
           "signal_label"]
