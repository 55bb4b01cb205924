"""Inspect one question: the gate's decision (the production path, untouched) plus one inspection pass that
captures every layer and the attention, scored by per-layer probes — each step timed.

Why two passes: `ReliabilityGate.answer` reads one layer without attention (zero extra cost in production); the
inspection pass is the dashboard's extra, reported separately so its cost is never mistaken for the gate's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vlmrel_core.engine.run import run_batch
from vlmrel_core.gate.records import GateDecision
from vlmrel_core.gate.runtime import ReliabilityGate
from vlmrel_core.inspection.attention_view import AttentionGrids
from vlmrel_core.inspection.layer_probes import LayerProbes


@dataclass
class Inspection:
    """A decision with what the page shows beside it."""

    decision: GateDecision
    layer_scores: dict[int, float]  # raw probe P(correct) per layer (per-layer probes, uncalibrated)
    gate_layer: int
    lens_logodds: dict[int, float]  # yes-vs-no log-odds per layer through the final norm + unembedding
    attention: AttentionGrids | None
    attention_note: str | None  # why there is no map, when there is none
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision.to_dict(),
            "layer_scores": self.layer_scores,
            "gate_layer": self.gate_layer,
            "lens_logodds": self.lens_logodds,
            "attention_layers": None if self.attention is None else self.attention.layers,
            "attention_note": self.attention_note,
            "timings": self.timings,
        }


def inspect_question(
    gate: ReliabilityGate, layer_probes: LayerProbes | None, image: Image.Image, question: str
) -> Inspection:
    """The gate's decision, then per-layer probe scores and attention grids from one extra captured pass."""
    if not question.strip():
        raise ValueError("the question is empty")
    t0 = time.perf_counter()
    decision = gate.answer(image, question)
    t1 = time.perf_counter()
    m = gate.config.monitor
    pooling = layer_probes.pooling if layer_probes is not None else gate.pooling
    record = run_batch(gate.loaded, [image], [question], layers=None, poolings=[pooling], attentions=True,
                       logit_lens=pooling == "last_token", max_new_tokens=m.max_new_tokens, normalization=m.normalization,
                       prefix_cache=gate.loaded.prefix_cache)
    t2 = time.perf_counter()
    layers = record.layers
    scores = layer_probes.scores(record.states[pooling][0], layers) if layer_probes is not None else {}
    lens = {} if record.lens_logodds is None else {l: float(v) for l, v in zip(layers, record.lens_logodds[0])}
    attention, note = None, None
    grid = record.image_grids[0]
    if record.attentions is None:
        note = "no attention was captured"
    elif grid is None:
        note = "this model's image tokens form no single grid (tiles); no map to draw"
    else:
        attention = AttentionGrids.from_capture(record.attentions[0], layers, grid)
    t3 = time.perf_counter()
    timings = {
        "gate_preprocess_s": decision.evidence["timings"]["preprocess_s"],
        "gate_generate_s": decision.evidence["timings"]["generate_s"],
        "gate_probe_s": decision.evidence["timings"]["probe_s"],
        "gate_self_consistency_s": decision.evidence["timings"]["self_consistency_s"],
        "gate_total_s": t1 - t0,
        "inspection_pass_s": t2 - t1,
        "layer_probes_and_attention_s": t3 - t2,
        "total_s": t3 - t0,
    }
    return Inspection(decision, scores, gate.layer, lens, attention, note, timings)


def routing_reason(decision: GateDecision) -> str:
    """Why the gate routed the answer as it did, in one sentence built from the decision's own evidence."""
    ev = decision.evidence
    c, threshold = decision.confidence, ev["threshold"]
    zone = ev.get("gray_zone")
    rule = (f"raw probe score {ev['raw_probe_score']:.3f} vs the risk-certified raw threshold {ev['threshold_raw']:.3f}"
            if ev.get("threshold_raw") is not None else f"confidence {c:.3f} vs threshold {threshold:.3f}")
    if decision.action == "self_consistency" and decision.self_consistency is not None:
        sc = decision.self_consistency
        verdict = "served" if decision.accepted else f"sent to {decision.route}"
        return (f"confidence {c:.3f} lies in the gray zone [{zone[0]:.3f}, {zone[1]:.3f}), so {sc['k']} answers were "
                f"sampled: majority '{sc['majority_answer']}' with agreement {sc['agreement']:.2f} "
                f"(needs ≥ {sc['min_agreement']:.2f} and the greedy answer) → {verdict}")
    if ev.get("route_before_self_consistency") == "gray_zone":
        return f"confidence {c:.3f} lies in the gray zone [{zone[0]:.3f}, {zone[1]:.3f}) and the gray-zone action is fallback → {decision.route}"
    if decision.action == "generate":
        return f"{rule}: at or above → the answer is served" + (" (certified rule)" if decision.certified else "")
    return f"{rule}: below → {decision.route}"
