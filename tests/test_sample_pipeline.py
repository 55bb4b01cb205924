"""`vlmrel refresh-sample-data`: the shipped caches, reports and gates must come from the shipped models."""

import json

import pytest

from conftest import SAMPLES
from vlmrel_core.engine.loading import load_vlm
from vlmrel_core.samples.catalog import FAMILIES
from vlmrel_core.samples.refresh import refresh_sample_data


@pytest.mark.parametrize("family", FAMILIES)
def test_every_shipped_artifact_names_the_shipped_model(family):
    """After retraining, a forgotten refresh leaves caches and probes of the old weights: this catches it."""
    fingerprint = load_vlm(SAMPLES.model_dir(family)).fingerprint
    manifests = [run / "manifest.json" for run in SAMPLES.runs(family).values()]
    probe_files = sorted((SAMPLES.report_dir(family) / "probes").glob("*/probe.json"))
    gate_files = [SAMPLES.gate_dir(family) / name for name in ("probe/probe.json", "calibration.json", "report.json")]
    assert len(manifests) >= 7 and len(probe_files) >= 3
    for path in manifests + probe_files + gate_files:
        assert json.loads(path.read_text())["model_fingerprint"] == fingerprint, f"{path} is stale: run vlmrel refresh-sample-data"


def test_refresh_summary_matches_the_model_cards():
    summary = json.loads(SAMPLES.refresh_summary().read_text())
    for family in FAMILIES:
        card = json.loads((SAMPLES.model_dir(family) / "model_card.json").read_text())
        assert summary[family]["accuracy"] == card["accuracy"]
        assert summary[family]["gate"]["model_fingerprint"] == card["fingerprint"]


def test_refresh_refuses_an_unknown_family_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="unknown demo families"):
        refresh_sample_data(tmp_path, families=["late_fusion", "mid_fusion"])
    assert list(tmp_path.iterdir()) == []
