"""The production gate: same-pass probing (zero extra forward calls), gray-zone routing, risk targets, bundles,
model-fingerprint refusal, signal calibration, drift on runs, the shifted split and the CLI.

Probes with a known output are built by zeroing a fitted probe's weights (score = sigmoid(intercept)) and
calibrated with T = 1, so the gate's confidence is known exactly. Runs are synthetic `store.RunWriter` caches whose
correctness depends on one hidden dimension (known answers), stamped with a tiny model's fingerprint.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit, logit

from vlmrel_core.gate.calibration import TemperatureScaler
from vlmrel_core.data.shapes import GeneratorConfig, make_scene, render_scene
from vlmrel_core.data.shifted import SHIFTED_FIRST_IMAGE_ID, shifted_config, write_shifted_split
from vlmrel_core.gate.runtime import (
    CalibrationBundle,
    GateError,
    ReliabilityGate,
    build_gate_from_run,
    drift_between_runs,
    load_gate,
    load_gate_components,
)
from vlmrel_core.gate.config import parse_gate_config
from vlmrel_core.analysis.probes import Probe, ProbeError, fit_probe
from vlmrel_core.gate.risk import UnreachableRiskTarget
from vlmrel_core.engine.run import run_batch
from vlmrel_core.gate.signal_calibration import calibrate_signals
from vlmrel_core.signals.consistency import agreement_rate
from vlmrel_core.engine.store import RunManifest, RunWriter

QUESTION = "is there a red circle in the image?"
FAST_C_GRID = (0.01, 1.0)


# --------------------------------------------------------------------------------------------------- helpers


def constant_probe(loaded, p: float, layer: int = 3, pooling: str = "last_token") -> Probe:
    """A real `Probe` of ``loaded``'s hidden size and fingerprint whose score is ``p`` for every state."""
    d = loaded.hidden_size
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, d))
    y = np.tile([0, 1], 20)
    fitted = fit_probe(X, y, np.arange(40) // 2, c_grid=(1.0,), n_folds=2, kind="single_layer", pooling=pooling,
                       layers=[layer], hidden_size=d, model_fingerprint=loaded.fingerprint)
    return dataclasses.replace(fitted, coef=np.zeros(d), intercept=float(logit(p)))


def gate_config(loaded, threshold=0.72, gray=(0.65, 0.8), action="self_consistency_k3", layer=-1, **routing):
    data = {
        "reliability_monitor": {
            "architecture": f"{loaded.adapter.fusion}_fusion",
            "target_layer": layer,
            "probe": {"hidden_dim": loaded.hidden_size, "dropout": 0.1, "calibration_method": "temperature_scaling",
                      "temperature": 1.0},
            "routing": {"confidence_threshold": threshold, "fallback_strategy": "human_review",
                        "gray_zone_action": action, **({"gray_zone_bounds": list(gray)} if gray else {}), **routing},
        }
    }
    return parse_gate_config(data)


def make_gate(loaded, p: float, **kwargs) -> ReliabilityGate:
    return ReliabilityGate(loaded, constant_probe(loaded, p), TemperatureScaler(score_kind="prob", temperature=1.0),
                           gate_config(loaded, **kwargs))


