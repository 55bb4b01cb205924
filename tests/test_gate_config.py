"""The gate's YAML config: the seed template parses as written; every bad key or value names its field path."""

from __future__ import annotations

import copy

import pytest
import yaml

from vlmrel_core.gate.config import (
    GateConfigError,
    dump_gate_config,
    load_gate_config,
    parse_gate_config,
)

# Verbatim from shared/reference/seed-design-notes.txt ("Configuration Template"), comments included.
SEED_TEMPLATE = """\
reliability_monitor:
  architecture: "early_fusion" # or "late_fusion"
  target_layer: 28
  probe:
    hidden_dim: 4096
    dropout: 0.1
    calibration_method: "temperature_scaling"
    temperature: 1.25
  routing:
    confidence_threshold: 0.72
    fallback_strategy: "human_review"
    gray_zone_bounds: [0.65, 0.80]
    gray_zone_action: "self_consistency_k5"
  monitoring:
    drift_detection_interval: "weekly"
    kl_divergence_threshold: 0.15
    retrain_trigger: "auto"
  logging:
    capture_states: false
    log_confidence_distributions: true
    alert_on_calibration_drift: true
"""


def _template() -> dict:
    return yaml.safe_load(SEED_TEMPLATE)


def test_seed_template_parses_with_its_values():
    config = parse_gate_config(_template())
    m = config.monitor
    assert m.architecture == "early_fusion" and m.target_layer == 28
    assert m.probe.hidden_dim == 4096 and m.probe.dropout == 0.1 and m.probe.temperature == 1.25
    assert m.probe.calibration_method == "temperature_scaling"
    assert m.routing.confidence_threshold == 0.72 and m.routing.risk_target is None
    assert m.routing.gray_zone_bounds == (0.65, 0.80)
    assert m.routing.self_consistency_k == 5
    assert m.routing.fallback_strategy == "human_review"
    assert m.monitoring.drift_detection_interval == "weekly"
    assert m.monitoring.kl_divergence_threshold == 0.15 and m.monitoring.retrain_trigger == "auto"
    assert m.logging.capture_states is False and m.logging.alert_on_calibration_drift is True
    # Our additions have defaults that leave the template's meaning unchanged.
    assert m.model is None and m.probe.pooling == "last_token" and m.monitoring.window == 200


def test_our_keys_parse_and_model_accepts_a_bare_path():
    data = _template()
    m = data["reliability_monitor"]
    m["model"] = "sample_data/models/late_fusion"
    m["probe"].update(path="probe", pooling="mean_image", calibration_file="calibration.json")
    del m["routing"]["confidence_threshold"]
    m["routing"]["risk_target"] = {"max_risk": 0.1, "delta": 0.05}
    m["monitoring"]["window"] = 50
    config = parse_gate_config(data)
    assert config.monitor.model.path == "sample_data/models/late_fusion" and config.monitor.model.device == "cpu"
    assert config.monitor.routing.risk_target.max_risk == 0.1 and config.monitor.routing.risk_target.delta == 0.05
    assert config.monitor.probe.pooling == "mean_image" and config.monitor.monitoring.window == 50


def test_unknown_key_names_its_path_and_the_closest_known_key():
    data = _template()
    data["reliability_monitor"]["probe"]["hiden_dim"] = data["reliability_monitor"]["probe"].pop("hidden_dim")
    with pytest.raises(GateConfigError, match=r"reliability_monitor\.probe\.hiden_dim: unknown key \(did you mean 'hidden_dim'\?\)"):
        parse_gate_config(data)


