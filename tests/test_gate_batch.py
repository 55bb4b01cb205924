"""gate_dataset: one decision per sample, accuracy of what was served, routing shares and the measured cost."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from gate_helpers import constant_probe, gate_config, make_gate, without_timings
from vlmrel_core.data.loader import load_vqa_jsonl
from vlmrel_core.engine.answers import is_correct
from vlmrel_core.gate.batch import gate_dataset, write_decisions_jsonl
from vlmrel_core.gate.calibration import TemperatureScaler
from vlmrel_core.gate.runtime import ReliabilityGate


def varied_gate(loaded, threshold=0.5):
    """A probe with random weights: confidences spread around the threshold, so some answers are served."""
    rng = np.random.default_rng(1)
    probe = dataclasses.replace(constant_probe(loaded, 0.5), coef=rng.normal(size=loaded.hidden_size) * 0.5,
                                intercept=0.0)
    return ReliabilityGate(loaded, probe, TemperatureScaler(score_kind="prob", temperature=1.0),
                           gate_config(loaded, threshold=threshold, gray=None, action="none"))


def test_counts_match_the_decisions_and_a_fresh_gates_stats(tiny_loaded, tiny_dataset):
    loaded = tiny_loaded["late_fusion"]
    samples = load_vqa_jsonl(tiny_dataset)[:10]
    direct = varied_gate(loaded).answer_batch([s.load_image() for s in samples], [s.question for s in samples], 4)
    median = float(np.median([d.confidence for d in direct]))
    direct = varied_gate(loaded, median).answer_batch([s.load_image() for s in samples], [s.question for s in samples], 4)
    calls = []
    gate = varied_gate(loaded, median)  # about half the answers are served
    result = gate_dataset(gate, samples, batch_size=4, progress=lambda d, t, s="": calls.append((d, t)))
    assert calls == [(0, 10), (4, 10), (8, 10), (10, 10)]
    assert [without_timings(d) for d in result.decisions] == [without_timings(d) for d in direct]
    correct = [is_correct(d.answer, s.label) for d, s in zip(result.decisions, samples)]
    served = [c for c, d in zip(correct, result.decisions) if d.accepted]
    assert 0 < len(served) < 10, "the test needs both served and refused answers"
    summary = result.summary()
    assert result.correct == correct and summary["n"] == summary["n_labelled"] == 10
    assert summary["accuracy_all"] == sum(correct) / 10
    assert summary["accuracy_of_served"] == sum(served) / len(served)
    assert summary["served_share"] == len(served) / 10
    stats = gate.stats()
    for key in ("n_decisions", "actions", "accepted_share", "gray_zone_share", "cost_multiplier", "cost_unit",
                "self_consistency_k"):
        assert summary[key] == stats[key], key
    assert summary["time_multiplier"] == pytest.approx(stats["time_multiplier"])


def test_self_consistency_cost_and_an_empty_served_set(tiny_loaded, tiny_dataset):
    loaded = tiny_loaded["late_fusion"]
    samples = load_vqa_jsonl(tiny_dataset)[:3]
    gate = make_gate(loaded, 0.7)  # every answer in the gray zone; a random tiny model's samples disagree
    result = gate_dataset(gate, samples, batch_size=2)
    summary = result.summary()
    assert summary["actions"] == {"generate": 0, "fallback": 0, "self_consistency": 3}
    assert summary["gray_zone_share"] == 1.0 and summary["self_consistency_k"] == 3
    assert summary["cost_multiplier"] == pytest.approx(gate.stats()["cost_multiplier"]) and summary["cost_multiplier"] > 1
    assert summary["served_share"] == 0.0 and summary["accuracy_of_served"] is None
    assert summary["accuracy_all"] is not None


def test_unlabelled_requests_and_the_jsonl_rows(tmp_path, tiny_loaded, tiny_dataset):
    loaded = tiny_loaded["early_fusion"]
    rows = [json.loads(line) for line in tiny_dataset.read_text().splitlines()[:3]]
    for row in rows[1:]:
        row.pop("label")
    unlabelled = tmp_path / "traffic.jsonl"
    unlabelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_vqa_jsonl(unlabelled, tiny_dataset.parent, require_label=False)
    result = gate_dataset(make_gate(loaded, 0.9, gray=None, action="none"), samples, batch_size=8)
    assert result.correct[1:] == [None, None] and result.correct[0] is not None
    assert result.summary()["n_labelled"] == 1 and result.summary()["accuracy_all"] == float(result.correct[0])
    out = write_decisions_jsonl(result, tmp_path / "out" / "decisions.jsonl")
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["question_id"] for w in written] == [s.sample_id for s in samples]
    assert "correct" in written[0] and "label" not in written[1] and "correct" not in written[1]
    assert written[2]["action"] == result.decisions[2].action == "generate"
    with pytest.raises(ValueError, match="batch_size"):
        gate_dataset(make_gate(loaded, 0.9), samples, batch_size=0)
