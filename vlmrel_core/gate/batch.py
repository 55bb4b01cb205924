"""A gate answering a whole dataset: the decisions, the accuracy of what it served, routing shares and cost.

Why in the library: the CLI's ``vlmrel gate --data`` and the sample pipeline's live gate run need the same numbers;
counting them in one place keeps the two from disagreeing about what "accuracy of served answers" means.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from vlmrel_core.data.loader import VQASample
from vlmrel_core.engine.answers import is_correct
from vlmrel_core.gate.records import GateDecision
from vlmrel_core.gate.runtime import ReliabilityGate
from vlmrel_core.io import atomic_write_text, json_default
from vlmrel_core.progress import Progress, report as report_progress

if TYPE_CHECKING:
    from vlmrel_core.engine.parallel import DataParallel

ACTIONS = ("generate", "fallback", "self_consistency")
COST_UNIT = "sequence-forward passes relative to the greedy answers alone"


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass
class BatchGateResult:
    """One decision per sample (in order) and, where a sample has a label, whether the greedy answer was right."""

    samples: list[VQASample]
    decisions: list[GateDecision]
    correct: list[bool | None]
    self_consistency_k: int | None = None

    @property
    def n(self) -> int:
        return len(self.decisions)

    def accuracy_all(self) -> float | None:
        """Accuracy of every labelled greedy answer, served or not."""
        labelled = [c for c in self.correct if c is not None]
        return _share(sum(labelled), len(labelled))

    def accuracy_of_served(self) -> float | None:
        """Accuracy among the labelled answers the gate served (accepted)."""
        served = [c for c, d in zip(self.correct, self.decisions) if c is not None and d.accepted]
        return _share(sum(served), len(served))

    def action_counts(self) -> dict[str, int]:
        return {a: sum(d.action == a for d in self.decisions) for a in ACTIONS}

    def cost_multiplier(self) -> float | None:
        """All sequence-forward passes (greedy + self-consistency) over the greedy passes alone, this batch only."""
        greedy = sum(d.evidence["n_forward_calls"] for d in self.decisions)
        total = sum(d.evidence["cost_multiplier"] * d.evidence["n_forward_calls"] for d in self.decisions)
        return total / greedy if greedy else None

    def time_multiplier(self) -> float | None:
        """Measured seconds (greedy share of each batch + self-consistency) over the greedy seconds alone."""
        greedy = sum(d.evidence["timings"]["pass_s"] / max(d.evidence["timings"]["batch_size"], 1) for d in self.decisions)
        extra = sum(d.evidence["timings"]["self_consistency_s"] for d in self.decisions)
        return (greedy + extra) / greedy if greedy else None

    def summary(self) -> dict[str, Any]:
        """The batch's numbers; the routing/cost keys match `ReliabilityGate.stats` of a gate that saw only it."""
        counts = self.action_counts()
        n = self.n
        return {
            "n": n,
            "n_labelled": sum(c is not None for c in self.correct),
            "accuracy_all": self.accuracy_all(),
            "served_share": _share(sum(d.accepted for d in self.decisions), n),
            "accuracy_of_served": self.accuracy_of_served(),
            "n_decisions": n,
            "actions": counts,
            "accepted_share": _share(sum(d.accepted for d in self.decisions), n),
            "gray_zone_share": _share(counts["self_consistency"], n),
            "cost_multiplier": self.cost_multiplier(),
            "time_multiplier": self.time_multiplier(),
            "cost_unit": COST_UNIT,
            "self_consistency_k": self.self_consistency_k,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready row per decision: the request, its label and correctness (if labelled), the decision."""
        rows = []
        for sample, decision, correct in zip(self.samples, self.decisions, self.correct):
            row: dict[str, Any] = {"question_id": sample.sample_id, "image": str(sample.image_path),
                                   "question": sample.question}
            if correct is not None:
                row.update(label=sample.label, correct=int(correct))
            row.update(decision.to_dict())
            rows.append(row)
        return rows


def gate_dataset(
    gate: ReliabilityGate, samples: Sequence[VQASample], *, batch_size: int = 8, progress: Progress | None = None
) -> BatchGateResult:
    """Route every sample through ``gate`` in batches of ``batch_size`` (images are read one batch at a time)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = list(samples)
    decisions: list[GateDecision] = []
    report_progress(progress, 0, len(samples), "gate")
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        decisions.extend(gate.answer_batch([s.load_image() for s in chunk], [s.question for s in chunk],
                                           batch_size=batch_size))
        report_progress(progress, len(decisions), len(samples), "gate")
    correct = [None if s.label is None else bool(is_correct(d.answer, s.label)) for s, d in zip(samples, decisions)]
    k = gate.self_consistency.k if gate.self_consistency else None
    return BatchGateResult(samples, decisions, correct, k)


def write_decisions_jsonl(result: BatchGateResult, path: str | Path) -> Path:
    """All rows as JSON Lines, written atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, default=json_default) + "\n" for row in result.rows())
    return atomic_write_text(path, text)


def window_alignment(gate: ReliabilityGate) -> int:
    """The number of decisions that keeps every tumbling window (calibration drift, OOD window tests) whole."""
    sizes = [gate.monitor.window if gate.monitor is not None else 1,
             gate.ood.section.window if gate.ood is not None else 1]
    return math.lcm(*sizes)


def _rank_part(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank:03d}.part")


def _decision_from_row(row: dict[str, Any]) -> GateDecision:
    return GateDecision(**{f.name: row[f.name] for f in fields(GateDecision)})


def gate_dataset_parallel(
    gate: ReliabilityGate, samples: Sequence[VQASample], out: str | Path, parallel: "DataParallel", *,
    batch_size: int = 8, progress: Progress | None = None,
) -> BatchGateResult | None:
    """Data-parallel batch mode (`vlmrel gate --data --num-processes N`, or under `accelerate launch`).

    Each rank routes one contiguous block of whole windows (`window_alignment`), so every tumbling drift window
    is the same questions as in a single process; each rank's gate is a replica with its own window state, as N
    serving replicas would be (an alarm raised at the end of one rank's block is not carried into the next
    rank's first window). Ranks write their rows beside ``out``; after a barrier rank 0 merges them in dataset
    order into ``out`` and returns the whole result; the other ranks return None.
    """
    out = Path(out)
    samples = list(samples)
    block = parallel.block(len(samples), align=window_alignment(gate))
    result = gate_dataset(gate, samples[block], batch_size=batch_size, progress=progress)
    write_decisions_jsonl(result, _rank_part(out, parallel.rank))
    parallel.barrier()
    if parallel.rank != 0:
        return None
    parts = [_rank_part(out, r) for r in range(parallel.world_size)]
    rows = [json.loads(line) for part in parts for line in part.read_text(encoding="utf-8").splitlines()]
    if len(rows) != len(samples):
        raise RuntimeError(f"the ranks wrote {len(rows)} decisions for {len(samples)} questions")
    decisions = [_decision_from_row(row) for row in rows]
    correct = [None if "correct" not in row else bool(row["correct"]) for row in rows]
    merged = BatchGateResult(samples, decisions, correct, result.self_consistency_k)
    write_decisions_jsonl(merged, out)
    for part in parts:
        part.unlink()
    return merged


__all__ = ["BatchGateResult", "gate_dataset", "gate_dataset_parallel", "window_alignment", "write_decisions_jsonl"]
