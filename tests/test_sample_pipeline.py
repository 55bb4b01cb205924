"""`vlmrel refresh-sample-data`: the shipped caches, reports and gates must come from the shipped models."""

import json

import pytest

from conftest import SAMPLE_DATA, SAMPLE_MODELS
from vlmrel_core.engine.loading import load_vlm
from vlmrel_core.samples.refresh import FAMILIES, refresh_sample_data

SHIPPED = SAMPLE_DATA.parent


@pytest.mark.parametrize("family", FAMILIES)
def test_every_shipped_artifact_names_the_shipped_model(family):
    """After retraining, a forgotten refresh leaves caches and probes of the old weights: this catches it."""
    fingerprint = load_vlm(SAMPLE_MODELS / family).fingerprint
    manifests = sorted((SHIPPED / "runs" / family).glob("*/manifest.json"))
    probe_files = sorted((SHIPPED / "reports" / family / "probes").glob("*/probe.json"))
    gate_files = [SHIPPED / "gates" / family / name for name in ("probe/probe.json", "calibration.json", "report.json")]
    assert len(manifests) >= 7 and len(probe_files) >= 3
    for path in manifests + probe_files + gate_files:
        assert json.loads(path.read_text())["model_fingerprint"] == fingerprint, f"{path} is stale: run vlmrel refresh-sample-data"


def test_refresh_summary_matches_the_model_cards():
    summary = json.loads((SHIPPED / "refresh_summary.json").read_text())
    for family in FAMILIES:
        card = json.loads((SAMPLE_MODELS / family / "model_card.json").read_text())
        assert summary[family]["accuracy"] == card["accuracy"]
        assert summary[family]["gate"]["model_fingerprint"] == card["fingerprint"]


def test_refresh_refuses_an_unknown_family_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="unknown demo families"):
        refresh_sample_data(tmp_path, families=["late_fusion", "mid_fusion"])
    assert list(tmp_path.iterdir()) == []
