"""ReliabilityGate: same-pass probing (zero extra forward calls), gray-zone routing, risk certificates, the checks
at assembly (model fingerprint, config fields) and the live drift window."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gate_helpers import (
    QUESTION, CallCounter, constant_probe, gate_config, scene_images, late_bundle, late_run, make_gate,  # noqa: F401
)
from vlmrel_core.analysis.probes import ProbeError
from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.run import run_batch
from vlmrel_core.gate.bundle import load_gate
from vlmrel_core.gate.calibration import TemperatureScaler
from vlmrel_core.gate.config import parse_gate_config
from vlmrel_core.gate.records import GateError
from vlmrel_core.gate.runtime import ReliabilityGate
from vlmrel_core.signals.consistency import agreement_rate


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_answer_makes_exactly_the_forward_calls_of_a_plain_greedy_generate(tiny_loaded, family):
    loaded = tiny_loaded[family]
    image = render_scene(make_scene(5))
    gate = make_gate(loaded, 0.9, gray=None, action="none")
    inputs = loaded.adapter.prepare_inputs(loaded.processor, [image], [QUESTION])
    with torch.no_grad(), CallCounter(loaded.model) as plain:
        sequences = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                          pad_token_id=loaded.tokenizer.pad_token_id)
    plain_text = loaded.tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    layer_hooks = len(loaded.adapter.decoder_layers(loaded.model)[3]._forward_hooks)
    with CallCounter(loaded.model) as gated:
        decision = gate.answer(image, QUESTION)
    assert len(loaded.adapter.decoder_layers(loaded.model)[3]._forward_hooks) == layer_hooks  # hooks came off
    record = run_batch(loaded, [image], [QUESTION], layers=[3], poolings=["last_token"], logit_lens=False)
    assert gated.calls == plain.calls == record.n_forward_calls >= 1
    assert decision.evidence["n_forward_calls"] == decision.evidence["total_forward_calls"] == plain.calls
    assert decision.answer_text == plain_text
    assert decision.action == "generate" and decision.accepted and decision.self_consistency is None
    assert decision.evidence["cost_multiplier"] == 1.0
    assert decision.evidence["layer"] == 3 and decision.evidence["pooling"] == "last_token"
    assert decision.confidence == pytest.approx(0.9, abs=1e-9)
    assert decision.evidence["raw_probe_score"] == pytest.approx(0.9, abs=1e-12)


def test_the_probe_reads_the_state_of_the_same_pass(tiny_loaded):
    """The raw probe score equals the probe applied to the state a plain run_batch captures for the same input."""
    loaded = tiny_loaded["late_fusion"]
    rng = np.random.default_rng(1)
    probe = dataclasses.replace(constant_probe(loaded, 0.5), coef=rng.normal(size=loaded.hidden_size), intercept=0.0)
    gate = ReliabilityGate(loaded, probe, TemperatureScaler(score_kind="prob", temperature=1.0),
                           gate_config(loaded, threshold=0.5, gray=None, action="none"))
    image = render_scene(make_scene(6))
    decision = gate.answer(image, QUESTION)
    record = run_batch(loaded, [image], [QUESTION], layers=[3], poolings=["last_token"], logit_lens=False)
    assert decision.evidence["raw_probe_score"] == pytest.approx(float(probe.score(record.states["last_token"][:, 0])[0]), abs=1e-9)


def test_self_consistency_runs_in_the_gray_zone_and_only_there(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    image = render_scene(make_scene(7))
    plain = run_batch(loaded, [image], [QUESTION], layers=[3], poolings=["last_token"], logit_lens=False).n_forward_calls
    outcomes = {}
    for p in (0.9, 0.7, 0.3):
        gate = make_gate(loaded, p)
        with CallCounter(loaded.model) as counter:
            decision = gate.answer(image, QUESTION)
        outcomes[p] = (decision, counter.calls, gate.stats())
    high, mid, low = outcomes[0.9][0], outcomes[0.7][0], outcomes[0.3][0]
    assert (high.action, low.action, mid.action) == ("generate", "fallback", "self_consistency")
    assert outcomes[0.9][1] == outcomes[0.3][1] == plain  # no extra pass outside the gray zone
    assert high.self_consistency is None and low.self_consistency is None
    assert low.route == "human_review" and not low.accepted
    sc = mid.self_consistency
    assert len(sc["samples"]) == sc["k"] == 3 and sc["agreement"] == agreement_rate(sc["samples"])
    assert outcomes[0.7][1] == plain + sc["n_forward_calls"]
    assert mid.evidence["self_consistency_forward_calls"] == sc["n_forward_calls"]
    expected = (plain + 3 * sc["n_forward_calls"]) / plain
    assert mid.evidence["cost_multiplier"] == pytest.approx(expected)
    assert outcomes[0.7][2]["cost_multiplier"] == pytest.approx(expected) and outcomes[0.7][2]["gray_zone_share"] == 1.0
    assert outcomes[0.9][2]["cost_multiplier"] == 1.0 and outcomes[0.9][2]["gray_zone_share"] == 0.0
    # A random tiny model's samples disagree: the gray-zone answer is not served.
    assert not mid.accepted and mid.route == "human_review" and not mid.certified


def test_gray_zone_edges_and_acceptance_when_samples_agree(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    gate = make_gate(loaded, 0.7)
    assert gate.route(0.65, 0.65) == "gray_zone" and gate.route(0.7999, 0.7999) == "gray_zone"
    assert gate.route(0.8, 0.8) == "generate" and gate.route(0.6499, 0.6499) == "fallback"
    # Near-zero temperature: every sample is the greedy answer, agreement 1 -> the answer is served.
    agreeing = make_gate(loaded, 0.7, self_consistency={"temperature": 1e-4, "top_p": 1.0, "min_agreement": 0.8})
    decision = agreeing.answer(render_scene(make_scene(8)), QUESTION)
    assert decision.action == "self_consistency"
    assert decision.self_consistency["agreement"] == 1.0 and decision.self_consistency["agrees_with_greedy"]
    assert decision.accepted and decision.route == "answer"


def test_gray_zone_action_fallback_and_none(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    image = render_scene(make_scene(9))
    to_fallback = make_gate(loaded, 0.75, action="fallback").answer(image, QUESTION)
    assert to_fallback.action == "fallback" and to_fallback.self_consistency is None
    ignored = make_gate(loaded, 0.75, action="none").answer(image, QUESTION)  # plain threshold 0.72
    assert ignored.action == "generate" and ignored.self_consistency is None


def test_answer_batch_matches_single_answers(tiny_loaded):
    loaded = tiny_loaded["early_fusion"]
    gate = make_gate(loaded, 0.9, gray=None, action="none")
    images = scene_images(3, start=10)
    batch = gate.answer_batch(images, [QUESTION] * 3, batch_size=3)
    for image, decided in zip(images, batch):
        single = gate.answer(image, QUESTION)
        assert single.answer_text == decided.answer_text and single.action == decided.action
        assert decided.evidence["timings"]["batch_size"] == 3
    assert gate.stats()["n_decisions"] == 6


def test_probe_for_another_model_is_refused(tiny_loaded, late_bundle):
    early, late = tiny_loaded["early_fusion"], tiny_loaded["late_fusion"]
    with pytest.raises(ProbeError, match="model fingerprint mismatch"):
        load_gate(late_bundle.out_dir / "gate.yaml", loaded=early)
    with pytest.raises(ProbeError, match="model fingerprint mismatch"):
        ReliabilityGate(early, constant_probe(late, 0.9), TemperatureScaler(score_kind="prob", temperature=1.0),
                        gate_config(early))


def test_config_and_probe_mismatches_name_the_field(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    probe, ts = constant_probe(loaded, 0.9), TemperatureScaler(score_kind="prob", temperature=1.0)
    wrong_arch = gate_config(loaded)
    wrong_arch.monitor.architecture = "early_fusion"
    with pytest.raises(GateError, match=r"reliability_monitor\.architecture"):
        ReliabilityGate(loaded, probe, ts, wrong_arch)
    with pytest.raises(GateError, match=r"reliability_monitor\.target_layer.*layer\(s\) \[3\]"):
        ReliabilityGate(loaded, probe, ts, gate_config(loaded, layer=1))
    with pytest.raises(GateError, match=r"reliability_monitor\.probe\.temperature"):
        ReliabilityGate(loaded, probe, TemperatureScaler(score_kind="prob", temperature=2.0), gate_config(loaded))
    wrong_dim = gate_config(loaded)
    wrong_dim.monitor.probe.hidden_dim = 4096
    with pytest.raises(GateError, match=r"reliability_monitor\.probe\.hidden_dim"):
        ReliabilityGate(loaded, probe, ts, wrong_dim)


def test_risk_target_needs_its_certificate(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    config = gate_config(loaded, gray=None, action="none")
    data = config.model_dump(mode="json", exclude_none=True)
    del data["reliability_monitor"]["routing"]["confidence_threshold"]
    data["reliability_monitor"]["routing"]["risk_target"] = {"max_risk": 0.1, "delta": 0.1}
    risk_config = parse_gate_config(data)
    ts = TemperatureScaler(score_kind="prob", temperature=1.0)
    with pytest.raises(GateError, match="risk_target: a risk target needs the certified threshold"):
        ReliabilityGate(loaded, constant_probe(loaded, 0.9), ts, risk_config)
    certificate = {"threshold": 0.7, "target_risk": 0.2, "delta": 0.1}
    with pytest.raises(GateError, match="certifies max_risk 0.2"):
        ReliabilityGate(loaded, constant_probe(loaded, 0.9), ts, risk_config, risk_certificate=certificate)
    certificate["target_risk"] = 0.1
    gate = ReliabilityGate(loaded, constant_probe(loaded, 0.9), ts, risk_config, risk_certificate=certificate)
    assert gate.threshold_raw == 0.7 and gate.threshold == pytest.approx(0.7)
    assert gate.route(0.71, raw_score=0.69) == "fallback"  # the certified rule is on the raw score
    assert gate.route(0.69, raw_score=0.7) == "generate"


def test_live_drift_window_alerts_on_states_unlike_the_reference(tiny_loaded, late_bundle, caplog):
    """The bundle's drift reference is the synthetic run; the tiny model's real states are nothing like it."""
    config = late_bundle.config.model_copy(deep=True)
    config.monitor.monitoring.window = 2
    config.monitor.routing.gray_zone_action = "none"
    gate = dataclasses.replace(late_bundle, config=config.with_base_dir(late_bundle.out_dir)).gate(tiny_loaded["late_fusion"])
    with caplog.at_level("WARNING", logger="vlmrel.gate"):
        decisions = [gate.answer(image, QUESTION) for image in scene_images(2, start=30)]
    assert "drift" not in decisions[0].evidence
    drift = decisions[1].evidence["drift"]
    assert drift["n_current"] == 2 and drift["alert"] and drift["embedding_shift"] > 0.05
    assert "calibration drift alert" in caplog.text and gate.last_drift_report.alert
