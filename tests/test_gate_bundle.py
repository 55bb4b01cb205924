"""Gate bundles on disk: round trip, relative model path, damaged files, recalibrated copies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gate_helpers import QUESTION, scene_images, late_bundle, late_run, without_timings  # noqa: F401
from vlmrel_core.gate.bundle import (
    as_components, load_gate, load_gate_components, resolve_gate_config, write_recalibrated_bundle,
)
from vlmrel_core.gate.calibration import TemperatureScaler
from vlmrel_core.gate.records import CalibrationBundle, GateError


def test_bundle_round_trip_gives_identical_decisions(tiny_loaded, late_bundle):
    loaded = tiny_loaded["late_fusion"]
    bundle = late_bundle.out_dir
    assert sorted(p.name for p in bundle.iterdir()) == ["calibration.json", "gate.yaml", "layer_probes.json",
                                                        "layer_probes.safetensors", "novelty", "probe", "report.json"]
    assert not list(bundle.rglob("*.pkl")) and not list(bundle.rglob("*.pt"))
    in_memory = late_bundle.gate(loaded)
    from_disk = load_gate(bundle / "gate.yaml", loaded=loaded)
    assert from_disk.threshold_raw == in_memory.threshold_raw and from_disk.threshold_source == "risk_target"
    images = scene_images(3, start=20)
    first = [without_timings(in_memory.answer(image, QUESTION)) for image in images]
    second = [without_timings(from_disk.answer(image, QUESTION)) for image in images]
    assert first == second
    assert all(d["action"] == "self_consistency" for d in first)  # gray zone [0, 1): seeded samples reproduce too
    assert set(first[0]["evidence"]["signals"]["max_answer_prob"]) == {"raw", "calibrated"}


def test_bundle_model_path_is_relative_and_loads_the_model(tiny_loaded, late_bundle):
    config = load_gate_components(late_bundle.out_dir / "gate.yaml").config
    assert not config.monitor.model.path.startswith("/")
    gate = load_gate(late_bundle.out_dir / "gate.yaml")  # loads the tiny model from the relative path
    assert gate.loaded.fingerprint == tiny_loaded["late_fusion"].fingerprint


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


def test_components_from_a_path_a_config_or_components_agree(late_bundle):
    path = late_bundle.out_dir / "gate.yaml"
    from_path = load_gate_components(path)
    from_config = load_gate_components(resolve_gate_config(path))
    assert from_path.config == from_config.config == late_bundle.config
    states = np.random.default_rng(0).normal(size=(5, late_bundle.probe.info.n_features))
    for raw_conf in (from_config.confidences(states), late_bundle.components().confidences(states)):
        np.testing.assert_allclose(raw_conf[0], from_path.confidences(states)[0])
        np.testing.assert_allclose(raw_conf[1], from_path.confidences(states)[1])
    assert as_components(from_path) is from_path


def test_recalibrated_copy_replaces_the_probe_calibrator_and_drops_the_certificate(tmp_path, late_bundle):
    new = TemperatureScaler(score_kind="prob", temperature=2.5)
    path = write_recalibrated_bundle(late_bundle.out_dir / "gate.yaml", new.to_dict(), tmp_path / "cal.json")
    copy, original = CalibrationBundle.load(path), CalibrationBundle.load(late_bundle.out_dir / "calibration.json")
    assert copy.probe_calibrator.temperature == 2.5 and copy.risk_certificate is None and copy.drift_reference is None
    assert original.risk_certificate is not None and set(copy.signal_calibrators) == set(original.signal_calibrators)
    assert copy.provenance["recalibrated"] and copy.model_fingerprint == original.model_fingerprint
    assert not list(tmp_path.glob("*.tmp"))
    no_file = late_bundle.components()
    no_file.calibration = None
    with pytest.raises(GateError, match="no calibration_file"):
        write_recalibrated_bundle(no_file, new.to_dict(), tmp_path / "x.json")


def test_a_config_asking_for_image_statistics_the_bundle_lacks_is_a_clear_error(tmp_path, late_bundle):
    """The synthetic run names no images, so its bundle has none and says so; asking for them fails by name."""
    import shutil

    assert late_bundle.config.monitor.novelty.image_statistics is False and late_bundle.novelty.image is None
    copy = shutil.copytree(late_bundle.out_dir, tmp_path / "bundle")
    text = (copy / "gate.yaml").read_text()
    assert "image_statistics: false" in text
    (copy / "gate.yaml").write_text(text.replace("image_statistics: false", "image_statistics: true"))
    with pytest.raises(GateError, match="holds no image statistics.*rebuild the bundle"):
        load_gate_components(copy / "gate.yaml")