@pytest.mark.parametrize(
    "section, key, value, path",
    [
        ("routing", "gray_zone_bounds", [0.9, 0.1], "reliability_monitor.routing.gray_zone_bounds"),
        ("routing", "gray_zone_action", "self_consistency_kfive", "reliability_monitor.routing.gray_zone_action"),
        ("routing", "confidence_threshold", 1.7, "reliability_monitor.routing.confidence_threshold"),
        ("routing", "confidence_threshold", 0.9, "reliability_monitor.routing.confidence_threshold"),  # outside the gray zone
        ("routing", "fallback_strategy", "call me maybe", "reliability_monitor.routing.fallback_strategy"),
        ("probe", "calibration_method", "platt", "reliability_monitor.probe.calibration_method"),
        ("probe", "pooling", "max", "reliability_monitor.probe.pooling"),
        ("probe", "dropout", 1.5, "reliability_monitor.probe.dropout"),
        ("probe", "temperature", -1.0, "reliability_monitor.probe.temperature"),
        ("monitoring", "retrain_trigger", "sometimes", "reliability_monitor.monitoring.retrain_trigger"),
        ("monitoring", "kl_divergence_threshold", "high", "reliability_monitor.monitoring.kl_divergence_threshold"),
        ("monitoring", "window", 1, "reliability_monitor.monitoring.window"),
        ("logging", "capture_states", "perhaps", "reliability_monitor.logging.capture_states"),
    ],
)
def test_bad_values_name_the_field(section, key, value, path):
    data = _template()
    data["reliability_monitor"][section][key] = value
    with pytest.raises(GateConfigError) as info:
        parse_gate_config(data)
    assert f"{path}:" in str(info.value)


def test_bad_top_level_values_name_the_field():
    for key, value in [("architecture", "mid_fusion"), ("target_layer", "twenty")]:
        data = _template()
        data["reliability_monitor"][key] = value
        with pytest.raises(GateConfigError, match=rf"reliability_monitor\.{key}:"):
            parse_gate_config(data)
    with pytest.raises(GateConfigError, match="top-level key must be 'reliability_monitor'"):
        parse_gate_config({"monitor": {}})


def test_threshold_xor_risk_target_and_calibration_source_rules():
    both = _template()
    both["reliability_monitor"]["routing"]["risk_target"] = {"max_risk": 0.1}
    with pytest.raises(GateConfigError, match=r"reliability_monitor\.routing: give exactly one of confidence_threshold"):
        parse_gate_config(both)
    isotonic = _template()
    isotonic["reliability_monitor"]["probe"]["calibration_method"] = "isotonic"
    with pytest.raises(GateConfigError, match=r"reliability_monitor\.probe\.calibration_file:"):
        parse_gate_config(isotonic)
    no_temperature = _template()
    del no_temperature["reliability_monitor"]["probe"]["temperature"]
    with pytest.raises(GateConfigError, match=r"reliability_monitor\.probe\.temperature:"):
        parse_gate_config(no_temperature)
    bad_risk = _template()
    del bad_risk["reliability_monitor"]["routing"]["confidence_threshold"]
    bad_risk["reliability_monitor"]["routing"]["risk_target"] = {"max_risk": 0.1, "delta": 0}
    with pytest.raises(GateConfigError, match=r"reliability_monitor\.routing\.risk_target\.delta:"):
        parse_gate_config(bad_risk)


def test_file_loading_is_safe_and_resolves_paths_against_the_file(tmp_path):
    path = tmp_path / "gate.yaml"
    data = _template()
    data["reliability_monitor"]["probe"]["path"] = "probe"
    path.write_text(yaml.safe_dump(data))
    config = load_gate_config(path)
    assert config.resolve("probe") == tmp_path / "probe"
    assert config.resolve(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"  # absolute paths stay as given
    evil = tmp_path / "evil.yaml"
    evil.write_text("reliability_monitor: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(GateConfigError, match="not valid YAML"):
        load_gate_config(evil)
    with pytest.raises(GateConfigError, match="not found"):
        load_gate_config(tmp_path / "missing.yaml")


def test_dump_then_load_round_trips(tmp_path):
    config = parse_gate_config(_template())
    path = dump_gate_config(config, tmp_path / "gate.yaml")
    again = load_gate_config(path)
    assert again.model_dump() == config.model_dump()
    assert "!!python" not in path.read_text()


def test_template_is_not_mutated_by_parsing():
    data = _template()
    before = copy.deepcopy(data)
    parse_gate_config(data)
    assert data == before
