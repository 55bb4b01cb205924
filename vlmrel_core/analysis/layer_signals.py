"""Signals of one run scored as they are: output and attention scores, and per decoder layer attention features
and logit-lens margins, with their AUROC.

Why its own module: the report's per-layer table and the dashboard's layer view read the same numbers; both take
a RunReader and get arrays or a DataFrame back. Nothing here writes files.

Orientation is fixed in advance (`ATTENTION_SIGNS`): focused attention (low entropy, few clusters, sharpening)
counts as "correct", so those features are negated before their AUROC is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from vlmrel_core.analysis.controls import ScoredSignal, evaluate_scores
from vlmrel_core.analysis.sweep import LayerSweep
from vlmrel_core.engine.store import CacheError, RunReader
from vlmrel_core.signals.attention import attention_features_batch

AS_IS = "as is"
NEGATED = "negated"
FITTED = "fitted P(correct)"
ATTENTION_COST = "1× (same pass, eager attention)"
#: Orientation of the attention features: focused attention (low entropy, few clusters, sharpening) = "correct".
ATTENTION_SIGNS = {"entropy": -1, "spatial_entropy": -1, "cluster_count": -1, "delta_spatial_entropy": -1}
ATTENTION_NAMES = {"entropy": "attention entropy", "spatial_entropy": "H_s", "cluster_count": "C_k",
                   "delta_spatial_entropy": "ΔH_s"}



def attention_signal_arrays(reader: RunReader, index: np.ndarray) -> tuple[dict[str, np.ndarray], str] | None:
    """Per-layer attention features for rows ``index`` (and the layer-mean map's), NaN where not computable.

    Returns ({"entropy": (m, L), "spatial_entropy": (m, L), "cluster_count": (m, L), "delta_spatial_entropy":
    (m, L-1), "mean_map.<feature>": (m,)}, note) or None if the run has no attention.
    """
    if not reader.manifest.attentions:
        return None
    try:
        attention = reader.tensor("attention_image")[index]
        counts = reader.tensor("attention_counts", np.int64)[index]
    except CacheError:
        return None
    rows = reader.rows.iloc[index]
    m, n_layers, _ = attention.shape
    out = {k: np.full((m, n_layers), np.nan) for k in ("entropy", "spatial_entropy", "cluster_count")}
    out["delta_spatial_entropy"] = np.full((m, max(n_layers - 1, 0)), np.nan)
    for k in ("entropy", "spatial_entropy", "cluster_count"):
        out[f"mean_map.{k}"] = np.full(m, np.nan)
    grid_h = rows["grid_h"].to_numpy(dtype=np.int64) if "grid_h" in rows.columns else np.zeros(m, dtype=np.int64)
    grid_w = rows["grid_w"].to_numpy(dtype=np.int64) if "grid_w" in rows.columns else np.zeros(m, dtype=np.int64)
    skipped = 0
    for key in sorted(set(zip(counts.tolist(), grid_h.tolist(), grid_w.tolist()))):
        count, h, w = key
        members = np.flatnonzero((counts == count) & (grid_h == h) & (grid_w == w))
        maps = attention[members, :, :count].astype(np.float64)
        usable = (h * w == count) & (maps.sum(axis=2) > 0).all(axis=1)
        if not np.any(usable):
            skipped += members.size
            continue
        skipped += int((~usable).sum())
        members, maps = members[usable], maps[usable]
        features = attention_features_batch(maps, (h, w))
        for k in ("entropy", "spatial_entropy", "cluster_count"):
            out[k][members] = features[k]
        out["delta_spatial_entropy"][members] = features["delta_spatial_entropy"]
        normalised = maps / maps.sum(axis=2, keepdims=True)
        mean_features = attention_features_batch(normalised.mean(axis=1, keepdims=True), (h, w))
        for k in ("entropy", "spatial_entropy", "cluster_count"):
            out[f"mean_map.{k}"][members] = mean_features[k][:, 0]
    note = f"{skipped} row(s) without a usable attention map excluded" if skipped else ""
    return out, note


def lens_signal_arrays(reader: RunReader) -> dict[str, np.ndarray] | None:
    """Logit-lens per layer: |yes/no log-odds| (deployable) and the label-signed truth margin (descriptive).

    truth margin = log-odds(yes vs no) if the label is "yes", its negative if "no" (NaN for other labels): the
    lens's margin for the correct answer over the other. It uses the label, so it is not a run-time signal.
    """
    try:
        logodds = reader.tensor("lens_logodds").astype(np.float64)
    except CacheError:
        return None
    labels = reader.rows["label"].astype(str).str.lower().to_numpy() if "label" in reader.rows.columns else None
    sign = np.full(logodds.shape[0], np.nan)
    if labels is not None:
        sign[labels == "yes"] = 1.0
        sign[labels == "no"] = -1.0
    return {"abs_margin": np.abs(logodds), "truth_margin": logodds * sign[:, None]}



def score_finite(
    name: str, kind: str, description: str, y: np.ndarray, values: np.ndarray, cost: str, note: str,
    *, n_boot: int, seed: int,
) -> ScoredSignal:
    """Score only the finite entries (a signal missing on some rows is scored where it exists, and says so)."""
    keep = np.isfinite(values)
    if not keep.all():
        extra = f"scored on {int(keep.sum())} of {keep.size} test rows"
        note = f"{note}; {extra}" if note else extra
    return evaluate_scores(name, kind, description, y[keep], values[keep], cost, n_boot=n_boot, seed=seed, note=note)


# --------------------------------------------------------------------------------------------------- raw signals


@dataclass(frozen=True)
class RawSignal:
    """A row column used directly as a reliability score, with its fixed orientation and cost."""

    name: str
    column: str
    sign: int
    cost: str
    description: str
    note: str = ""


OUTPUT_SIGNALS: tuple[RawSignal, ...] = (
    RawSignal("max_answer_prob", "max_answer_prob", +1, "1×", "max(p_yes, p_no) / (p_yes + p_no)"),
    RawSignal("yes_no_margin", "yes_no_margin", +1, "1×", "|log p_yes − log p_no|",
              "same ranking as max_answer_prob for yes/no answers"),
    RawSignal("top1_top2_margin", "top1_top2_margin", +1, "1×", "full-vocabulary top-1 − top-2 logit"),
    RawSignal("top1_prob", "top1_prob", +1, "1×", "full-vocabulary max probability"),
    RawSignal("token_entropy", "token_entropy", -1, "1×", "full-softmax entropy at the answer position"),
    RawSignal("mean_token_logprob", "mean_token_logprob", +1, "1×", "mean log-prob of the generated tokens"),
)
SELF_CONSISTENCY_COLUMNS = ("sc_agreement", "self_consistency", "agreement_rate")
SELF_CONSISTENCY_K_COLUMNS = ("sc_k", "self_consistency_k")




def raw_signals(
    reader: RunReader, test: np.ndarray, attention: dict[str, np.ndarray] | None, attention_note: str,
    *, n_boot: int, seed: int,
) -> list[tuple[str, ScoredSignal]]:
    """(key, signal) for output, attention (layer-mean map; ΔH_s last vs previous layer), self-consistency on ``test``."""
    rows = reader.rows
    y = rows["correct"].astype(np.int64).to_numpy()[test]
    scored = []
    for signal in OUTPUT_SIGNALS:
        if signal.column not in rows.columns:
            continue
        values = signal.sign * rows[signal.column].to_numpy(dtype=np.float64)[test]
        scored.append((signal.column, evaluate_scores(
            signal.name if signal.sign > 0 else f"−{signal.name}", "output", signal.description, y, values,
            signal.cost, n_boot=n_boot, seed=seed, note=signal.note,
        )))
    if attention is not None:
        for key in ("entropy", "spatial_entropy", "cluster_count"):
            values = attention[f"mean_map.{key}"]
            scored.append((f"attention_{key}", score_finite(
                f"−{ATTENTION_NAMES[key]} (layer-mean map)", "attention",
                f"{ATTENTION_NAMES[key]} of the head- and layer-averaged answer→image attention map",
                y, ATTENTION_SIGNS[key] * values, ATTENTION_COST, attention_note, n_boot=n_boot, seed=seed,
            )))
        if attention["delta_spatial_entropy"].shape[1] > 0:
            values = attention["delta_spatial_entropy"][:, -1]
            scored.append(("attention_delta_spatial_entropy", score_finite(
                "−ΔH_s (last layer)", "attention", "H_s(last layer) − H_s(previous layer)",
                y, -values, ATTENTION_COST, attention_note, n_boot=n_boot, seed=seed,
            )))
    sc_column = next((c for c in SELF_CONSISTENCY_COLUMNS if c in rows.columns), None)
    if sc_column is not None:
        k_column = next((c for c in SELF_CONSISTENCY_K_COLUMNS if c in rows.columns), None)
        k = int(rows[k_column].max()) if k_column else None
        cost = f"{k}× (K={k} samples)" if k else "K× (K samples)"
        scored.append(("self_consistency", score_finite(
            "self-consistency", "consistency", "share of the most frequent normalised answer among K samples",
            y, rows[sc_column].to_numpy(dtype=np.float64)[test], cost, "", n_boot=n_boot, seed=seed,
        )))
    return scored


def layer_signal_table(
    reader: RunReader, test: np.ndarray, attention: dict[str, np.ndarray] | None, attention_note: str,
    sweep: LayerSweep | None, *, n_boot: int, seed: int,
) -> pd.DataFrame:
    """Long table: per decoder layer, AUROC/R_pb of attention features, logit-lens margins and the probe."""
    rows = reader.rows
    y = rows["correct"].astype(np.int64).to_numpy()[test]
    layers = reader.manifest.layers
    lens = lens_signal_arrays(reader)
    records: list[dict[str, Any]] = []

    def add(layer: int, signal: ScoredSignal, orientation: str) -> None:
        record = signal.to_dict()
        record.update(layer=layer, orientation=orientation)
        records.append(record)

    for i, layer in enumerate(layers):
        if attention is not None:
            for key in ("entropy", "spatial_entropy", "cluster_count"):
                add(layer, score_finite(f"−{ATTENTION_NAMES[key]}", "attention", "", y,
                                          ATTENTION_SIGNS[key] * attention[key][:, i], ATTENTION_COST, attention_note,
                                          n_boot=n_boot, seed=seed), NEGATED)
            if i > 0:
                add(layer, score_finite("−ΔH_s", "attention", f"H_s(L{layer}) − H_s(L{layers[i - 1]})", y,
                                          -attention["delta_spatial_entropy"][:, i - 1], ATTENTION_COST,
                                          attention_note, n_boot=n_boot, seed=seed), NEGATED)
        if lens is not None:
            add(layer, score_finite("lens |yes/no log-odds|", "logit lens", "final norm + unembedding", y,
                                      lens["abs_margin"][test, i], "1× (same pass)", "", n_boot=n_boot, seed=seed),
                AS_IS)
            add(layer, score_finite("lens truth margin", "logit lens",
                                      "label-signed yes/no log-odds through the lens", y,
                                      lens["truth_margin"][test, i], "1× (same pass)",
                                      "uses the ground-truth label: descriptive, not a run-time signal",
                                      n_boot=n_boot, seed=seed), AS_IS)
        if sweep is not None:
            chosen = sweep.selected().pooling
            if (chosen, layer) in sweep.test_scores and np.array_equal(sweep.split.test, test):
                add(layer, evaluate_scores(f"probe ({chosen})", "probe", "", y, sweep.test_scores[(chosen, layer)],
                                           "1× (same pass, 0 extra)", n_boot=n_boot, seed=seed), FITTED)
    return pd.DataFrame(records)


def run_layer_signals(
    reader: RunReader, test: np.ndarray, sweep: LayerSweep | None = None, *, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """`layer_signal_table` for rows ``test`` of a run, reading its attention maps itself (the dashboard's entry)."""
    attention = attention_signal_arrays(reader, np.asarray(test))
    arrays, note = attention if attention is not None else (None, "")
    return layer_signal_table(reader, np.asarray(test), arrays, note, sweep, n_boot=n_boot, seed=seed)