class CallCounter:
    """Counts every top-level model call with a plain forward pre-hook (independent of vlmrel's own counting)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()


def write_synthetic_run(run_dir, fingerprint, *, n=600, d=128, n_layers=4, signal=3.0, seed=0, shift=0.0,
                        model_source="m", fusion="late", dataset_hash="h0"):
    """States N(1, 1) (a common direction, as real hidden states have); P(correct) = sigmoid(signal·(x0 − 1) + 1)
    at the last layer. ``shift`` moves half the dimensions up and half down (direction and confidence change)."""
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(n, n_layers, d)) + 1.0
    states[:, :, : d // 2] += shift
    states[:, :, d // 2 :] -= shift
    z = signal * (states[:, -1, 0] - 1.0) + 1.0
    correct = (rng.uniform(size=n) < expit(z)).astype(int)
    p = expit(0.5 * z + rng.normal(size=n))
    rows = pd.DataFrame({
        "sample_id": [str(i) for i in range(n)], "image_id": np.arange(n) // 2, "correct": correct,
        "max_answer_prob": 0.5 + 0.5 * p, "top1_prob": p, "mean_token_logprob": np.log(np.clip(p, 1e-3, 1)),
        "top1_top2_margin": np.abs(rng.normal(size=n)) + z.clip(0), "token_entropy": rng.uniform(0, 2, size=n),
    })
    manifest = RunManifest(
        model_source=str(model_source), model_type="llava", family="llava", fusion=fusion, model_fingerprint=fingerprint,
        n_layers=n_layers, hidden_size=d, layers=list(range(n_layers)), poolings=["last_token"], attentions=False,
        attn_implementation="eager", dtype="float32", dataset_path="d.jsonl", dataset_hash=dataset_hash, n_samples=n,
        answer_tokens={"yes_ids": [1], "no_ids": [2]}, normalization="lenient", max_new_tokens=8,
    )
    RunWriter(run_dir, manifest).write_shard(rows, {"states.last_token": states.astype(np.float16)})
    return run_dir


@pytest.fixture(scope="module")
def late_run(tmp_path_factory, tiny_loaded, tiny_model_dirs):
    root = tmp_path_factory.mktemp("gate_runs")
    return write_synthetic_run(root / "late", tiny_loaded["late_fusion"].fingerprint,
                               model_source=tiny_model_dirs["late_fusion"])


@pytest.fixture(scope="module")
def late_bundle(tmp_path_factory, late_run):
    out = tmp_path_factory.mktemp("bundle") / "late_gate"
    return build_gate_from_run(late_run, out, layer=3, risk_target=0.2, delta=0.1, gray_zone=(0.0, 1.0),
                               gray_zone_action="self_consistency_k3", c_grid=FAST_C_GRID)


def _images(n, start=0):
    return [render_scene(make_scene(i)) for i in range(start, start + n)]


def _without_timings(decision):
    data = decision.to_dict()
    data["evidence"].pop("timings")
    data["evidence"].pop("time_multiplier")
    if data["self_consistency"]:
        data["self_consistency"].pop("seconds")
    return data


# --------------------------------------------------------------------------------------------------- same pass


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


# --------------------------------------------------------------------------------------------------- gray zone


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
    images = _images(3, start=10)
    batch = gate.answer_batch(images, [QUESTION] * 3, batch_size=3)
    for image, decided in zip(images, batch):
        single = gate.answer(image, QUESTION)
        assert single.answer_text == decided.answer_text and single.action == decided.action
        assert decided.evidence["timings"]["batch_size"] == 3
    assert gate.stats()["n_decisions"] == 6


# --------------------------------------------------------------------------------------------------- checks at assembly


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


# --------------------------------------------------------------------------------------------------- risk target


def test_unreachable_risk_target_is_refused_with_a_clear_message(tmp_path, tiny_loaded):
    run = write_synthetic_run(tmp_path / "small", tiny_loaded["late_fusion"].fingerprint, n=200)
    with pytest.raises(UnreachableRiskTarget, match="cannot build a gate .* at risk target 0.01: .*cannot be certified"):
        build_gate_from_run(run, tmp_path / "never", layer=3, risk_target=0.01, c_grid=FAST_C_GRID)
    assert not (tmp_path / "never").exists()


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


def test_build_reports_held_out_numbers_and_a_certificate(late_bundle):
    report = late_bundle.report
    cert = report["risk_certificate"]
    assert cert["target_risk"] == 0.2 and cert["risk_upper_bound"] <= 0.2
    assert report["threshold"] == pytest.approx(late_bundle.calibrator.transform(np.asarray([cert["threshold"]]))[0])
    split = report["split"]
    assert report["test"]["n"] == split["n_test"] and cert["n_calibration"] == split["n_calibration"]
    assert 0 < report["test"]["coverage"] <= 1 and report["test"]["realised_risk"] is not None
    assert set(report["ece_after_by_method"]) == {"temperature_scaling", "isotonic"}
    assert set(report["calibration"]) == {"probe", "max_answer_prob", "top1_prob", "mean_token_prob",
                                          "top1_top2_margin", "neg_token_entropy"}
    assert report["calibration"]["top1_top2_margin"]["before"] is None  # not a probability: no "before" ECE
    assert report["expected_cost_multiplier"] == pytest.approx(1 + report["gray_zone_share_test"] * 3)


# --------------------------------------------------------------------------------------------------- bundles


def test_bundle_round_trip_gives_identical_decisions(tiny_loaded, late_bundle):
    loaded = tiny_loaded["late_fusion"]
    bundle = late_bundle.out_dir
    assert sorted(p.name for p in bundle.iterdir()) == ["calibration.json", "gate.yaml", "novelty", "probe", "report.json"]
    assert not list(bundle.rglob("*.pkl")) and not list(bundle.rglob("*.pt"))
    in_memory = late_bundle.gate(loaded)
    from_disk = load_gate(bundle / "gate.yaml", loaded=loaded)
    assert from_disk.threshold_raw == in_memory.threshold_raw and from_disk.threshold_source == "risk_target"
    images = _images(3, start=20)
    first = [_without_timings(in_memory.answer(image, QUESTION)) for image in images]
    second = [_without_timings(from_disk.answer(image, QUESTION)) for image in images]
    assert first == second
    assert all(d["action"] == "self_consistency" for d in first)  # gray zone [0, 1): seeded samples reproduce too
    assert set(first[0]["evidence"]["signals"]["max_answer_prob"]) == {"raw", "calibrated"}


def test_bundle_model_path_is_relative_and_loads_the_model(tiny_loaded, late_bundle):
    config = load_gate_components(late_bundle.out_dir / "gate.yaml").config
    assert not config.monitor.model.path.startswith("/")
    gate = load_gate(late_bundle.out_dir / "gate.yaml")  # loads the tiny model from the relative path
    assert gate.loaded.fingerprint == tiny_loaded["late_fusion"].fingerprint


def test_live_drift_window_alerts_on_states_unlike_the_reference(tiny_loaded, late_bundle, caplog):
    """The bundle's drift reference is the synthetic run; the tiny model's real states are nothing like it."""
    config = late_bundle.config.model_copy(deep=True)
    config.monitor.monitoring.window = 2
    config.monitor.routing.gray_zone_action = "none"
    gate = dataclasses.replace(late_bundle, config=config.with_base_dir(late_bundle.out_dir)).gate(tiny_loaded["late_fusion"])
    with caplog.at_level("WARNING", logger="vlmrel.gate"):
        decisions = [gate.answer(image, QUESTION) for image in _images(2, start=30)]
    assert "drift" not in decisions[0].evidence
    drift = decisions[1].evidence["drift"]
    assert drift["n_current"] == 2 and drift["alert"] and drift["embedding_shift"] > 0.05
    assert "calibration drift alert" in caplog.text and gate.last_drift_report.alert


def test_damaged_calibration_file_is_a_clear_error(tmp_path, late_bundle):
    path = tmp_path / "calibration.json"
    data = json.loads((late_bundle.out_dir / "calibration.json").read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(GateError, match="calibration schema 99"):
        CalibrationBundle.load(path)
    path.write_text("{not json")
    with pytest.raises(GateError, match="not valid JSON"):
        CalibrationBundle.load(path)


# --------------------------------------------------------------------------------------------------- calibration


def test_signal_calibration_known_answers():
    rng = np.random.default_rng(0)
    n = 8000
    true_p = rng.uniform(0.05, 0.95, size=2 * n)
    correct = (rng.uniform(size=2 * n) < true_p).astype(int)
    overconfident = expit(2.5 * logit(true_p))  # logits scaled by 1/T with T = 2.5
    margin = np.abs(logit(true_p)) + logit(true_p)  # not a probability
    fit = {"probe": overconfident[:n], "calibrated": true_p[:n], "top1_top2_margin": margin[:n]}
    ev = {"probe": overconfident[n:], "calibrated": true_p[n:], "top1_top2_margin": margin[n:]}
    reports, fitted = calibrate_signals(fit, correct[:n], ev, correct[n:], probability_signals=("probe", "calibrated"))
    assert fitted["probe"]["temperature_scaling"].temperature == pytest.approx(2.5, rel=0.08)
    probe = reports["probe"]
    assert probe["after"]["temperature_scaling"]["ece"] < 0.03 < probe["before"]["ece"]
    assert reports["calibrated"]["before"]["ece"] < 0.03  # a calibrated set has ECE ≈ 0 already
    assert fitted["calibrated"]["temperature_scaling"].temperature == pytest.approx(1.0, rel=0.08)
    assert reports["top1_top2_margin"]["before"] is None
    assert reports["top1_top2_margin"]["after"]["isotonic"]["ece"] < 0.05
    assert probe["auroc"] == reports["calibrated"]["auroc"]  # monotone maps: same ranking


# --------------------------------------------------------------------------------------------------- drift


def test_drift_fires_on_a_shifted_run_and_not_on_an_in_domain_one(tmp_path, late_run, late_bundle):
    fingerprint = late_bundle.probe.info.model_fingerprint
    in_domain = write_synthetic_run(tmp_path / "in", fingerprint, n=400, seed=1, dataset_hash="h1")
    shifted = write_synthetic_run(tmp_path / "shift", fingerprint, n=400, seed=2, dataset_hash="h2", shift=0.5)
    config = late_bundle.out_dir / "gate.yaml"
    quiet = drift_between_runs(config, late_run, in_domain, recalibrate_on_alert=True)
    assert not quiet["alert"] and quiet["recalibration"] is None
    assert quiet["reference_rows"].startswith("held-out rows only")  # the probe's training rows are left out
    assert quiet["current_rows"] == "all rows" and quiet["n_current"] == 400
    loud = drift_between_runs(config, late_run, shifted, recalibrate_on_alert=True)
    assert loud["alert"] and loud["embedding_shift"] > 0.05 and loud["reasons"]
    recal = loud["recalibration"]
    assert recal["done"] and recal["n_fit"] + recal["n_eval"] == 400 and recal["calibrator"]["method"] == "temperature_scaling"


def test_shifted_split_changes_the_images_not_the_task(tmp_path):
    path = write_shifted_split(tmp_path, "adversarial", n_images=3, kind="all")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["image_id"] == SHIFTED_FIRST_IMAGE_ID
    assert json.loads((tmp_path / "adversarial_shifted_all.shift.json").read_text())["shift"] == "all"
    config = shifted_config("palette")
    scene = make_scene(SHIFTED_FIRST_IMAGE_ID, config)
    shifted = np.asarray(render_scene(scene, config), dtype=float)
    plain = np.asarray(render_scene(scene, GeneratorConfig()), dtype=float)
    assert np.abs(shifted - plain).max() > 30
    assert write_shifted_split(tmp_path, "adversarial", n_images=3, kind="all") == path  # same shift: rerun is fine
    with pytest.raises(ValueError, match="already holds 3 image"):
        write_shifted_split(tmp_path, "adversarial", n_images=3, kind="noise")


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_build_gate_single_batch_and_drift(tmp_path, tiny_loaded, tiny_model_dirs, tiny_dataset, late_run, capsys):
    from vlmrel_core.cli.main import main

    out = tmp_path / "bundle"
    assert main(["build-gate", str(late_run), "--out", str(out), "--layer", "3", "--threshold", "0.7",
                 "--gray-zone", "none"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["threshold"] == 0.7 and summary["threshold_source"] == "confidence_threshold"
    assert {"ece_before", "ece_after", "test", "calibration_summary"} <= set(summary)

    image = tiny_dataset.parent / "images" / "0000000.png"
    assert main(["gate", "--config", str(out / "gate.yaml"), "--image", str(image), "--question", QUESTION]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["action"] in ("generate", "fallback") and decision["evidence"]["layer"] == 3

    decisions = tmp_path / "decisions.jsonl"
    assert main(["gate", "--config", str(out / "gate.yaml"), "--data", str(tiny_dataset), "--out", str(decisions),
                 "--limit", "5", "--batch-size", "2"]) == 0
    batch = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in decisions.read_text().splitlines()]
    assert len(lines) == batch["n_decisions"] == 5 and "accuracy" in batch
    assert {"question_id", "label", "correct", "answer", "confidence", "action"} <= set(lines[0])

    assert main(["gate", "--config", str(out / "gate.yaml"), "--image", str(image)]) == 2
    assert "needs both --image and --question" in capsys.readouterr().err
    assert main(["build-gate", str(late_run), "--out", str(tmp_path / "x"), "--layer", "3", "--risk-target", "0.01"]) == 2
    assert "cannot be certified" in capsys.readouterr().err

    shifted = write_synthetic_run(tmp_path / "shift", tiny_loaded["late_fusion"].fingerprint, n=300, seed=3,
                                  dataset_hash="h3", shift=0.5)
    new_cal = tmp_path / "recalibrated.json"
    code = main(["drift", "--config", str(out / "gate.yaml"), "--reference", str(late_run), "--current", str(shifted),
                 "--recalibrate", "--write-calibration", str(new_cal), "--fail-on-alert"])
    drift = json.loads(capsys.readouterr().out)
    assert code == 3 and drift["alert"] and drift["written_calibration"] == str(new_cal)
    assert CalibrationBundle.load(new_cal).risk_certificate is None
